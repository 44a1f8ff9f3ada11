"""Time samplers (docs/LOSSES.md): one time (or masking rate) per sequence of a batch, in [0, 1).

- ``naive``:     iid uniform.
- ``vdm``:       ``t_j = (u0 + j/B) mod 1``, one ``u0`` per batch (stratified, low variance).
- ``decoupled``: ``t_j = (u_j + j) / B``, one uniform per sequence inside its own stratum.

Draws happen on ``device`` (no host-to-device copy per step).
"""
from __future__ import annotations

import torch


def naive(batch_size: int, device) -> torch.Tensor:
    return torch.rand(batch_size, device=device)


def vdm(batch_size: int, device) -> torch.Tensor:
    u0 = torch.rand(1, device=device)
    return (u0 + torch.arange(batch_size, device=device) / batch_size) % 1


def decoupled(batch_size: int, device) -> torch.Tensor:
    u = torch.rand(batch_size, device=device)
    return (u + torch.arange(batch_size, device=device)) / batch_size


TIME_SAMPLERS = {"naive": naive, "vdm": vdm, "decoupled": decoupled}


def get_time_sampler(name: str):
    """'naive' | 'vdm' | 'decoupled' -> fn(batch_size, device) -> [B] fp32 in [0, 1)."""
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; expected one of {sorted(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name]
