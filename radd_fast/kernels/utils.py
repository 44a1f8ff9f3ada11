"""Shared helpers for the Triton kernels: when to run them, and launcher checks.

A kernel runs when its input lives on a CUDA device, or on the CPU when the
Triton interpreter is on (``TRITON_INTERPRET=1``, read by Triton at import time;
set it before ``import triton``). Elsewhere the callers use the ``*_ref`` path.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Union

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


# The dtypes every kernel takes as input (fp64 is left to the references).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Message = Union[str, Callable[[], str]]


def require(ok: bool, message: Message) -> None:
    """Raise a ValueError naming the problem before a launch, never deep inside it.

    ``message`` is a string or a zero-argument callable; a callable is called only on
    failure, so launchers that run every step do not format strings they never show.
    """
    if not ok:
        raise ValueError(message() if callable(message) else message)


def require_dtype(name: str, dtype: torch.dtype, dtypes: tuple = SUPPORTED_DTYPES) -> None:
    """``dtype`` (of the tensor or output called ``name``) is one of ``dtypes``."""
    require(dtype in dtypes, lambda: f"{name}: dtype {dtype} not supported (use one of {dtypes})")


def require_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    require(t.device == device, lambda: f"{name}: on {t.device}, expected {device}")


def require_tensor(name: str, t: torch.Tensor, shape: Optional[tuple] = None, meaning: str = "",
                   dtypes: Optional[tuple] = SUPPORTED_DTYPES, last_dim: Optional[str] = "last dim",
                   device: Optional[torch.device] = None) -> None:
    """The launcher checks on one tensor argument ``name``, in this order (None skips a check):

    ``shape``: exactly this shape (``meaning``, e.g. ``" = [T, hd/2]"``, is added to the message);
    ``dtypes``: its dtype is one of these; ``last_dim``: unit stride along the last dim (the
    kernels index it as ``base + arange``; size 1 is fine), the dim's name for the message;
    ``device``: it lives there.
    """
    if shape is not None:
        require(tuple(t.shape) == tuple(shape),
                lambda: f"{name}: expected shape {tuple(shape)}{meaning}, got {tuple(t.shape)}")
    if dtypes is not None:
        require_dtype(name, t.dtype, dtypes)
    if last_dim is not None:
        require(t.stride(-1) == 1 or t.shape[-1] == 1,
                lambda: f"{name}: the {last_dim} must be contiguous (stride {t.stride(-1)})")
    if device is not None:
        require_device(name, t, device)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
