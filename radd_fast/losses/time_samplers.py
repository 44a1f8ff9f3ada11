"""Time samplers (docs/LOSSES.md): one time (or masking rate) per sequence of a batch, in [0, 1).

- ``naive``:     iid uniform.
- ``vdm``:       ``t_j = (u0 + j/B) mod 1``, one ``u0`` per batch (stratified, low variance).
- ``decoupled``: ``t_j = (u_j + j) / B``, one uniform per sequence inside its own stratum.

Draws happen on ``device`` from ``generator`` (None: the device's default generator). The
eager losses draw on the batch's device (no host-to-device copy per step); the static
training step (``losses.static_rows``) draws on the host, so that it knows the number of
masked rows without waiting for the device.
"""
from __future__ import annotations

import torch


def naive(batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.rand(batch_size, device=device, generator=generator)


def vdm(batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    u0 = torch.rand(1, device=device, generator=generator)
    return (u0 + torch.arange(batch_size, device=device) / batch_size) % 1


def decoupled(batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(batch_size, device=device, generator=generator)
    return (u + torch.arange(batch_size, device=device)) / batch_size


TIME_SAMPLERS = {"naive": naive, "vdm": vdm, "decoupled": decoupled}


def get_time_sampler(name: str):
    """'naive' | 'vdm' | 'decoupled' -> fn(batch_size, device, generator=None) -> [B] fp32 in [0, 1)."""
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; expected one of {sorted(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name]
