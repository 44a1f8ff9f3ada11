"""Masking (radd_fast/losses/masking.py): each position with a given probability, exactly k random
positions, and the suffix of an order."""
from __future__ import annotations

import torch

from radd_fast.losses.masking import mask_k_random, mask_order_suffix, mask_with_prob


def test_k_dce_masks_exactly_k_vectorised():
    x = torch.zeros(500, 37, dtype=torch.long)
    k = torch.randint(1, 38, (500,))
    assert torch.equal((mask_k_random(x, k, 99) == 99).sum(-1), k)


def test_mask_with_prob_rates_and_extremes():
    torch.manual_seed(0)
    x = torch.zeros(4, 20000, dtype=torch.int64)
    out = mask_with_prob(x, torch.tensor([0.0, 0.25, 0.7, 1.0]), mask_id=9)
    frac = (out == 9).double().mean(-1).tolist()
    assert frac[0] == 0.0 and frac[3] == 1.0
    assert abs(frac[1] - 0.25) < 0.02 and abs(frac[2] - 0.7) < 0.02
    assert bool((out[out != 9] == 0).all())


def test_mask_k_random_and_suffix():
    torch.manual_seed(0)
    x = torch.arange(10).repeat(3, 1)
    out = mask_k_random(x, torch.tensor([0, 3, 10]), mask_id=99)
    assert (out == 99).sum(-1).tolist() == [0, 3, 10]
    assert bool((out[out != 99] == x[out != 99]).all())
    rank = torch.tensor([[2, 0, 1]])
    assert mask_order_suffix(torch.tensor([[5, 6, 7]]), rank, 1, 9).tolist() == [[9, 6, 9]]
    assert mask_order_suffix(torch.tensor([[5, 6, 7]]), rank, 0, 9).tolist() == [[9, 9, 9]]
