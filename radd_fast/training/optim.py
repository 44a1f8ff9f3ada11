"""Optimizer (docs/TRAINING.md): AdamW / Adam, fused wherever torch has the kernels, and the linear warmup of its lr.

The update itself (unscale, warmed-up lr, clip, step gated on device for a non-finite
gradient, scale update) is ``training.step.TrainStep.update``. The step number used for
the lr is the one being taken (1 for the first step).

Fused Adam(W) is what makes that gate a device operation (its ``found_inf``): it is used on
every device whose torch has the kernels (CUDA; CPU since torch 2.4; MPS, XPU, ...), decided
by asking torch (``fused_available``), not by the device's type, so a CPU run, and so the
whole CPU test suite, takes the same update path as a GPU run. A device without them gets
the for-each optimizer and a host check per step, said in one log line.
"""
from __future__ import annotations

import functools
import logging

import torch

from .config import OptimConfig

log = logging.getLogger(__name__)


def build_optimizer(params, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    kind = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[cfg.optimizer]
    fused = fused_available(torch.device(device))
    if not fused:
        log.info("no fused %s kernels for %s in torch %s: the update checks for a non-finite step on the host "
                 "(one sync per step)", cfg.optimizer, device, torch.__version__)
    return kind(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                fused=fused)


@functools.cache
def fused_available(device: torch.device) -> bool:
    """Whether this torch runs fused Adam(W) on ``device``: one step of a one-element parameter there."""
    try:
        probe = torch.zeros(1, device=device, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
    except (RuntimeError, NotImplementedError, AssertionError):  # no kernel, or no such device here
        return False
    return True


def lr_at(step: int, cfg: OptimConfig) -> float:
    """lr * min(step / warmup, 1): linear warmup, then constant."""
    return cfg.lr * min(step / cfg.warmup, 1.0) if cfg.warmup > 0 else cfg.lr
