"""The losses as data: one entry per loss type, carrying everything callers need to know about it.

Adding a loss is one function (in dce.py / ar.py or a new file) and one entry here;
``get_loss_fn``, training's config check and step, and evaluation all read this table.
An entry either gives its static-row form (``StaticRowForm``: its masking law and its loss
per masked row, what the static-shape training step and ``static_rows`` evaluation run) or
says in ``no_static_rows`` why it has none; an entry with neither is refused at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .ar import ar_backward, ar_forward, ar_random
from .dce import (
    k_dce,
    k_dce_plan_rows,
    lambda_dce,
    lambda_dce_plan_rows,
    t_dce,
    t_dce_plan_rows,
    t_dse,
    t_dse_plan_rows,
)
from .masking import COUNT_MASKING, RATE_MASKING, TIME_MASKING, MaskingLaw


class NoStaticRowForm(ValueError):
    """The static-row path (``static_rows.MaskPlanner``, ``StaticRows``, ``StaticRowLoss``) was
    asked for a loss whose registry entry has no static-row form."""


@dataclass(frozen=True)
class StaticRowForm:
    """What the static-row step (static_rows.py) needs of a loss, so that it branches on no name.

    masking: its masking law in the two parts the step draws (``masking.MaskingLaw``: the rate and
    masked count of each sequence on the host, the positions on the device);
    rows: ``rows(logp [C], seq [C], rate [B], counts [B], length, noise) -> [C]``, the loss term of
    each masked row by the eager loss's own formula (dce.py ``*_plan_rows``).
    """

    masking: MaskingLaw
    rows: Callable


@dataclass(frozen=True)
class LossSpec:
    """One loss type.

    fn: ``fn(model, batch, noise, **kw) -> [B]`` per-sequence loss (nats);
    time_sampler: the default sampler of its time / masking rate, None when it takes none;
    uses_sampling_eps: it draws t in [eps, 1] and takes ``sampling_eps``;
    exact: an exact NLL of one generation order (no noise: one Monte Carlo draw says it all);
    static_rows: its static-row form (``StaticRowForm``), or None with a reason in
    no_static_rows: why it has none. Such a loss is trained and scored (``static_rows=True``
    evaluation too) by ``fn`` itself, which is right only when ``fn`` is static and sync-free
    already (the ar_* losses: L passes of one head row per sequence); asking the static-row
    path itself for it raises ``NoStaticRowForm``. Exactly one of the two must be given.
    """

    name: str
    fn: Callable
    time_sampler: str | None = None
    uses_sampling_eps: bool = False
    exact: bool = False
    static_rows: StaticRowForm | None = None
    no_static_rows: str = ""

    def __post_init__(self):
        if (self.static_rows is None) == (not self.no_static_rows):
            raise TypeError(f"loss {self.name!r}: give exactly one of static_rows (its StaticRowForm) and "
                            f"no_static_rows (why it has none: it then trains and scores through fn itself)")
        if self.static_rows is not None and self.static_rows.masking.takes_time_sampler != (self.time_sampler is not None):
            raise TypeError(f"loss {self.name!r}: its masking law {type(self.static_rows.masking).__name__} "
                            f"{'takes' if self.static_rows.masking.takes_time_sampler else 'takes no'} time sampler, "
                            f"its time_sampler is {self.time_sampler!r}")

    def static_row_form(self) -> StaticRowForm:
        """Its static-row form; ``NoStaticRowForm`` (with the entry's reason) when it has none."""
        if self.static_rows is None:
            raise NoStaticRowForm(f"loss {self.name!r} has no static-row form ({self.no_static_rows}); "
                                  f"static-row losses: {list(planned_loss_types())}")
        return self.static_rows


_AR_REASON = "L passes of one head row per sequence: static shapes and no host sync already"

LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("t_DSE", t_dse, time_sampler="vdm", uses_sampling_eps=True,
             static_rows=StaticRowForm(TIME_MASKING, t_dse_plan_rows)),
    LossSpec("t_DCE", t_dce, time_sampler="vdm", uses_sampling_eps=True,
             static_rows=StaticRowForm(TIME_MASKING, t_dce_plan_rows)),
    LossSpec("lambda_DCE", lambda_dce, time_sampler="decoupled",
             static_rows=StaticRowForm(RATE_MASKING, lambda_dce_plan_rows)),
    LossSpec("k_DCE", k_dce, static_rows=StaticRowForm(COUNT_MASKING, k_dce_plan_rows)),
    LossSpec("ar_forward", ar_forward, exact=True, no_static_rows=_AR_REASON),
    LossSpec("ar_backward", ar_backward, exact=True, no_static_rows=_AR_REASON),
    LossSpec("ar_random", ar_random, exact=True, no_static_rows=_AR_REASON),
)}
LOSS_TYPES = tuple(LOSSES)
EXACT_LOSS_TYPES = tuple(name for name, spec in LOSSES.items() if spec.exact)


def planned_loss_types() -> tuple[str, ...]:
    """The loss types of the table (as it is now) that have a static-row form."""
    return tuple(name for name, spec in LOSSES.items() if spec.static_rows is not None)


# The losses whose masked rows the static-row step plans (static_rows.py), read from the table.
PLANNED_LOSS_TYPES = planned_loss_types()


def get_loss_spec(loss_type: str) -> LossSpec:
    """The registry entry of ``loss_type``; a clear error naming the valid ones otherwise."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {list(LOSSES)}")
    return LOSSES[loss_type]


def has_static_rows(loss_type: str) -> bool:
    """Whether ``loss_type``'s entry has a static-row form (its own ``fn`` otherwise; see ``LossSpec``)."""
    return get_loss_spec(loss_type).static_rows is not None
