"""The training step's host syncs: none between log intervals, for every loss type; one per read.

On CUDA every counted op makes the host wait for the device; counting them on CPU finds the
same call sites (radd_fast/sync_counter.py). The step runs under the loop's CPU
deterministic algorithms too, as in training.
"""
import contextlib

import pytest
import torch

from radd_fast import LogLinearNoise
from radd_fast.config import ModelConfig, RADDConfig
from radd_fast.data import DataError
from radd_fast.losses import LOSS_TYPES
from radd_fast.model import RADD
from radd_fast.sync_counter import SyncCounter
from radd_fast.training.step import TrainStep

TOKENS, LENGTH, B = 10, 8, 3


def tiny(dropout=0.02, seed=0):
    cfg = RADDConfig(tokens=TOKENS, model=ModelConfig(hidden_size=16, n_heads=2, n_blocks=2, length=LENGTH,
                                                      dropout=dropout))
    torch.manual_seed(seed)
    return RADD(cfg)


def fused_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)


def host_plans(stepper, steps, micro=2):
    """The host half of each micro-batch, drawn before counting.

    On CUDA the plan is host work (CPU tensors from the CPU generator: ``test_plans_are_host_tensors``)
    and cannot make the host wait; on CPU its ``int(counts.sum())`` would look like a sync."""
    return [stepper.plan(B) for _ in range(steps * micro)]


def run_steps(stepper, optimizer, model, steps, first=1, micro=2, plans=None):
    params = list(model.parameters())
    plans = iter(plans if plans is not None else host_plans(stepper, steps, micro))
    for step in range(first, first + steps):
        for _ in range(micro):
            stepper.micro_batch(torch.randint(0, TOKENS, (B, LENGTH)), weight=1 / micro, plan=next(plans))
        stepper.update(optimizer, params, lr=1e-3, max_norm=1.0, step=step)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_sync_between_log_intervals(loss_type):
    """From the first step on (optimizer state created lazily included): zero syncs, then one read.
    The ar_* losses (L passes each) take one step of one micro-batch, the others two of two."""
    model = tiny()
    stepper, optimizer = TrainStep(model, LogLinearNoise(), loss_type), fused_adamw(model)
    steps, micro = (1, 1) if loss_type.startswith("ar_") else (2, 2)
    torch.manual_seed(1)
    with deterministic():
        plans = host_plans(stepper, steps, micro)
        with SyncCounter() as syncs:
            run_steps(stepper, optimizer, model, steps, micro=micro, plans=plans)
        assert syncs.total == 0, dict(syncs.by_op)
        with SyncCounter() as syncs:
            report = stepper.read()
        assert syncs.total == 1, dict(syncs.by_op)  # one device-to-host transfer per log interval
    assert len(report.losses) == steps and report.first_bad_step == 0 and not report.bad_tokens


@contextlib.contextmanager
def deterministic():
    """torch's deterministic algorithms, as the training loop sets them on CPU."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def test_overflow_path_adds_no_sync():
    """A batch past the static capacity runs the exact eager path: still no sync, and counted."""
    model = tiny()
    stepper, optimizer = TrainStep(model, LogLinearNoise(), "k_DCE", capacity=1), fused_adamw(model)
    plans = host_plans(stepper, steps=2)
    with SyncCounter() as syncs:
        run_steps(stepper, optimizer, model, steps=2, plans=plans)
    assert syncs.total == 0, dict(syncs.by_op)
    assert stepper.read().overflows == 4  # k >= 1 per sequence: every micro-batch has N >= 3 > 1


def test_non_finite_step_is_never_applied_and_named():
    """A NaN gradient at step 2: no update from step 2 on (weights stay those of step 1), and the
    read names step 2."""
    model = tiny(dropout=0.0)
    stepper, optimizer = TrainStep(model, LogLinearNoise(), "lambda_DCE"), fused_adamw(model)
    torch.manual_seed(0)
    run_steps(stepper, optimizer, model, steps=1)
    after_first = [p.detach().clone() for p in model.parameters()]
    weight = model.output_layer.linear.weight
    hook = weight.register_hook(lambda g: g * float("nan"))
    plans = host_plans(stepper, steps=3)
    with SyncCounter() as syncs:
        run_steps(stepper, optimizer, model, steps=1, first=2, plans=plans[:2])
        hook.remove()
        run_steps(stepper, optimizer, model, steps=2, first=3, plans=plans[2:])  # finite again, still not applied
    assert syncs.total == 0, dict(syncs.by_op)
    report = stepper.read()
    assert report.first_bad_step == 2 and "step 2" in report.problem()
    for before, p in zip(after_first, model.parameters()):
        assert torch.equal(before, p.detach())


def test_token_out_of_range_is_reported_at_read():
    model = tiny()
    stepper, optimizer = TrainStep(model, LogLinearNoise(), "lambda_DCE"), fused_adamw(model)
    stepper.micro_batch(torch.full((B, LENGTH), model.mask_id), weight=1.0)  # the mask id is no clean token
    stepper.update(optimizer, list(model.parameters()), lr=1e-3, max_norm=1.0, step=1)
    with pytest.raises(DataError, match="token ids outside"):
        stepper.read()


@pytest.mark.parametrize("loss_type", ["t_DSE", "t_DCE", "lambda_DCE", "k_DCE"])
def test_plans_are_host_tensors(loss_type):
    """The host half never touches the model's device: CPU tensors, a Python int total."""
    plan = TrainStep(tiny(), LogLinearNoise(), loss_type).plan(B)
    assert plan.rate.device.type == plan.counts.device.type == "cpu"
    assert isinstance(plan.total, int) and plan.total == int(plan.counts.sum())
