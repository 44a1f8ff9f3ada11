"""Sampling strategies (radd_fast/sampling/strategies.py): the strategy table and its parameter
checks, the top-p / top-k kept sets written out by hand (boundaries, ties, rows filtered
independently), the sampling dtypes, and Gumbel-max draws from the filtered softmax."""
from __future__ import annotations

import pytest
import torch

from radd_fast.sampling.strategies import (
    DEFAULT_PARA,
    PUBLISHED_CLI_TOP_P,
    PUBLISHED_LIBRARY_TOP_K,
    PUBLISHED_LIBRARY_TOP_P,
    STRATEGIES,
    check_strategy,
    filter_logits,
    make_strategy,
    sample_logits,
    sampling_dtype,
)
from tests.support.stats import ALPHA, chi2_sf, two_sample_chi2


def test_strategies():
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        check_strategy("greedy")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"top_p needs"):
            check_strategy("top_p", bad)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="top_k needs"):
            check_strategy("top_k", bad)
    assert check_strategy("top_k", 3.0) == 3 and check_strategy("top_p", None) == 0.9
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, "top_k", 2))
    assert kept.sum(1).tolist() == [2, 2] and kept[0, 1] and kept[0, 3] and kept[1, 0]
    probs = logits.softmax(-1)
    kept = torch.isfinite(filter_logits(logits, "top_p", 0.5))
    assert kept[0].tolist() == [False, True, False, True, False] or kept[0].sum() == 1  # ties: 1 or both
    assert kept[1].tolist() == [True, False, False, False, False] and probs[1, 0] > 0.5
    kept = torch.isfinite(filter_logits(logits, "top_p", 1.0))
    assert kept.all()
    top1 = sample_logits(torch.randn(100, 7), "top_k", 1)
    assert top1.shape == (100,)
    x = torch.randn(100, 7)
    assert torch.equal(sample_logits(x, "top_k", 1), x.argmax(-1))
    # Gumbel-max draws from the softmax of the kept logits
    draws = sample_logits(logits[0:1].expand(20000, 5), "top_k", 3, torch.Generator().manual_seed(0))
    p = torch.softmax(filter_logits(logits[0:1], "top_k", 3), -1)[0]
    _, _, pval = two_sample_chi2(torch.bincount(draws, minlength=5), (p * 20000).round().long())
    assert pval > ALPHA


# ---- filtering boundaries ----------------------------------------------------------------------------------------
def kept(logits: torch.Tensor, strategy: str, para) -> list[set[int]]:
    """The token sets a strategy keeps, one per row of logits [N, C]."""
    finite = torch.isfinite(filter_logits(logits, strategy, para))
    return [set(torch.nonzero(row).flatten().tolist()) for row in finite]


def log_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()[None]


@pytest.mark.parametrize("p,expected", [
    (0.30, {1}),  # the first token alone reaches p
    (0.44, {1}),
    (0.50, {1, 3}),  # 0.45 < p: the token that crosses p is kept
    (0.69, {1, 3}),
    (0.71, {1, 3, 0}),
    (0.89, {1, 3, 0}),
    (0.96, {1, 3, 0, 2}),
    (0.999, {1, 3, 0, 2, 4}),
])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p, expected):
    """probs sorted: token 1 (0.45), 3 (0.25), 0 (0.2), 2 (0.08), 4 (0.02); margins >= 0.005 to p."""
    logits = log_of([0.20, 0.45, 0.08, 0.25, 0.02])
    assert kept(logits, "top_p", p) == [expected]
    assert kept(logits * 1.0 + 3.0, "top_p", p) == [expected]  # a shift of the logits changes nothing


def test_top_p_rows_are_filtered_independently_and_ties_keep_one_of_them():
    logits = torch.cat([log_of([0.4, 0.2, 0.2, 0.2]), log_of([0.1, 0.1, 0.1, 0.7]), log_of([0.25] * 4)])
    rows = kept(logits, "top_p", 0.55)
    assert 0 in rows[0] and len(rows[0]) == 2 and rows[0] <= {0, 1, 2, 3}  # 0.4 + one of the tied 0.2s
    assert rows[1] == {3}
    assert len(rows[2]) == 3  # three of four equal tokens: 0.5 < 0.55 <= 0.75
    out = filter_logits(logits, "top_p", 0.55)
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # kept logits unchanged
    assert bool((out[~torch.isfinite(out)] == float("-inf")).all())


def test_top_p_exact_hit_follows_the_published_rule():
    """Published rule: token j is kept iff the mass ranked before it is <= p. An exact hit (mass
    0.75 of tokens 0, 1 equal to p, exact in binary) therefore keeps the next token too."""
    logits = log_of([0.5, 0.25, 0.125, 0.125])
    assert kept(logits, "top_p", 0.75)[0] == {0, 1, 2}
    assert kept(logits, "top_p", 0.5)[0] == {0, 1}


def test_top_p_at_one_keeps_every_token():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 3
    assert bool(torch.isfinite(filter_logits(logits, "top_p", 1.0)).all())


def test_top_p_at_one_keeps_every_token_of_a_small_vocabulary():
    logits = torch.randn(256, 7, generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(filter_logits(logits, "top_p", 1.0)).all())


@pytest.mark.parametrize("k,expected", [(1, {2}), (2, {2, 0}), (3, {2, 0, 4}), (5, set(range(5))),
                                        (6, set(range(5))), (400, set(range(5)))])
def test_top_k_exact_sets(k, expected):
    logits = torch.tensor([[1.0, -2.0, 3.0, -1.0, 0.5]])
    assert kept(logits, "top_k", k) == [expected]


def test_top_k_keeps_exactly_k_among_ties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    rows = kept(logits, "top_k", 2)
    assert 4 in rows[0] and len(rows[0]) == 2 and rows[0] <= {0, 1, 2, 4}
    assert len(rows[1]) == 2
    assert kept(logits, "top_k", 3.0)[0] == {4, 0, 1} or len(kept(logits, "top_k", 3)[0]) == 3


def test_direct_keeps_everything_and_copies():
    logits = torch.randn(3, 5)
    out = filter_logits(logits, "direct")
    assert torch.equal(out, logits) and out.data_ptr() != logits.data_ptr()
    empty = make_strategy("top_p", 0.5).filter(torch.zeros(0, 5, dtype=torch.float64))
    assert empty.shape == (0, 5) and empty.dtype == torch.float32


def test_filters_return_fp32_for_any_input_dtype():
    for strategy, para in (("direct", None), ("top_k", 2), ("top_p", 0.5)):
        out = filter_logits(torch.randn(4, 6, dtype=torch.float64), strategy, para)
        assert out.dtype == torch.float32, strategy


# ---- the strategy table ------------------------------------------------------------------------------------------
def test_strategy_table_and_parameters():
    assert STRATEGIES == ("direct", "top_p", "top_k")
    assert DEFAULT_PARA == {"top_p": 0.9, "top_k": 400}
    assert check_strategy("direct", 5) is None
    assert check_strategy("top_p", 1) == 1.0 and check_strategy("top_p", "0.25") == 0.25
    assert check_strategy("top_k", 1) == 1 and isinstance(check_strategy("top_k", 2.0), int)
    for bad in (0, -0.1, 1.0001):
        with pytest.raises(ValueError, match=r"top_p needs strategy_para p in \(0, 1\]"):
            check_strategy("top_p", bad)
    for bad in (0, 0.5, 2.5, -3):
        with pytest.raises(ValueError, match="top_k needs a whole-number strategy_para k >= 1"):
            check_strategy("top_k", bad)
    s = make_strategy("top_k", 3.0)
    assert s.name == "top_k" and s.para == 3 and not s.is_direct
    assert make_strategy("top_p").para == 0.9 and make_strategy("top_k").para == 400
    assert make_strategy("direct").is_direct and make_strategy("direct").para is None
    with pytest.raises(ValueError, match=r"unknown sampling strategy 'greedy'; expected one of"):
        make_strategy("greedy")


def test_the_two_published_top_p_defaults_are_named_apart():
    """The published library's top_p_sampling(p=0.9) is the table's default; the published CLI's
    --strategy_para 0.8 is sample.py's (sampling/cli.py), never the library's."""
    assert (PUBLISHED_LIBRARY_TOP_P, PUBLISHED_CLI_TOP_P, PUBLISHED_LIBRARY_TOP_K) == (0.9, 0.8, 400)
    assert DEFAULT_PARA == {"top_p": PUBLISHED_LIBRARY_TOP_P, "top_k": PUBLISHED_LIBRARY_TOP_K}


def test_sampling_dtype_names():
    assert sampling_dtype("float32") is torch.float32 and sampling_dtype("float64") is torch.float64
    assert sampling_dtype(torch.float64) is torch.float64
    for bad in ("float16", torch.float16, "fp64"):
        with pytest.raises(ValueError, match=r"sampling_dtype must be one of \['float32', 'float64'\]"):
            sampling_dtype(bad)


def test_sample_logits_draws_from_the_filtered_softmax_with_its_generator():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]]).expand(30000, 4)
    for dtype in (torch.float32, torch.float64):
        draws = sample_logits(logits, "top_k", 3, torch.Generator().manual_seed(0), dtype)
        assert draws.shape == (30000,) and draws.dtype == torch.int64
        counts = torch.bincount(draws, minlength=4).double()
        assert counts[3] == 0
        p = torch.tensor([2.0, 0.0, 1.0]).softmax(0).double()
        stat = float(((counts[:3] - 30000 * p) ** 2 / (30000 * p)).sum())
        assert chi2_sf(stat, 2) > ALPHA
        again = sample_logits(logits, "top_k", 3, torch.Generator().manual_seed(0), dtype)
        assert torch.equal(draws, again)  # the generator passed is the one used
