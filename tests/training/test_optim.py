"""The optimizer and its schedule (radd_fast/training/optim.py) against hand-computed values: the
warmed-up lr, the first Adam / AdamW step in closed form, the fused kernels wherever torch has them
(CPU included), decided by asking torch, and the for-each optimizer with a log line where it has not.
The schedule as applied: the lr the optimizer steps with during real runs, a resumed one included."""
from __future__ import annotations

import logging

import pytest
import torch

from radd_fast.training import loop as loop_module
from radd_fast.training import train
from radd_fast.training.config import OptimConfig
from radd_fast.training.optim import build_optimizer, fused_available, lr_at
from tests.support.runs import metric_records, tiny_config


def test_warmup_schedule():
    cfg = OptimConfig(lr=1.0, warmup=4)
    assert [lr_at(s, cfg) for s in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_at(1, OptimConfig(lr=0.5, warmup=0)) == 0.5


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


def test_fused_wherever_torch_has_the_kernels(caplog):
    """Fused AdamW / Adam on CPU (torch >= 2.4 has the kernels): the update path the GPU takes. A device
    without them (meta here; CUDA in a CPU build) gets the for-each optimizer, said in one log line."""
    for kind in ("AdamW", "Adam"):
        cfg = OptimConfig(optimizer=kind)
        assert build_optimizer([torch.nn.Parameter(torch.ones(2))], cfg, torch.device("cpu")).defaults["fused"] is True
        with caplog.at_level(logging.INFO, logger="radd_fast.training.optim"):
            opt = build_optimizer([torch.nn.Parameter(torch.ones(2, device="meta"))], cfg, torch.device("meta"))
        assert opt.defaults["fused"] is False
        assert caplog.messages[-1] == (f"no fused {kind} kernels for meta in torch {torch.__version__}: the update "
                                       f"checks for a non-finite step on the host (one sync per step)")
    assert fused_available(torch.device("cpu")) and not fused_available(torch.device("meta"))
    assert fused_available(torch.device("cuda")) == torch.cuda.is_available()


# ---- the schedule as applied: the lr the optimizer used, read back during real runs ---------------------------
class TestScheduleAsApplied:
    """``lr_at`` alone cannot see a loop that passes it the wrong step, sets the lr after the update, or
    restarts the warm-up on a resume. Here the lr of every parameter group is read off the optimizer at the
    moment it steps (a step pre-hook on the optimizer ``train`` builds), during in-process runs of the tiny
    config: warm-up 5 over 6 steps, so step 1, the last warm-up step (5) and one after it (6) are all seen,
    and a resume from step 2 lands inside the warm-up."""

    LR, WARMUP, STEPS = 4e-3, 5, 6

    def config(self, folder, n_iters: int) -> dict:
        cfg = tiny_config(folder, optim={"lr": self.LR, "warmup": self.WARMUP})
        cfg["training"].update(n_iters=n_iters, eval_freq=0, snapshot_freq=self.STEPS, snapshot_freq_for_preemption=2)
        return cfg

    def expected(self, steps) -> list:
        return [self.LR * min(s / self.WARMUP, 1.0) for s in steps]

    @staticmethod
    def recording(monkeypatch) -> list:
        """The lrs each optimizer ``train`` builds steps with, one list of per-group lrs per step."""
        used = []

        def build(*args, **kwargs):
            optimizer = build_optimizer(*args, **kwargs)
            optimizer.register_step_pre_hook(
                lambda opt, a, kw: used.append([float(g["lr"]) for g in opt.param_groups]))
            return optimizer

        monkeypatch.setattr(loop_module, "build_optimizer", build)
        return used

    def test_the_optimizer_steps_with_the_warmed_up_lr(self, tmp_path, monkeypatch):
        used = self.recording(monkeypatch)
        run = tmp_path / "run"
        history = train(self.config(tmp_path, self.STEPS), run)
        assert history["step"] == self.STEPS and len(used) == self.STEPS  # one optimizer step per training step
        want = self.expected(range(1, self.STEPS + 1))
        assert [lrs[0] for lrs in used] == pytest.approx(want, rel=1e-12, abs=0.0)
        assert all(len(set(lrs)) == 1 for lrs in used), f"parameter groups disagree: {used}"
        assert used[0][0] == pytest.approx(self.LR / self.WARMUP, rel=1e-12)  # step 1: lr / warmup, not 0
        assert used[self.WARMUP - 1][0] == used[self.WARMUP][0] == pytest.approx(self.LR, rel=1e-12)
        logged = {step: value for step, key, value in metric_records(run, keys=("lr",))}
        assert logged == {s: pytest.approx(w, rel=1e-12) for s, w in zip(range(1, self.STEPS + 1), want)}

    def test_a_resumed_run_continues_the_schedule(self, tmp_path, monkeypatch):
        """Stopped at step 2 and resumed: steps 3..6 step with lr_at(3..6), the LRs an uninterrupted run uses."""
        used = self.recording(monkeypatch)
        run = tmp_path / "run"
        train(self.config(tmp_path, 2), run)
        first = [lrs[0] for lrs in used]
        used.clear()
        history = train(self.config(tmp_path, self.STEPS), run)
        resumed = [lrs[0] for lrs in used]
        assert [s for s, _ in history["losses"]] == list(range(3, self.STEPS + 1))
        assert first == pytest.approx(self.expected([1, 2]), rel=1e-12, abs=0.0)
        assert resumed == pytest.approx(self.expected(range(3, self.STEPS + 1)), rel=1e-12, abs=0.0)
        logged = {step: value for step, key, value in metric_records(run, keys=("lr",))}
        assert logged == {s: pytest.approx(w, rel=1e-12) for s, w in zip(range(1, self.STEPS + 1),
                                                                            self.expected(range(1, self.STEPS + 1)))}
