"""Exact NLL of one generation order (docs/LOSSES.md): ar_forward, ar_backward, ar_random.

For i = 0..L-1 the positions ``order[i:]`` are masked and -log p of the token at
``order[i]`` is added: L forward passes of the whole batch, one head row per
sequence per pass. L is the batch's length (the published code hard-codes 1024).
Use under ``torch.no_grad()`` for evaluation: with grad, L graphs are kept alive.
"""
from __future__ import annotations

import torch

from .masking import mask_order_suffix


def ar_nll(model, batch: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """-log p(batch) when generated in ``order`` [B, L] (a permutation per sequence) -> [B]."""
    B, L = batch.shape
    rank = order.argsort(-1)  # rank[b, pos] = step that generates pos
    rows = torch.arange(B, device=batch.device)
    nll = torch.zeros(B, device=batch.device)
    for i in range(L):
        x = mask_order_suffix(batch, rank, i, model.mask_id)
        pos = order[:, i]
        h = model.hidden(x, check=False)[rows, pos]  # [B, d]: only the row generated at this step
        nll = nll - model.target_log_probs(h, batch[rows, pos])
    return nll


def forward_order(batch: torch.Tensor) -> torch.Tensor:
    B, L = batch.shape
    return torch.arange(L, device=batch.device).expand(B, L)


def ar_forward(model, batch, noise=None):
    """Left to right."""
    return ar_nll(model, batch, forward_order(batch))


def ar_backward(model, batch, noise=None):
    """Right to left."""
    return ar_nll(model, batch, forward_order(batch).flip(-1))


def ar_random(model, batch, noise=None, order=None):
    """A uniformly random order per sequence (or the given ``order`` [B, L])."""
    if order is None:
        order = random_orders(*batch.shape, device=batch.device)
    return ar_nll(model, batch, order)


def random_orders(batch_size: int, length: int, device=None) -> torch.Tensor:
    """[B, L]: one uniformly random permutation of the positions per sequence (argsort of uniforms)."""
    return torch.rand(batch_size, length, device=device).argsort(-1)
