"""The denoising losses at a static number of head rows, with no host sync (docs/TRAINING.md).

The eager losses (dce.py) draw each token's mask on the device and gather the N masked
rows with ``nonzero``: N is data-dependent, so the host waits for the device once per
micro-batch and the step cannot have static shapes. Here the same laws are drawn in two
parts:

1. on the host (``MaskPlanner.draw``, B numbers from a CPU generator): each sequence's
   time / rate r_j as the loss's time sampler draws it, and its number of masked
   positions n_j ~ Binomial(L, p_j) with p_j the masking probability of r_j (for k_DCE,
   n_j = k_j ~ U{1..L} directly). The host then knows N = sum_j n_j without asking the device.
   Each loss's law and its loss per row come from its registry entry (``LossSpec.static_rows``:
   ``masking.MaskingLaw``, the ``*_plan_rows`` of dce.py); nothing here branches on a loss name;
2. on the device (``planned_rows``): which n_j positions, a uniformly random subset of that
   size (the n_j smallest of L iid uniform keys).

Masking every token independently with probability p is the same law as drawing the count
n ~ Binomial(L, p) and then a uniform subset of n positions (given the count, every subset of
that size is equally likely), so each loss keeps its published law exactly; the tests check
the count distribution and the per-position uniformity against the closed form.

The masked rows are gathered into a buffer of a static capacity C per micro-batch shape
(``MaskPlanner.capacity``: mean + 8 standard deviations of N, to a multiple of 128), padding
rows weighted 0 and left out of the per-sequence sums. A batch with N > C (the host knows)
runs the same function at capacity N, the exact overflow path.

``StaticRows`` is that sequence, plan -> device inputs -> capacity or overflow, once for the
training step (training/step.py) and the evaluation loss (``StaticRowLoss``, compiled whole
and replayed from CUDA graphs). A loss whose entry has no static-row form is refused by name
(``registry.NoStaticRowForm``), never run here another way.

Example::

    planner = MaskPlanner("lambda_DCE", noise, length=L)
    plan = planner.draw(B)                                    # host, no sync
    C = planner.capacity(B)
    keys = torch.rand(B, L, dtype=torch.float64, device=dev)
    loss = planned_loss(model, "lambda_DCE", noise, batch, keys, plan.counts.to(dev), plan.rate.to(dev),
                        max(C, plan.total))                   # [B], no sync
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..acceleration import Acceleration, CapturedGraph, GraphSet
from .common import check_batch, per_sequence
from .registry import PLANNED_LOSS_TYPES, get_loss_spec
from .time_samplers import get_time_sampler

__all__ = ["PLANNED_LOSS_TYPES", "MaskPlan", "MaskPlanner", "PlannedInputs", "StaticRows", "StaticRowLoss",
           "planned_inputs", "planned_rows", "planned_loss", "row_values"]

CAPACITY_SIGMAS = 8.0  # N > mean + 8 sd happens about once in 10^15 draws for a Gaussian N
CAPACITY_MULTIPLE = 128  # matmul-friendly row counts
CAPACITY_DRAWS = 2048  # rate draws behind the capacity's mean and variance (fixed seed: deterministic)


@dataclass(frozen=True)
class MaskPlan:
    """The host-side randomness of one micro-batch.

    rate: [B] fp32, the loss's per-sequence time (t for t_DSE / t_DCE, lam for lambda_DCE,
    k for k_DCE); counts: [B] int64 masked positions per sequence; total: N = counts.sum().
    """

    rate: torch.Tensor
    counts: torch.Tensor
    total: int


class MaskPlanner:
    """Draws ``MaskPlan``s for one loss on the host and sizes the static row buffer.

    loss_type: a loss whose registry entry has a static-row form (``PLANNED_LOSS_TYPES``; else
    ``NoStaticRowForm``), whose masking law (``masking.MaskingLaw``) draws the rates and counts;
    noise: the schedule (its ``move_chance`` gives the masking probability of a time; evaluated on
    the host in float64); length: L, positions per sequence; sampling_eps / time_sampler: as in
    ``get_loss_fn``.
    """

    def __init__(self, loss_type: str, noise, length: int, sampling_eps: float = 1e-3,
                 time_sampler: str | None = None):
        spec = get_loss_spec(loss_type)
        self.masking = spec.static_row_form().masking
        self.loss_type = loss_type
        self.noise = noise
        self.length = length
        self.sampling_eps = sampling_eps if spec.uses_sampling_eps else 0.0
        self.sampler = get_time_sampler(time_sampler or spec.time_sampler) if spec.time_sampler else None
        self._capacities: dict[int, int] = {}

    def rates(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rate [B] fp32, masking probability [B] float64) on the host; k_DCE: (k, k / L)."""
        return self.masking.rates(self, batch_size, generator)

    def draw(self, batch_size: int, generator: torch.Generator | None = None) -> MaskPlan:
        """One micro-batch's rates and masked counts, drawn on the host (no device work, no sync)."""
        rate, p = self.rates(batch_size, generator)
        counts = self.masking.counts(rate, p, self.length, generator)
        return MaskPlan(rate, counts, int(counts.sum()))

    def count_moments(self, batch_size: int) -> tuple[float, float]:
        """Mean and variance of N = sum_j n_j for a batch of ``batch_size`` (law of total variance).

        The law's closed form where it has one (k_DCE: n_j iid U{1..L}). Otherwise, given the
        probabilities p_j the counts are independent binomials: E[N] = L E[sum p],
        Var[N] = L E[sum p (1 - p)] + L^2 Var[sum p], with the expectations over the time sampler
        taken from a fixed-seed Monte Carlo.
        """
        L = self.length
        closed = self.masking.count_moments(batch_size, L)
        if closed is not None:
            return closed
        generator = torch.Generator().manual_seed(0)
        p = torch.stack([self.rates(batch_size, generator)[1] for _ in range(CAPACITY_DRAWS)])  # [D, B]
        total_p = p.sum(-1)
        mean = L * total_p.mean().item()
        var = L * (p * (1 - p)).sum(-1).mean().item() + L * L * total_p.var().item()
        return mean, var

    def capacity(self, batch_size: int) -> int:
        """Static head rows for micro-batches of ``batch_size``: mean + 8 sd of N, up to a multiple
        of 128, at most B * L. Computed once per batch size (a few ms on the host)."""
        if batch_size not in self._capacities:
            mean, var = self.count_moments(batch_size)
            rows = math.ceil((mean + CAPACITY_SIGMAS * math.sqrt(var)) / CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
            self._capacities[batch_size] = max(1, min(batch_size * self.length, rows))
        return self._capacities[batch_size]


def planned_inputs(plan: MaskPlan, batch_shape: tuple[int, int], capacity: int, device,
                   to_device: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """The device half of a ``MaskPlan``: (keys [B, L] float64 uniforms drawn on ``device``, counts [B],
    rate [B], the capacity to use, overflowed). A plan whose N exceeds ``capacity`` gets its own N
    (the exact path; the caller counts it). to_device: how host tensors move (default ``.to``)."""
    move = to_device or (lambda t: t.to(device))
    counts, rate = move(plan.counts), move(plan.rate)
    keys = torch.rand(*batch_shape, dtype=torch.float64, device=device)
    overflowed = plan.total > capacity
    return keys, counts, rate, (plan.total if overflowed else capacity), overflowed


class PlannedInputs(NamedTuple):
    """One batch's static-row inputs on the device (``StaticRows.inputs``): the arguments of
    ``planned_loss`` after the batch, and whether N overflowed the static capacity."""

    keys: torch.Tensor
    counts: torch.Tensor
    rate: torch.Tensor
    capacity: int
    overflowed: bool


class StaticRows:
    """The static-row sequence of one loss, plan -> device inputs -> static capacity or overflow,
    for the training step (training/step.py) and the evaluation loss (``StaticRowLoss``) alike.

    loss_type: a loss with a static-row form (else ``NoStaticRowForm``, here, before any batch);
    noise, sampling_eps, time_sampler: as in ``MaskPlanner``. length: the one sequence length of
    every plan (training: the model's, since its plans are drawn before the batch is seen), or None:
    each batch's own (evaluation; one planner per length). capacity: a fixed row capacity for every
    batch (tests force overflows with it); default the planner's. The caller runs
    ``planned_loss(model, loss_type, noise, batch, *inputs[:4])`` its way (compiled, from graphs)
    when the inputs did not overflow, eagerly at their own capacity when they did; ``overflows``
    counts those batches.
    """

    def __init__(self, loss_type: str, noise, sampling_eps: float = 1e-3, time_sampler: str | None = None, *,
                 length: int | None = None, capacity: int | None = None):
        get_loss_spec(loss_type).static_row_form()  # NoStaticRowForm now, not at the first batch
        self.loss_type, self.noise, self.sampling_eps, self.time_sampler = loss_type, noise, sampling_eps, time_sampler
        self.length = length
        self.fixed_capacity = capacity
        self.planners: dict[int, MaskPlanner] = {}
        self.overflows = 0
        if length is not None:
            self.planner(length)

    def planner(self, length: int | None = None) -> MaskPlanner:
        """The planner of sequences of ``length`` (the fixed length when one was given)."""
        L = self.length or length
        if L not in self.planners:
            self.planners[L] = MaskPlanner(self.loss_type, self.noise, L, self.sampling_eps, self.time_sampler)
        return self.planners[L]

    def capacity(self, batch_size: int, length: int | None = None) -> int:
        """Static head rows of a batch of ``batch_size`` sequences of ``length``."""
        return self.fixed_capacity or self.planner(length).capacity(batch_size)

    def plan(self, batch_size: int, length: int | None = None) -> MaskPlan:
        """The host half of a batch's masking, from torch's default CPU generator (no device work)."""
        return self.planner(length).draw(batch_size)

    def inputs(self, batch: torch.Tensor, plan: MaskPlan | None = None, device=None,
               to_device: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PlannedInputs:
        """The device half of ``batch``'s plan (drawn here when None): keys, counts, rate, and the
        static capacity, or the plan's own N when it overflows it (counted in ``overflows``).
        device: where the keys are drawn (default the batch's); to_device: how host tensors move
        (default ``.to``; training: pinned, non-blocking)."""
        B, L = batch.shape
        if plan is None:
            plan = self.plan(B, L)
        inputs = PlannedInputs(*planned_inputs(plan, (B, L), self.capacity(B, L),
                                               batch.device if device is None else device,
                                               to_device))
        self.overflows += inputs.overflowed
        return inputs


def planned_rows(keys: torch.Tensor, counts: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked positions of a micro-batch, gathered into ``capacity`` rows with static shapes.

    keys: [B, L] iid uniforms (float64: ties among 1024 float32 uniforms are a few percent
    likely per sequence, float64 ties about 1e-10); counts: [B] int64, sum N <= capacity.
    Sequence j masks the positions of its n_j smallest keys (a uniformly random n_j-subset).
    Returns (mask [B, L] bool; seq [C] int64 ascending, B at the C - N padding rows; flat [C]
    int64 indices into the B * L positions, a valid position at the padding rows). Slot s of
    sequence j holds its s-th smallest key's position. No sync: sorts, a cumsum, searchsorted
    and gathers only (no ``nonzero``, no scatter).
    """
    B, L = keys.shape
    by_key = keys.argsort(-1)  # [B, L]: positions in key order
    rank = by_key.argsort(-1)  # [B, L]: each position's place in that order
    mask = rank < counts[:, None]
    ends = counts.cumsum(0)  # [B]: one past each sequence's last slot
    slot = torch.arange(capacity, device=keys.device)
    seq = torch.searchsorted(ends, slot, right=True)  # [C], B past the last sequence's slots
    row_seq = seq.clamp(max=B - 1)
    within = (slot - (ends - counts)[row_seq]).clamp(0, L - 1)  # padding rows: some valid position
    flat = row_seq * L + by_key[row_seq, within]
    return mask, seq, flat


def planned_loss(model, loss_type: str, noise, batch: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor,
                 rate: torch.Tensor, capacity: int) -> torch.Tensor:
    """Per-sequence loss [B] of ``loss_type`` at a static ``capacity`` of head rows (no sync).

    batch: [B, L] clean tokens (validated by the caller); keys [B, L] float64, counts [B] int64,
    rate [B] fp32: a ``MaskPlan`` on the device plus the keys; capacity >= counts.sum(). The
    model's last block and the head run at the ``capacity`` rows only; padding rows add 0.
    Values equal the eager loss (dce.py) on the same perturbed batch; float64 for lambda_DCE.
    ``loss_type`` must have a static-row form (``NoStaticRowForm`` otherwise).
    """
    B, L = batch.shape
    mask, seq, flat = planned_rows(keys, counts, capacity)
    perturbed = torch.where(mask, model.mask_id, batch)
    h = model.hidden(perturbed, check=False, rows=flat)  # [C, d]
    logp = model.target_log_probs(h, batch.reshape(-1)[flat])  # [C]
    row_seq = seq.clamp(max=B - 1)
    values = row_values(loss_type, noise, logp, row_seq, rate, counts, L)
    values = torch.where(seq < B, values, 0.0)  # padding rows: finite values, weight 0
    return per_sequence(values, seq, B)  # padding (seq = B) lies past the last segment


def row_values(loss_type: str, noise, logp, seq, rate, counts, length: int) -> torch.Tensor:
    """Each row's loss term, by the eager loss's own formula: its entry's ``StaticRowForm.rows``."""
    return get_loss_spec(loss_type).static_row_form().rows(logp, seq, rate, counts, length, noise)


class StaticRowLoss:
    """The static-row evaluation loss, ``fn(model, x [B, L]) -> [B]``, compiled and graphed per the policy.

    Per batch shape the masked counts are drawn on the host (``StaticRows``: a ``MaskPlanner`` per
    length) and the head rows gathered into a buffer of static capacity C, so the whole loss
    (``planned_loss``) has one shape per (B, L, C): compiled once and, from its second batch on,
    replayed from one CUDA graph (``radd_fast.acceleration``). A draw that overflows C runs eagerly
    at its own size (exact; counted in ``overflows``). capture: how a graph is made (tests emulate
    it). Always without gradients: it scores, it never trains. A loss without a static-row form:
    ``NoStaticRowForm`` (``evaluation.ppl.make_loss_fn`` scores such a loss with its own ``fn``).
    """

    def __init__(self, model, noise, loss_type: str, sampling_eps: float, acceleration: Acceleration,
                 capture=None, time_sampler: str | None = None):
        self.rows = StaticRows(loss_type, noise, sampling_eps, time_sampler)
        self.model, self.noise, self.loss_type, self.sampling_eps = model, noise, loss_type, sampling_eps
        self.time_sampler = time_sampler
        self.graphs = GraphSet(acceleration.compiled(self._loss), model.device, acceleration.cuda_graphs,
                               what="the static-row evaluation loss", capture=capture or CapturedGraph)
        self.calls: dict[tuple[int, int, int], int] = {}

    @property
    def planners(self) -> dict[int, MaskPlanner]:
        """The planner of each batch length seen."""
        return self.rows.planners

    @property
    def overflows(self) -> int:
        """Batches whose draw overflowed the capacity (run eagerly at their own size)."""
        return self.rows.overflows

    def _loss(self, x, keys, counts, rate, capacity: int):
        return planned_loss(self.model, self.loss_type, self.noise, x, keys, counts, rate, capacity)

    @torch.no_grad()
    def __call__(self, model, x: torch.Tensor) -> torch.Tensor:
        B, L = x.shape
        model.eval()  # as the eager evaluation loss does (get_loss_fn(train=False)): no dropout
        check_batch(model, x, model.vocab_size)
        keys, counts, rate, capacity, overflowed = self.rows.inputs(x)
        if overflowed:  # rare: the exact path at the batch's own row count
            return self._loss(x, keys, counts, rate, capacity)
        key = (B, L, capacity)
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] == 2:  # a shape seen twice is the run's shape: capture it (the first call warmed up)
            self.graphs.prepare([(key, (x, keys, counts, rate), {"capacity": capacity})])
        return self.graphs(key, x, keys, counts, rate, capacity=capacity)
