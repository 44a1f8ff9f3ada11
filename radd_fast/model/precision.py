"""Compute precision of the model: the autocast dtype and its context.

The compute dtype is an explicit option (``RADD(dtype=...)`` / ``set_compute_dtype``),
never a consequence of the kernel backend: unset, it is fp32 off CUDA (the
published autocast is CUDA-only) and the config's ``model.dtype`` on CUDA.
"""
from __future__ import annotations

import contextlib

import torch

from ..config import parse_dtype


def default_compute_dtype(device: torch.device, config_dtype: str) -> torch.dtype:
    """fp32 off CUDA; the config's dtype (bf16 by default) on CUDA."""
    if device.type != "cuda":
        return torch.float32
    return parse_dtype(config_dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` to ``dtype`` on ``device``; no context at all for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
