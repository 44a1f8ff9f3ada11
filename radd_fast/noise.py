"""Noise schedules (docs/MODEL.md, noise schedules): sigma(t) and its time derivative.

A token is masked at time t with probability 1 - exp(-sigma(t)). Calling a
schedule returns ``(sigma, dsigma)`` like the published ``noise(t)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import NoiseConfig


class Noise(nn.Module):
    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total_noise(t), self.rate_noise(t)

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - exp(-sigma(t))."""
        return -torch.expm1(-self.total_noise(t))


class LogLinearNoise(Noise):
    """sigma(t) = -log(1 - (1 - eps) t): the masked fraction grows linearly to 1 - eps."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    def total_noise(self, t):
        return -torch.log1p(-(1 - self.eps) * t)

    def rate_noise(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * t)


class GeometricNoise(Noise):
    """sigma(t) = sigma_min^(1-t) sigma_max^t."""

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 1.0):
        super().__init__()
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def total_noise(self, t):
        return self.sigma_min ** (1 - t) * self.sigma_max ** t

    def rate_noise(self, t):
        return self.total_noise(t) * (math.log(self.sigma_max) - math.log(self.sigma_min))


def get_noise(config) -> Noise:
    """Schedule from a NoiseConfig, a RADDConfig, or a published config dict."""
    cfg = getattr(config, "noise", config)
    if isinstance(cfg, dict) or not isinstance(cfg, NoiseConfig):
        cfg = NoiseConfig(**{k: v for k, v in dict(cfg).items() if k in ("type", "sigma_min", "sigma_max", "eps")})
    if cfg.type == "loglinear":
        return LogLinearNoise(cfg.eps)
    if cfg.type == "geometric":
        return GeometricNoise(cfg.sigma_min, cfg.sigma_max)
    raise ValueError(f"unknown noise type {cfg.type!r}")  # NoiseConfig validation makes this unreachable
