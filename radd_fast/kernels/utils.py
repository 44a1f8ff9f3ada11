"""Shared helpers for the Triton kernels: when to run them, and launcher checks.

A kernel runs when its input lives on a CUDA device, or on the CPU when the
Triton interpreter is on (``TRITON_INTERPRET=1``, read by Triton at import time;
set it before ``import triton``). Elsewhere the callers use the ``*_ref`` path.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is a Linux dependency; the package still imports without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAS_TRITON = False


def interpreter_on() -> bool:
    """True when Triton kernels execute through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """True when a Triton kernel can be launched on tensor ``t``'s device."""
    return HAS_TRITON and (t.is_cuda or (t.device.type == "cpu" and interpreter_on()))


def check(condition: bool, message: str) -> None:
    """Raise a ValueError naming the problem before a launch, never deep inside it."""
    if not condition:
        raise ValueError(message)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
