"""Optimizer (docs/TRAINING.md): AdamW / Adam (fused on CUDA) and the linear warmup of its lr.

The update itself (unscale, warmed-up lr, clip, step gated on device for a non-finite
gradient, scale update) is ``training.step.TrainStep.update``. The step number used for
the lr is the one being taken (1 for the first step).
"""
from __future__ import annotations

import torch

from .config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    kind = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[cfg.optimizer]
    return kind(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                fused=device.type == "cuda")


def lr_at(step: int, cfg: OptimConfig) -> float:
    """lr * min(step / warmup, 1): linear warmup, then constant."""
    return cfg.lr * min(step / cfg.warmup, 1.0) if cfg.warmup > 0 else cfg.lr
