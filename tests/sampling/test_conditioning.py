"""Conditioning (radd_fast/sampling/conditioning.py): text prefix/suffix/infill to positions, the
forms initial_state takes with their messages, and the projection that writes the fixed tokens."""
import pytest
import torch

from radd_fast.sampling.conditioning import initial_state, projection, text_conditioning


def test_text_conditioning_and_errors():
    assert text_conditioning(6, prefix=[1, 2], suffix=[3], infill={3: [4]}) == {0: 1, 1: 2, 5: 3, 3: 4}
    with pytest.raises(ValueError, match="longer than the sequence length"):
        text_conditioning(3, prefix=[1, 2], suffix=[3, 4])
    with pytest.raises(ValueError, match="outside the sequence"):
        text_conditioning(6, infill={5: [1, 2]})
    with pytest.raises(ValueError, match="already fixed"):
        text_conditioning(6, prefix=[1, 2], infill={1: [3]})
    x = initial_state({1: 4, 3: [5, 6]}, 2, 6, mask_id=8, device="cpu")
    assert x.tolist() == [[8, 4, 8, 5, 6, 8]]
    assert initial_state(None, 2, 3, 8, "cpu").tolist() == [[8, 8, 8]]
    assert initial_state(torch.tensor([[-1, 2], [3, -1]]), 2, 2, 8, "cpu").tolist() == [[8, 2], [3, 8]]
    with pytest.raises(ValueError, match="outside the sequence"):
        initial_state({6: 1}, 1, 6, 8, "cpu")
    with pytest.raises(ValueError, match="not a real token"):
        initial_state([(0, 8)], 1, 6, 8, "cpu")
    with pytest.raises(ValueError, match="conditioning tensor"):
        initial_state(torch.zeros(3, 6), 2, 6, 8, "cpu")


def test_initial_state_forms_and_errors():
    x = initial_state({2: torch.tensor(5), 4: torch.tensor([1, 2])}, 3, 7, mask_id=9, device="cpu")
    assert x.tolist() == [[9, 9, 5, 9, 1, 2, 9]] and x.dtype == torch.int64
    assert initial_state([(0, 3), (6, 0)], 3, 7, 9, "cpu").tolist() == [[3, 9, 9, 9, 9, 9, 0]]
    rows = initial_state(torch.tensor([[-1, 4, 9], [2, -1, -1]]), 2, 3, 9, "cpu")
    assert rows.tolist() == [[9, 4, 9], [2, 9, 9]] and rows.is_contiguous()
    assert initial_state(torch.tensor([1, -1, 2]), 5, 3, 9, "cpu").tolist() == [[1, 9, 2]]
    with pytest.raises(ValueError, match=r"conditioning tokens must be in \[0, 9\)"):
        initial_state(torch.tensor([10, -1, 2]), 1, 3, 9, "cpu")
    with pytest.raises(ValueError, match=r"conditioning tensor must be \[L=3\] or \[num_samples=2, L\]"):
        initial_state(torch.zeros(3, 3, dtype=torch.int64), 2, 3, 9, "cpu")
    with pytest.raises(ValueError, match="conditioning tensor"):
        initial_state(torch.zeros(1, 4, dtype=torch.int64), 1, 3, 9, "cpu")
    with pytest.raises(ValueError, match="conditioning tensor"):
        initial_state(torch.zeros(1, 1, 3, dtype=torch.int64), 1, 3, 9, "cpu")
    with pytest.raises(ValueError, match=r"conditioning position -1 is outside the sequence \[0, 3\)"):
        initial_state({-1: 2}, 1, 3, 9, "cpu")
    with pytest.raises(ValueError, match=r"conditioning token -2 at position 1 is not a real token id \[0, 9\)"):
        initial_state([(1, -2)], 1, 3, 9, "cpu")
    with pytest.raises(ValueError, match=r"^conditioning must be None, a \{position: token\(s\)\} dict.*; got int$"):
        initial_state(5, 1, 3, 9, "cpu")
    assert initial_state(None, 2, 3, 9, "cpu").dtype == torch.int64
    assert initial_state({0: 1}, 2, 3, 9, "cpu").dtype == torch.int64
    from_int32 = initial_state(torch.tensor([0, -1, 3], dtype=torch.int32), 2, 3, 9, "cpu")
    assert from_int32.dtype == torch.int64 and from_int32.tolist() == [[0, 9, 3]]  # token 0 is a token
    with pytest.raises(ValueError, match="conditioning must be None"):
        initial_state(["ab", "c"], 1, 3, 9, "cpu")


def test_projection_writes_the_fixed_tokens():
    proj = projection(torch.tensor([[9, 4, 9, 1]]), mask_id=9)
    assert proj(torch.tensor([[0, 0, 0, 0], [5, 5, 5, 5]])).tolist() == [[0, 4, 0, 1], [5, 4, 5, 1]]


def test_text_conditioning_boundaries():
    assert text_conditioning(4, prefix=[1, 2], suffix=[3, 4]) == {0: 1, 1: 2, 2: 3, 3: 4}  # exactly full
    assert text_conditioning(4, suffix=[7]) == {3: 7}
    assert text_conditioning(4, infill={9: []}) == {}  # an empty span may sit anywhere
    assert text_conditioning(4, infill={0: [5], 3: [6]}) == {0: 5, 3: 6}
    with pytest.raises(ValueError, match=r"infill at -1: positions \[-1, 0\) fall outside the sequence \[0, 4\)"):
        text_conditioning(4, infill={-1: [1]})
    with pytest.raises(ValueError, match=r"infill at 3: positions \[3, 5\)"):
        text_conditioning(4, infill={3: [1, 2]})
    with pytest.raises(ValueError, match=r"prefix \(3 tokens\) \+ suffix \(2 tokens\) is longer than the sequence length 4"):
        text_conditioning(4, prefix=[1, 2, 3], suffix=[4, 5])
    with pytest.raises(ValueError, match="infill at 1: position 1 is already fixed to token 2"):
        text_conditioning(3, prefix=[1, 2], infill={1: [3]})
    assert text_conditioning(3, prefix=[1, 2], infill={1: [2]}) == {0: 1, 1: 2}  # the same token twice is fine
    with pytest.raises(ValueError, match=r"^infill at 0: position 1 is already fixed to token 2$"):
        text_conditioning(4, prefix=[1, 2], infill={0: [1, 5]})  # the span's second token collides
