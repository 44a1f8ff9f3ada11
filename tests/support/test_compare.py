"""tests.support.compare.assert_close itself: matching non-finite entries pass, any mismatch (a finite
value off, NaN or an infinity where the other has none, the sign of an infinity, a wrong shape) fails
with a message that says which."""
import pytest
import torch

from tests.support.compare import assert_close

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("actual,expected", [
    ([1.0, INF], [1.0, INF]),
    ([NAN, -INF, 2.0], [NAN, -INF, 2.0 + 1e-7]),
    ([0.0], [0.0]),
])
def test_assert_close_accepts_matching_non_finite_entries(actual, expected):
    assert_close(torch.tensor(actual), torch.tensor(expected))


@pytest.mark.parametrize("actual,expected,message", [
    ([5.0, INF], [1.0, INF], "elements off"),  # a finite mismatch next to an inf is still caught
    ([1.0, 2.0], [1.0, NAN], "NaN positions differ"),  # NaN expected, a number given
    ([NAN, 2.0], [1.0, NAN], "NaN positions differ"),
    ([1.0, -INF], [1.0, INF], r"\+inf positions differ"),  # the sign of inf
    ([1.0, INF], [1.0, 3.0], r"\+inf positions differ"),
    ([NAN, 0.0], [0.0, 0.0], "NaN positions differ"),  # unwritten (poisoned) output
    ([1.0, 2.0], [1.0, 2.5], "1/2 elements off"),
])
def test_assert_close_rejects_mismatches(actual, expected, message):
    with pytest.raises(AssertionError, match=message):
        assert_close(torch.tensor(actual), torch.tensor(expected), name="t")


def test_assert_close_checks_shape_and_tolerances():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3))
    assert_close(torch.tensor([1.05]), torch.tensor([1.0]), atol=0.051, rtol=0)
    assert_close(torch.tensor([1.05]), torch.tensor([1.0]), atol=0, rtol=0.051)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.05]), torch.tensor([1.0]), atol=0.04, rtol=0.0)
