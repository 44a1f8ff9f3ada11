"""Forward (absorbing) processes: which positions of a clean batch become MASK.

All vectorised over the batch; randomness is drawn on the batch's device.
"""
from __future__ import annotations

import torch


def mask_with_prob(x: torch.Tensor, p: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Mask each token of x [B, L] independently with probability p [B] (one rate per sequence)."""
    move = torch.rand(x.shape, device=x.device) < p[:, None]
    return torch.where(move, mask_id, x)


def mask_k_random(x: torch.Tensor, k: torch.Tensor, mask_id: int, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Mask exactly k [B] uniformly chosen positions of each sequence of x [B, L].

    The rank of each position in a random permutation is below k for exactly k positions,
    so no Python loop over the batch and no ties (unlike thresholding the uniforms).
    keys: the uniforms [B, L] that rank the positions (drawn here when None).
    """
    if keys is None:
        keys = torch.rand(x.shape, device=x.device)
    rank = keys.argsort(-1).argsort(-1)  # [B, L]
    return torch.where(rank < k[:, None], mask_id, x)


def mask_order_suffix(x: torch.Tensor, rank: torch.Tensor, i: int, mask_id: int) -> torch.Tensor:
    """Any-order AR state before step i: positions generated at step >= i are masked.

    rank [B, L]: the step at which each position is generated (the inverse of the order).
    """
    return torch.where(rank >= i, mask_id, x)
