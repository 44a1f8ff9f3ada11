"""Optimizer mechanics and EMA against hand-computed values (issue 17).

The training tests compare a run with itself (straight vs resumed, one rank vs two); these check
the mechanics directly: the clipped norm (TrainStep.update), the
warmed-up lr, the first AdamW step in closed form, micro-batch accumulation equal to the
global-batch gradient, the grad norm the loop logs, and the EMA recursion.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from radd_fast import RADD, ExponentialMovingAverage, LogLinearNoise, ModelConfig, RADDConfig
from radd_fast.losses.registry import get_loss_spec
from radd_fast.training import train
from radd_fast.training.config import OptimConfig
from radd_fast.training.optim import build_optimizer, lr_at
from radd_fast.training.step import TrainStep

from .train_helpers import tiny_config


# ------------------------------------------------------------------ clip, lr, step
def test_lr_warmup_closed_form():
    cfg = OptimConfig(lr=2e-3, warmup=10)
    assert [lr_at(s, cfg) for s in (1, 5, 10, 11, 1000)] == pytest.approx([2e-4, 1e-3, 2e-3, 2e-3, 2e-3])
    assert lr_at(1, OptimConfig(lr=2e-3, warmup=0)) == 2e-3


@pytest.mark.parametrize("kind", ["AdamW", "Adam"])
def test_first_adam_step_in_closed_form(kind):
    """First step: m / (sqrt(v) + eps) = g / (|g| + eps); AdamW decays the weights by lr * wd first,
    Adam adds wd * p to the gradient."""
    cfg = OptimConfig(optimizer=kind, lr=0.1, beta1=0.5, beta2=0.75, eps=1e-3, weight_decay=0.2, warmup=0)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = build_optimizer([p], cfg, torch.device("cpu"))
    assert isinstance(opt, getattr(torch.optim, kind))
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.1, (0.5, 0.75), 1e-3, 0.2)
    g = torch.tensor([0.3, 0.0, -4.0], dtype=torch.float64)
    p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([p], max_norm=cfg.grad_clip)  # norm 4.01 > 1: clipped to norm 1
    g = g / g.norm()
    p0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if kind == "AdamW":
        want = p0 * (1 - 0.1 * 0.2) - 0.1 * g / (g.abs() + 1e-3)
    else:
        g = g + 0.2 * p0
        want = p0 - 0.1 * g / (g.abs() + 1e-3)
    torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-12)
    assert p.grad is None


def test_fused_optimizer_exactly_on_cuda():
    """Fused AdamW / Adam on CUDA, the for-each one elsewhere (the flag is read off a CPU build:
    torch's fused kernels also exist for CPU tensors, so no GPU is needed to check it)."""
    for kind in ("AdamW", "Adam"):
        cfg = OptimConfig(optimizer=kind)
        assert build_optimizer([torch.nn.Parameter(torch.ones(2))], cfg, torch.device("cpu")).defaults["fused"] is False
        assert build_optimizer([torch.nn.Parameter(torch.ones(2))], cfg, torch.device("cuda")).defaults["fused"] is True


# ------------------------------------------------------------------ TrainStep: accumulation, clip, logged norm
def tiny_model() -> RADD:
    torch.manual_seed(0)
    model = RADD(RADDConfig(tokens=6, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=8,
                                                         dropout=0.0, name="train-step")))
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.3)  # a non-uniform head: every gradient non-zero
    return model


def full_batch_grads(x: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the global-batch mean loss, straight from the loss function (no TrainStep)."""
    model = tiny_model()
    get_loss_spec("ar_forward").fn(model.train(), x, LogLinearNoise()).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_accumulated_gradient_equals_the_global_batch_gradient(accum):
    """ar_forward is deterministic, so micro-batch weights 1/accum must give the global gradient."""
    x = torch.randint(0, 6, (4, 8), generator=torch.Generator().manual_seed(1))
    model = tiny_model()
    stepper = TrainStep(model, LogLinearNoise(), "ar_forward")
    for chunk in x.chunk(accum):
        stepper.micro_batch(chunk, weight=1 / accum)
    for p, want in zip(model.parameters(), full_batch_grads(x)):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)  # fp32 summation order only


@pytest.mark.parametrize("max_norm", [0.01, 0.0, 1e6])
def test_train_step_clips_to_max_norm_and_reports_the_pre_clip_norm(max_norm):
    """With SGD the applied step is -lr x the clipped gradient: read it off the weights."""
    x = torch.randint(0, 6, (4, 8), generator=torch.Generator().manual_seed(2))
    model = tiny_model()
    params = list(model.parameters())
    stepper = TrainStep(model, LogLinearNoise(), "ar_forward")
    stepper.micro_batch(x, weight=1.0)
    grads = [p.grad.clone() for p in params]
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    before = [p.detach().clone() for p in params]
    stepper.update(torch.optim.SGD(params, lr=123.0), params, lr=0.5, max_norm=max_norm, step=1)
    factor = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
    assert norm > 0.01  # the 0.01 case really clips
    for p, p0, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * factor * g, rtol=1e-5, atol=1e-8)
        assert p.grad is None
    assert stepper.read().grad_norm == pytest.approx(norm, rel=1e-5)


def test_the_loop_logs_the_pre_clip_norm_and_passes_grad_clip(tmp_path, monkeypatch):
    seen = []
    real = TrainStep.update

    def spy(self, optimizer, params, lr, max_norm, step, scaler=None):
        grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
        seen.append((torch.cat(grads).norm().item(), max_norm))
        return real(self, optimizer, params, lr, max_norm, step, scaler)

    monkeypatch.setattr(TrainStep, "update", spy)
    cfg = tiny_config(tmp_path, training={"n_iters": 2, "snapshot_freq": 2, "snapshot_freq_for_preemption": 2,
                                          "eval_freq": 100, "accum": 1},
                      optim={"lr": 1e-3, "warmup": 0, "grad_clip": 0.05})
    train(cfg, run_dir=tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in logged if "grad_norm" in r]
    assert len(seen) == 2 and len(norms) == 2
    for (before, max_norm), logged_norm in zip(seen, norms):
        assert max_norm == 0.05 and before > 0.05
        assert logged_norm == pytest.approx(before, rel=1e-5)


# ------------------------------------------------------------------ EMA recursion
def test_ema_update_closed_form_and_swaps():
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    frozen = torch.nn.Parameter(torch.tensor([7.0]), requires_grad=False)
    ema = ExponentialMovingAverage([p, frozen], decay=0.5)
    assert len(ema.shadow_params) == 1  # only trainable parameters are averaged
    shadow = torch.tensor([0.0, 10.0])
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        ema.update([p, frozen])
        decay = min(0.5, (1 + n) / (10 + n))
        shadow = shadow - (1 - decay) * (shadow - value)
        torch.testing.assert_close(ema.shadow_params[0], shadow, rtol=1e-6, atol=1e-6)
    assert ema.num_updates == 5
    with torch.no_grad():
        p.copy_(torch.tensor([-1.0, -2.0]))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.average_parameters([p]):
            torch.testing.assert_close(p.detach(), shadow)
            raise RuntimeError("boom")
    torch.testing.assert_close(p.detach(), torch.tensor([-1.0, -2.0]))  # restored after the error
    ema.copy_to([p, frozen])
    torch.testing.assert_close(p.detach(), shadow)
    assert frozen.item() == 7.0


def test_ema_decay_schedule_caps_at_the_configured_decay():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = ExponentialMovingAverage([p], decay=0.9999)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])  # n = 1: decay (1 + 1) / (10 + 1) = 2/11
    assert ema.shadow_params[0].item() == pytest.approx(1 - 2 / 11, rel=1e-6)
    full = ExponentialMovingAverage([p], decay=1.0)
    for _ in range(3):
        full.update([p])
    assert full.shadow_params[0].item() == pytest.approx(1.0)  # (1+n)/(10+n) < 1 still moves it
    still = ExponentialMovingAverage([torch.nn.Parameter(torch.zeros(1))], decay=0.0)
    still.update([p])
    assert still.shadow_params[0].item() == 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\]"):
            ExponentialMovingAverage([p], decay=bad)


def test_ema_state_round_trip_and_errors():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = ExponentialMovingAverage([p], decay=0.75)
    ema.update([p])
    state = ema.state_dict()
    assert set(state) == {"decay", "num_updates", "shadow_params"} and state["num_updates"] == 1
    other = ExponentialMovingAverage([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], decay=0.1)
    other.load_state_dict({"decay": 0.75, "num_updates": 4, "shadow_params": [torch.tensor([5.0, 6.0])]})
    assert other.decay == 0.75 and other.num_updates == 4
    assert other.shadow_params[0].dtype == torch.float64 and other.shadow_params[0].tolist() == [5.0, 6.0]
    for key in ("decay", "num_updates", "shadow_params"):
        broken = {k: v for k, v in state.items() if k != key}
        with pytest.raises(KeyError, match=f"EMA state has no '{key}'"):
            ema.load_state_dict(broken)
    with pytest.raises(ValueError, match="EMA state holds 2 tensors, the model has 1 trainable parameters"):
        ema.load_state_dict({**state, "shadow_params": [torch.zeros(2), torch.zeros(2)]})
    assert math.isfinite(ema.shadow_params[0].sum().item())


def test_ema_restore_before_any_store_leaves_the_weights():
    p = torch.nn.Parameter(torch.tensor([3.0]))
    ema = ExponentialMovingAverage([p], decay=0.5)
    ema.restore([p])  # nothing stored yet: a no-op, not an error
    assert p.item() == 3.0
