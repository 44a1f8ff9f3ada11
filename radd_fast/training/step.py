"""One training step with static shapes and no host sync between log intervals (docs/TRAINING.md).

``TrainStep`` runs the micro-batches and the update of a step so that the host never waits
for the device until ``read`` (once per ``log_freq`` steps, and before a checkpoint):

- the losses with a static-row form in their registry entry draw their masking in two parts
  (``losses.static_rows.StaticRows``, the sequence evaluation's static-row loss uses too): the
  B rates and masked counts on the host, the positions on the device, so the host knows the
  number of head rows N and the loss runs at a static capacity C per micro-batch shape. A
  batch with N > C runs the same function eagerly at capacity N (exact; counted);
- the loss, its mean over the batch and the step's loss stay on the device; the token range
  check, the non-finite check and the gradient norm are device tensors read back by ``read``
  (a batch with an id outside [0, V - 1) is clamped, its update skipped, and ``read`` raises);
- the update is gated on the device: a step whose loss or gradient norm is not finite, and
  every step after it, applies no update (fused Adam(W)'s ``found_inf``, the mechanism
  GradScaler uses); ``read`` then reports the first such step and the loop stops there;
- with ``compile=True`` (or "auto" on CUDA) the loss function is compiled whole
  (``torch.compile``, static shapes: one graph per capacity), its backward by AOTAutograd; on
  CUDA in one process it is also captured in a CUDA graph per capacity
  (``mode="reduce-overhead"``) unless ``cuda_graphs=False``. Both switches are decided by
  ``radd_fast.acceleration``, the policy the sampler and the evaluation use too.

A loss whose entry has no static-row form runs its own ``fn``, as its entry's
``no_static_rows`` says it may: the ar_* losses run L passes with one head row per sequence
each, already static and sync-free, and go through the same step without a plan.

Example::

    stepper = TrainStep(model, noise, "lambda_DCE", compile=True)
    for step in range(1, n + 1):
        for x in micro_batches:                       # [B, L] int64 on the model's device
            stepper.micro_batch(x, weight=1 / len(micro_batches))
        stepper.update(optimizer, params, lr=lr_at(step, cfg), max_norm=1.0, step=step)
        if step % log_freq == 0:
            report = stepper.read()                   # the one host sync of the interval
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..acceleration import resolve_acceleration
from ..data import DataError
from ..distributed import DistEnv, all_reduce_mean
from ..flops import executed_train_flops
from ..losses.common import check_batch_layout
from ..losses.registry import get_loss_spec
from ..losses.static_rows import MaskPlan, StaticRows, planned_loss


class PlannedLossModule(nn.Module):
    """The static-row loss as a module, so that DDP (which hooks ``forward``) sees all of it."""

    def __init__(self, model, loss_type: str, noise):
        super().__init__()
        self.model, self.loss_type, self.noise = model, loss_type, noise

    def forward(self, batch, keys, counts, rate, capacity: int) -> torch.Tensor:
        """[B, L] clean tokens, a plan on the device ([B, L] keys, [B] counts, [B] rates) -> [B] loss."""
        self.model.train()
        return planned_loss(self.model, self.loss_type, self.noise, batch, keys, counts, rate, capacity)


class ExactLossModule(nn.Module):
    """An ar_* loss (L passes, one head row per sequence each) as a module."""

    def __init__(self, model, fn: Callable, noise):
        super().__init__()
        self.model, self.fn, self.noise = model, fn, noise

    def forward(self, batch) -> torch.Tensor:
        self.model.train()
        return self.fn(self.model, batch, self.noise)


@dataclass
class StepReport:
    """What one ``read`` brings back: the steps since the previous read.

    losses: the global mean loss of each step; grad_norm: the last step's pre-clip norm;
    first_bad_step: the first step whose loss or gradient norm was not finite (0: none; no
    update from it on was applied); bad_tokens: a batch held ids outside [0, V - 1);
    overflows: micro-batches that took the exact overflow path; flops: the FLOPs this rank
    executed (``radd_fast.flops.executed_train_flops``); head_rows: rows the head ran at.
    """

    losses: list
    grad_norm: float
    first_bad_step: int
    bad_tokens: bool
    overflows: int
    flops: float
    head_rows: int

    def problem(self) -> str | None:
        """A one-line description of a non-finite step, or None."""
        if not self.first_bad_step:
            return None
        return (f"the loss or the gradient norm is not finite at step {self.first_bad_step}: no update from "
                f"that step on was applied")


class TrainStep:
    """Micro-batches, update and logging reads of a training run, without host syncs in between.

    model: a RADD in training; noise: the schedule (on the model's device); loss_type and
    sampling_eps / time_sampler: as in ``get_loss_fn``. compile: ``torch.compile`` the loss
    (True / False / "auto": on for CUDA; ``backend``: "inductor", or "aot_eager" to trace without
    code generation); cuda_graphs: capture it per capacity (None: on when compiled on CUDA in one
    process; the ar_* losses are never captured). capacity: a fixed row capacity for every
    micro-batch (tests force overflows with it); default ``MaskPlanner.capacity``. The loss's
    registry entry decides the path: its static-row form (``self.rows``, ``self.planner``), or
    its own ``fn`` where the entry says it has none (``LossSpec.no_static_rows``). wrap: a
    function of the loss module, e.g. DDP; world_size: the ranks of the run (graphs need one).
    """

    def __init__(self, model, noise, loss_type: str, *, sampling_eps: float = 1e-3, time_sampler: str | None = None,
                 compile: bool | str = False, backend: str = "inductor", cuda_graphs: bool | None = None,
                 capacity: int | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None,
                 world_size: int = 1):
        spec = get_loss_spec(loss_type)
        self.model, self.noise, self.loss_type = model, noise, loss_type
        self.device = model.device
        self.rows = self.planner = None
        if spec.static_rows is not None:  # else the entry's no_static_rows: fn itself is static already
            # plans are drawn before their batch is seen (``plan``): at the model's length
            self.rows = StaticRows(loss_type, noise, sampling_eps, time_sampler, length=model.length,
                                   capacity=capacity)
            self.planner = self.rows.planner()
            module = PlannedLossModule(model, loss_type, noise)
        else:
            module = ExactLossModule(model, spec.fn, noise)
        self.module = wrap(module) if wrap is not None else module
        if self.rows is None and cuda_graphs:
            raise ValueError(f"cuda_graphs=True: {loss_type} runs L passes of Python control flow, never captured")
        self.acceleration = resolve_acceleration(self.device, compile, False if self.rows is None else cuda_graphs,
                                                 backend=backend, graphs_need_compile=True, world_size=world_size)
        self.cuda_graphs = self.acceleration.cuda_graphs
        self.compiled = self.module
        if self.rows is None:  # the ar_* losses: compiled block by block
            if self.acceleration.compile:
                for block in model.blocks:
                    block.compile(backend=backend)
        else:
            mode = "reduce-overhead" if self.cuda_graphs else None  # reduce-overhead: inductor's CUDA graphs
            self.compiled = self.acceleration.compiled(self.module, mode=mode)
        self._grads_owned = False
        self._new_window()
        self._step_loss = None
        self._grad_norm = torch.zeros((), device=self.device)
        self._first_bad = torch.zeros((), dtype=torch.int64, device=self.device)
        self._bad_tokens = torch.zeros((), dtype=torch.bool, device=self.device)

    def _new_window(self) -> None:
        self._window: list[torch.Tensor] = []
        if self.rows is not None:
            self.rows.overflows = 0
        self.flops = 0.0
        self.head_rows = 0

    @property
    def overflows(self) -> int:
        """Micro-batches since the last read that took the exact overflow path."""
        return self.rows.overflows if self.rows is not None else 0

    def capacity(self, batch_size: int) -> int:
        """Static head rows of a micro-batch of ``batch_size`` sequences."""
        return self.rows.capacity(batch_size)

    # -- micro-batches ---------------------------------------------------------------------------
    def plan(self, batch_size: int) -> MaskPlan | None:
        """The host half of a micro-batch's masking (None for the ar_* losses): host tensors only,
        from torch's default CPU generator (which the loop seeds per micro-batch)."""
        if self.rows is None:
            return None
        self.capacity(batch_size)  # host work too: computed once per batch size, at the first plan
        return self.rows.plan(batch_size)

    def micro_batch(self, batch: torch.Tensor, weight: float, scaler=None, plan: MaskPlan | None = None) -> torch.Tensor:
        """Forward + backward of one micro-batch [B, L]; gradients accumulate with ``weight``
        (1 / micro-batches per step). ``plan``: from ``plan(B)``, drawn here when None. Returns
        the micro-batch's mean loss, a device scalar."""
        check_batch_layout(self.model, batch, self.model.vocab_size)  # no sync: the range is a device flag
        vocab = self.model.vocab_size
        self._bad_tokens = self._bad_tokens | (batch.amin() < 0) | (batch.amax() >= vocab - 1)
        # Out-of-range ids would fail inside the embedding or the head (a device-side assert on
        # CUDA): clamp them, skip the update (``update``) and raise at ``read``, naming the problem.
        batch = batch.clamp(0, vocab - 2)
        if self.rows is not None:
            per_seq = self._planned(batch, plan if plan is not None else self.plan(batch.shape[0]))
        else:
            per_seq = self._exact(batch)
        loss = per_seq.mean()
        scaled = loss * weight
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss = loss.detach().double()
        self._step_loss = loss * weight if self._step_loss is None else self._step_loss + loss * weight
        return loss

    def _planned(self, batch: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        B, L = batch.shape
        # keys drawn eagerly: the same masks compiled or not
        keys, counts, rate, capacity, overflowed = self.rows.inputs(batch, plan, self.device, self._to_device)
        # rare overflow (counted by self.rows): the exact path at the batch's own row count, uncompiled
        run = self.module if overflowed else self.compiled
        if run is not self.module:
            self.model.rotary_emb(L, self.device)  # fill the rotary cache eagerly: tracing a miss recompiles
            if self.cuda_graphs:
                self._own_gradient_buffers()
                torch.compiler.cudagraph_mark_step_begin()
        self.flops += executed_train_flops(self.model, B, L, head_rows=capacity, last_block_rows=capacity)
        self.head_rows += capacity
        return run(batch, keys, counts, rate, capacity)

    def _own_gradient_buffers(self) -> None:
        """CUDA graphs: give every parameter a .grad of its own before the first replay.

        A parameter without one would take the graph's backward output itself as its gradient,
        memory that the next replay overwrites; with one, autograd adds into it in place (and
        ``update`` zeroes it in place, ``set_to_none=False``, so once is enough).
        """
        if self._grads_owned:
            return
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        self._grads_owned = True

    def _exact(self, batch: torch.Tensor) -> torch.Tensor:
        B, L = batch.shape
        self.flops += L * executed_train_flops(self.model, B, L, head_rows=B)  # L passes, one head row each
        self.head_rows += L * B
        return self.module(batch)  # L passes of Python control flow: not compiled whole

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Host plan -> device without a sync: pinned memory and a non-blocking copy on CUDA."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    # -- the update ------------------------------------------------------------------------------
    def update(self, optimizer, params: list, lr: float, max_norm: float, step: int, scaler=None) -> None:
        """Unscale (fp16), set ``lr``, clip to ``max_norm`` (<= 0: no clipping), and apply the
        update unless this step or an earlier one was not finite; then zero the gradients.

        ``optimizer`` must be fused Adam / AdamW (``fused=True``), whose step takes the device
        flag ``found_inf`` (``optim.build_optimizer`` builds one wherever torch has the kernels,
        CPU included); another optimizer gets a host check here (one sync per step).
        """
        if self._step_loss is None:
            raise RuntimeError("update() before any micro_batch() of the step")
        fp16 = scaler is not None and scaler.is_enabled()
        if fp16:
            scaler.unscale_(optimizer)
        for group in optimizer.param_groups:
            group["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
        # fp16: an inf gradient is the scaler's business (it skips and lowers the scale), not an error.
        finite = torch.isfinite(self._step_loss) if fp16 else torch.isfinite(self._step_loss) & torch.isfinite(norm)
        self._first_bad = torch.where((self._first_bad == 0) & ~finite, step, self._first_bad)
        skip = ((self._first_bad > 0) | self._bad_tokens).float()
        if fp16:
            _fold_into_scaler(scaler, optimizer, skip)
            scaler.step(optimizer)
            scaler.update()
        elif all(group.get("fused") for group in optimizer.param_groups):  # the groups run the step, not defaults
            optimizer.found_inf = skip  # fused Adam(W): no update (and no step count) where 1
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif not skip.item():  # unfused optimizer: no device gate, so the host decides (a sync)
            optimizer.step()
        optimizer.zero_grad(set_to_none=not self.cuda_graphs)  # graphs: keep the .grad buffers
        self._window.append(self._step_loss)
        self._grad_norm = norm.detach()
        self._step_loss = None

    # -- reading back ----------------------------------------------------------------------------
    def read(self, env: DistEnv | None = None) -> StepReport:
        """The steps since the last read, in one device-to-host transfer (the interval's sync).

        Raises DataError when a batch held a token id outside [0, V - 1). With several ranks the
        step losses are averaged over them and the flags combined (the earliest non-finite step,
        a bad batch on any rank), so every rank stops at the same read: two all-reduces per
        read, none per step.
        """
        losses = torch.stack(self._window) if self._window else torch.zeros(0, dtype=torch.float64, device=self.device)
        first_bad, bad_tokens = self._first_bad.double(), self._bad_tokens.double()
        if env is not None and env.world > 1:
            losses = all_reduce_mean(losses, env)
            first_bad, bad_tokens = _combine_over_ranks(first_bad, bad_tokens)
        flags = torch.stack([self._grad_norm.double(), first_bad, bad_tokens])
        *step_losses, grad_norm, first_bad, bad_tokens = torch.cat([losses, flags]).tolist()
        report = StepReport(step_losses, grad_norm, int(first_bad), bool(bad_tokens), self.overflows, self.flops,
                            self.head_rows)
        self._new_window()
        if report.bad_tokens:
            raise DataError(f"a training batch holds token ids outside [0, {self.model.vocab_size - 1}) "
                            f"(the mask id is {self.model.mask_id}): the data does not fit the model's vocabulary")
        return report


def _combine_over_ranks(first_bad: torch.Tensor, bad_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The earliest non-finite step over the ranks (0: none) and whether any rank saw a bad batch.

    One all-reduce with MIN: a rank with no bad step sends +inf, and -bad_tokens so that the
    minimum is minus the maximum.
    """
    packed = torch.stack([torch.where(first_bad > 0, first_bad, math.inf), -bad_tokens])
    torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MIN)
    return torch.where(torch.isinf(packed[0]), 0.0, packed[0]), -packed[1]


def _fold_into_scaler(scaler, optimizer, skip: torch.Tensor) -> None:
    """fp16: make the scaler skip the update also after a non-finite loss.

    After ``unscale_`` the scaler holds one found-inf flag per device for this optimizer and
    passes their sum to fused Adam(W) as ``found_inf`` (no sync). Raising those flags with
    ours keeps every later update skipped too. (GradScaler has no public hook for this.)
    """
    state = scaler._per_optimizer_states[id(optimizer)]
    for flag in state["found_inf_per_device"].values():
        flag.copy_(torch.maximum(flag, skip.to(flag.device)))
