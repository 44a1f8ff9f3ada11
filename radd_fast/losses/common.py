"""What every loss shares: input checks, the masked-rows-only head, and per-sequence sums.

Only masked rows ever reach the output head: the model's ``hidden`` runs on the
whole perturbed batch, the N masked rows of it are gathered, and
``model.target_log_probs`` returns log p(clean token) for those rows alone ([N]
instead of the [B, L, V] log-softmax; on the fast backend the [N, V] logits are
never built either). Per-row weights are applied, then a fixed-order segment sum
(``per_sequence``) turns rows back into one loss per sequence.
"""
from __future__ import annotations

import torch


def check_batch(model, batch: torch.Tensor, token_dim: int) -> None:
    """Clear errors for a batch the loss cannot score (one host sync for the range check)."""
    check_batch_layout(model, batch, token_dim)
    lo, hi = torch.stack(torch.aminmax(batch)).tolist()  # one host sync
    if lo < 0 or hi >= token_dim - 1:
        raise ValueError(f"clean tokens must be in [0, {token_dim - 1}) (the mask id is {token_dim - 1}, "
                         f"V = token_dim = {token_dim}); got min {lo} max {hi}")


def check_batch_layout(model, batch: torch.Tensor, token_dim: int) -> None:
    """The checks of ``check_batch`` that read no device value: vocabulary, dtype and shape.

    The static training step (training/step.py) checks the token range on the device instead.
    """
    if model.vocab_size != token_dim:
        raise ValueError(f"token_dim {token_dim} (vocab size incl. MASK) does not match the model's "
                         f"vocab_size {model.vocab_size}")
    if batch.dim() != 2 or batch.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"batch must be an integer tensor [B, L], got {batch.dtype} {tuple(batch.shape)}")
    B, L = batch.shape
    if B == 0 or L == 0:
        raise ValueError(f"batch is empty: shape {tuple(batch.shape)}")
    if L > model.length:
        raise ValueError(f"sequence length {L} exceeds the model's length {model.length} (model.length)")


def masked_target_log_probs(model, clean: torch.Tensor, perturbed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(clean token) at every masked position of ``perturbed``.

    clean, perturbed: [B, L] -> (logp [N] fp32, seq [N] int64: the sequence of each row),
    N = number of MASK tokens in ``perturbed``, in row-major order.
    """
    seq, pos = (perturbed == model.mask_id).nonzero(as_tuple=True)
    h = model.hidden(perturbed, check=False)  # [B, L, d]; check_batch already validated the tokens
    return model.target_log_probs(h[seq, pos], clean[seq, pos]), seq


def per_sequence(values: torch.Tensor, seq: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Segment sum in a fixed order: values [N] of rows of sequences seq [N] -> [B] (0 for no rows).

    ``seq`` must be ascending (the row-major order ``masked_target_log_probs`` returns), so the
    rows of a sequence are contiguous: each sequence's rows are summed by one reduction of a
    fixed order, with no atomics. ``index_add_`` (used before) adds with atomics on CUDA, so
    its sums depended on thread scheduling. Sync-free (the segment bounds are a ``searchsorted`` on the
    device, static shape [B + 1]) and traceable by torch.compile; on CPU the result equals
    ``index_add_``'s sequential sum bit for bit. Gradient: each row gets its sequence's gradient.
    Rows with ``seq == batch_size`` (padding, sorted last) lie past the last segment: left out,
    gradient 0 (``losses.static_rows`` relies on it).
    """
    bounds = torch.searchsorted(seq, torch.arange(batch_size + 1, device=seq.device, dtype=seq.dtype))
    return torch.segment_reduce(values, "sum", offsets=bounds, unsafe=True)  # unsafe: no host-side checks
