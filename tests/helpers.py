"""Comparison helpers shared by the tests: errors relative to PyTorch's own."""
from __future__ import annotations

import pytest
import torch

POISON = float("nan")
# Kernel tests run on the GPU when present, else on CPU tensors through the Triton interpreter.
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="bf16/fp16 need CUDA: the Triton interpreter is unreliable for half types")


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN (or the dtype's max for ints): unwritten elements fail."""
    if t.is_floating_point():
        return torch.full_like(t, POISON)
    return torch.full_like(t, torch.iinfo(t.dtype).max)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||, in float64; NaN anywhere gives inf."""
    a64, r64 = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a64).all():
        return float("inf")
    return ((a64 - r64).norm() / r64.norm().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5, name: str = "") -> None:
    """torch.testing.assert_close with a message that says where the worst mismatch is."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{name}: non-finite values (unwritten output?) at {(~torch.isfinite(a)).nonzero()[:5].tolist()}"
    diff = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = diff > tol
    if bad.any():
        idx = diff.sub(tol).flatten().argmax().item()
        where = list(torch.unravel_index(torch.tensor(idx), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off; worst at {[int(w) for w in where]}: "
            f"got {a.flatten()[idx].item():.6g}, expected {e.flatten()[idx].item():.6g} "
            f"(max abs diff {diff.max().item():.3g}, atol {atol}, rtol {rtol})"
        )


def assert_within_torch_error(fast: torch.Tensor, ref32: torch.Tensor, torch_same_dtype: torch.Tensor, factor: float = 2.0, atol: float = 1e-6, name: str = "") -> None:
    """Low-precision check: err(fast, ref_fp32) <= factor * err(torch_same_dtype, ref_fp32) + atol."""
    e_fast, e_torch = rel_err(fast, ref32), rel_err(torch_same_dtype, ref32)
    assert e_fast <= factor * e_torch + atol, f"{name}: rel err {e_fast:.3g} > {factor} x torch's {e_torch:.3g} + {atol}"
