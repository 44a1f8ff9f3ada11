"""The losses as data: one entry per loss type, carrying what callers need to know about it.

Adding a loss is one function (in dce.py / ar.py or a new file) and one entry
here; ``get_loss_fn``, training's config check and evaluation all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .ar import ar_backward, ar_forward, ar_random
from .dce import k_dce, lambda_dce, t_dce, t_dse


@dataclass(frozen=True)
class LossSpec:
    """One loss type.

    fn: ``fn(model, batch, noise, **kw) -> [B]`` per-sequence loss (nats);
    time_sampler: the default sampler of its time / masking rate, None when it takes none;
    uses_sampling_eps: it draws t in [eps, 1] and takes ``sampling_eps``;
    exact: an exact NLL of one generation order (no noise: one Monte Carlo draw says it all).
    """

    name: str
    fn: Callable
    time_sampler: str | None = None
    uses_sampling_eps: bool = False
    exact: bool = False


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("t_DSE", t_dse, time_sampler="vdm", uses_sampling_eps=True),
    LossSpec("t_DCE", t_dce, time_sampler="vdm", uses_sampling_eps=True),
    LossSpec("lambda_DCE", lambda_dce, time_sampler="decoupled"),
    LossSpec("k_DCE", k_dce),
    LossSpec("ar_forward", ar_forward, exact=True),
    LossSpec("ar_backward", ar_backward, exact=True),
    LossSpec("ar_random", ar_random, exact=True),
)}
LOSS_TYPES = tuple(LOSSES)
EXACT_LOSS_TYPES = tuple(name for name, spec in LOSSES.items() if spec.exact)


def get_loss_spec(loss_type: str) -> LossSpec:
    """The registry entry of ``loss_type``; a clear error naming the valid ones otherwise."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {list(LOSSES)}")
    return LOSSES[loss_type]
