"""Optimizer (spec 8): AdamW / Adam (fused on CUDA), linear warmup, grad-norm clipping, loss scaling.

Follows the published step: unscale, set the warmed-up lr, clip, step, update the scale
(split in two so the loop can refuse a non-finite update in between).
The step number used for the lr is the one being taken (1 for the first step).
"""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    kind = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[cfg.optimizer]
    return kind(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                fused=device.type == "cuda")


def lr_at(step: int, cfg: OptimConfig) -> float:
    """lr * min(step / warmup, 1): linear warmup, then constant."""
    return cfg.lr * min(step / cfg.warmup, 1.0) if cfg.warmup > 0 else cfg.lr


def unscale_and_clip(optimizer, scaler, params: list, step: int, cfg: OptimConfig) -> float:
    """First half of an update: unscale the gradients, set the warmed-up lr, clip.

    Returns the pre-clip gradient norm, so the caller can refuse a NaN / inf update before
    ``apply_update`` touches the weights.
    """
    scaler.unscale_(optimizer)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    return torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm).item()


def apply_update(optimizer, scaler) -> None:
    """Second half: the optimizer step (skipped by the scaler on inf fp16 gradients), then zero the grads."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
