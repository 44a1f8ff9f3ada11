"""RADD training / evaluation losses (docs/LOSSES.md) and the published ``get_loss_fn`` entry point.

Every loss is a small function of ``(model, batch, noise)`` returning the
per-sequence loss [B]; ``get_loss_fn`` adds input checks, the published
``train`` flag (model mode) and the sampling epsilon. Example::

    loss_fn = get_loss_fn(noise, model.vocab_size, train=True, loss_type="lambda_DCE")
    loss = loss_fn(model, batch).mean()   # batch: [B, L] int64 clean tokens, L <= model.length
"""
from __future__ import annotations

from .ar import ar_backward, ar_forward, ar_nll, ar_random
from .common import check_batch, masked_target_log_probs, per_sequence
from .dce import k_dce, lambda_dce, t_dce, t_dse
from .registry import EXACT_LOSS_TYPES, LOSS_TYPES, LOSSES, LossSpec, get_loss_spec
from .time_samplers import TIME_SAMPLERS, get_time_sampler


def get_loss_fn(noise, token_dim: int, train: bool, sampling_eps: float = 1e-3, loss_type: str = "lambda_DCE",
                time_sampler: str | None = None):
    """Published signature: returns ``fn(model, batch) -> per-sequence loss [B]``.

    noise: the schedule (``noise(t) -> (sigma, dsigma)``); token_dim: V incl. MASK (mask id
    = token_dim - 1); train: puts the model in train (dropout) or eval mode, as published;
    sampling_eps: smallest t of the t-losses; time_sampler: override the loss's default
    ('vdm' for t_DSE / t_DCE, 'decoupled' for lambda_DCE). Gradients are left on; wrap
    evaluation in ``torch.no_grad()``. lambda_DCE returns float64, the others float32.
    """
    spec = get_loss_spec(loss_type)
    if not 0.0 <= sampling_eps < 1.0:
        raise ValueError(f"sampling_eps must be in [0, 1), got {sampling_eps}")
    kwargs = {}
    if time_sampler is not None:
        if spec.time_sampler is None:
            raise ValueError(f"loss {loss_type!r} takes no time sampler (got time_sampler={time_sampler!r})")
        get_time_sampler(time_sampler)  # validate the name now, not at the first step
        kwargs["time_sampler"] = time_sampler
    if spec.uses_sampling_eps:
        kwargs["sampling_eps"] = sampling_eps

    def loss_fn(model, batch):
        model.train(train)
        check_batch(model, batch, token_dim)
        return spec.fn(model, batch, noise, **kwargs)

    loss_fn.loss_type = loss_type
    return loss_fn


__all__ = ["get_loss_fn", "LOSSES", "LOSS_TYPES", "EXACT_LOSS_TYPES", "LossSpec", "get_loss_spec", "TIME_SAMPLERS", "get_time_sampler", "t_dse", "t_dce",
           "lambda_dce", "k_dce", "ar_forward", "ar_backward", "ar_random", "ar_nll", "check_batch",
           "masked_target_log_probs", "per_sequence"]
