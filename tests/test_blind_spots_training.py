"""Optimizer mechanics and EMA against hand-computed values (issue 17).

The training tests compare a run with itself (straight vs resumed, one rank vs two); these check
the mechanics directly: the clipped norm, the warmed-up lr, the first AdamW step in closed form,
micro-batch accumulation equal to the global-batch gradient, the grad norm the loop logs, and
the EMA recursion.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from radd_fast import ExponentialMovingAverage
from radd_fast.distributed import DistEnv
from radd_fast.training import loop as loop_module
from radd_fast.training import train
from radd_fast.training.config import OptimConfig
from radd_fast.training.optim import apply_update, build_optimizer, lr_at, unscale_and_clip

from .train_helpers import tiny_config


def params_with_grads(grads: list[list[float]]) -> list[torch.nn.Parameter]:
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.ones(len(g)))
        p.grad = torch.tensor(g)
        out.append(p)
    return out


def no_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=False)


# ------------------------------------------------------------------ clip, lr, step
@pytest.mark.parametrize("clip,expected_factor", [(1.0, 1 / 13), (13.0, 1.0), (26.0, 1.0), (6.5, 0.5), (0.0, 1.0),
                                                  (-1.0, 1.0)])
def test_unscale_and_clip_returns_the_pre_clip_norm_and_clips_to_max(clip, expected_factor):
    grads = [[3.0, 4.0], [12.0]]  # global norm sqrt(9 + 16 + 144) = 13
    params = params_with_grads(grads)
    opt = torch.optim.SGD(params, lr=123.0)
    norm = unscale_and_clip(opt, no_scaler(), params, step=3, cfg=OptimConfig(lr=0.5, warmup=4, grad_clip=clip))
    assert norm == pytest.approx(13.0, rel=1e-6)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, torch.tensor(g) * expected_factor, rtol=1e-5, atol=1e-7)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 3 / 4)


def test_unscale_and_clip_unscales_a_loss_scaler_first():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((p * torch.tensor([3.0, 4.0])).sum()).backward()  # grad [3, 4] * 1024
    norm = unscale_and_clip(opt, scaler, [p], step=1, cfg=OptimConfig(lr=1.0, warmup=0, grad_clip=2.5))
    assert norm == pytest.approx(5.0, rel=1e-6)
    torch.testing.assert_close(p.grad, torch.tensor([1.5, 2.0]), rtol=1e-5, atol=0)
    apply_update(opt, scaler)
    torch.testing.assert_close(p.detach(), torch.tensor([-1.5, -2.0]), rtol=1e-5, atol=0)
    assert p.grad is None


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
    unscale_and_clip(opt, no_scaler(), [p], step=1, cfg=cfg)  # norm 4.01 > 1: clipped to norm 1
    g = g / g.norm()
    p0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    apply_update(opt, no_scaler())
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


# ------------------------------------------------------------------ accumulation
class SquaredError(torch.nn.Module):
    """Per-sequence loss [B] = sum_j (w . x_ij)^2 / 10: deterministic, so gradients can be compared."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))

    def forward(self, x):
        return (x.double() @ self.w).pow(2).sum(-1) / 10


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_accumulated_gradient_equals_the_global_batch_gradient(accum):
    x = torch.randn(8, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = SquaredError()
    full(x).mean().backward()
    acc = SquaredError()
    micro = [(j, chunk) for j, chunk in enumerate(x.chunk(accum))]
    loss = loop_module._accumulate(acc, micro, no_scaler(), step=0, seed=0, env=DistEnv())
    assert loss == pytest.approx(float(full(x).detach().mean()), rel=1e-12)
    torch.testing.assert_close(acc.w.grad, full.w.grad, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ the loop: clip and logged norm
def test_the_loop_clips_and_logs_the_pre_clip_norm(tmp_path, monkeypatch):
    """Record the gradient the loop built (before clipping) and after: the logged grad_norm is the
    former's norm, the update used the latter (norm <= grad_clip)."""
    seen = []
    real = loop_module.unscale_and_clip

    def spy(optimizer, scaler, params, step, cfg):
        before = torch.cat([p.grad.detach().flatten() for p in params if p.grad is not None]).norm().item()
        norm = real(optimizer, scaler, params, step, cfg)
        after = torch.cat([p.grad.detach().flatten() for p in params if p.grad is not None]).norm().item()
        seen.append((before, norm, after))
        return norm

    monkeypatch.setattr(loop_module, "unscale_and_clip", spy)
    cfg = tiny_config(tmp_path, training={"n_iters": 2, "snapshot_freq": 2, "snapshot_freq_for_preemption": 2,
                                          "eval_freq": 100, "accum": 1},
                      optim={"lr": 1e-3, "warmup": 0, "grad_clip": 0.05})
    train(cfg, run_dir=tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in logged if "grad_norm" in r]
    assert len(seen) == 2 and len(norms) == 2
    for (before, norm, after), logged_norm in zip(seen, norms):
        assert norm == pytest.approx(before, rel=1e-5) and logged_norm == pytest.approx(before, rel=1e-5)
        assert before > 0.05 and after == pytest.approx(0.05, rel=1e-4)


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
