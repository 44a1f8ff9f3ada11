"""Shared helpers for the Triton kernels: when to run them, and launcher checks.

A kernel runs when its input lives on a CUDA device, or on the CPU when the
Triton interpreter is on (``TRITON_INTERPRET=1``, read by Triton at import time;
set it before ``import triton``). Elsewhere the callers use the ``*_ref`` path.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Tuple, Union

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


# ----------------------------------------------------------------------------- per-card limits
# The largest shared memory one block may use (bytes), by compute capability: the "maximum
# shared memory per thread block" (opt-in) of the CUDA C++ Programming Guide's table of
# technical specifications. Triton refuses a launch whose kernel needs more (OutOfResources).
# Used where the driver's own number is unavailable (older torch) and by the CPU tests.
SMEM_PER_BLOCK_OPTIN = {
    (8, 0): 163 * 1024,  # A100, A30 (164 KB per SM)
    (8, 6): 99 * 1024,  # RTX 30xx, A10, A40 (100 KB per SM)
    (8, 7): 163 * 1024,  # Jetson Orin
    (8, 9): 99 * 1024,  # L4, L40S, RTX 40xx (100 KB per SM)
    (9, 0): 227 * 1024,  # H100, H200 (228 KB per SM)
    (10, 0): 227 * 1024,  # B200
    (12, 0): 99 * 1024,  # RTX 50xx
}
# the cards tools/aot_build.py builds for and the tests check, by their target number
CARD_CAPABILITIES = {80: (8, 0), 89: (8, 9), 90: (9, 0)}
# The capability the launch configurations were tuned on (an H200): its choices are kept as they are.
TUNED_CAPABILITY = (9, 0)


def smem_limit_of(capability: Tuple[int, int]) -> int:
    """Shared memory per block (bytes) of a compute capability; an unknown one gets the
    smallest limit of its major version in the table (99 KB when the major is unknown too)."""
    if capability in SMEM_PER_BLOCK_OPTIN:
        return SMEM_PER_BLOCK_OPTIN[capability]
    same_major = [v for (major, _), v in SMEM_PER_BLOCK_OPTIN.items() if major == capability[0]]
    return min(same_major) if same_major else 99 * 1024


@functools.lru_cache(maxsize=None)
def _card_of_cuda(index: int) -> Tuple[Tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    # the driver's own number where this torch exposes it; the table otherwise
    smem = getattr(props, "shared_memory_per_block_optin", 0) or smem_limit_of(capability)
    return capability, int(smem)


def card_of(device: torch.device) -> Tuple[Tuple[int, int], int]:
    """``(capability, shared memory per block in bytes)`` of the CUDA device ``device``.

    Read once per device (cached): the launchers call it on every launch.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _card_of_cuda(index)


def tensor_core_pipeline(capability: Tuple[int, int], dtype: torch.dtype) -> bool:
    """True where Triton's 16-bit dots use a multi-buffered tensor-core pipeline (wgmma on sm_90).

    It keeps ``num_stages`` copies of a loop's tiles in shared memory; the cp.async
    pipeline of sm_80 / sm_89 (and every fp32 IEEE dot) keeps ``num_stages - 1``. Newer
    cards (sm_100, sm_120), never built here, are counted like sm_90: the larger estimate.
    """
    return capability[0] >= 9 and dtype in (torch.float16, torch.bfloat16)


def pipeline_buffers(capability: Tuple[int, int], dtype: torch.dtype, num_stages: int) -> int:
    """How many copies of a loop's loaded tiles the software pipeline keeps in shared memory."""
    return max(1, num_stages if tensor_core_pipeline(capability, dtype) else num_stages - 1)


def first_fitting(candidates, smem_of, smem_limit: int):
    """The first launch configuration whose estimated shared memory ``smem_of(cfg)`` fits ``smem_limit``,
    else the last (the smallest) candidate."""
    for cfg in candidates:
        if smem_of(cfg) <= smem_limit:
            return cfg
    return candidates[-1]
