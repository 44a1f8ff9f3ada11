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
    """|actual - expected| <= atol + rtol |expected| at the finite entries of ``expected``, with a
    message that says where the worst mismatch is; non-finite entries must match exactly.

    Where ``expected`` holds NaN, ``actual`` must be NaN; where it holds +inf / -inf, the same
    infinity; where it is finite, ``actual`` must be finite (NaN in an unwritten output fails)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    _assert_same_non_finite(a, e, name)
    finite = torch.isfinite(e)
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    tol = atol + rtol * torch.where(finite, e.abs(), torch.zeros_like(e))
    bad = diff > tol
    if bad.any():
        idx = diff.sub(tol).flatten().argmax().item()
        where = list(torch.unravel_index(torch.tensor(idx), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off; worst at {[int(w) for w in where]}: "
            f"got {a.flatten()[idx].item():.6g}, expected {e.flatten()[idx].item():.6g} "
            f"(max abs diff {diff.max().item():.3g}, atol {atol}, rtol {rtol})"
        )


def _assert_same_non_finite(a: torch.Tensor, e: torch.Tensor, name: str) -> None:
    """NaN where expected is NaN, the same signed inf where it is inf, finite elsewhere (float64 [...])."""
    for label, got, want in (
        ("NaN", a.isnan(), e.isnan()),
        ("+inf", a == float("inf"), e == float("inf")),
        ("-inf", a == float("-inf"), e == float("-inf")),
    ):
        wrong = got != want
        if wrong.any():
            where = wrong.nonzero()[:5].tolist()
            raise AssertionError(f"{name}: {label} positions differ from the expected tensor's "
                                 f"({int(wrong.sum())} elements, first at {where}; unwritten output?)")


def assert_within_torch_error(fast: torch.Tensor, ref32: torch.Tensor, torch_same_dtype: torch.Tensor, factor: float = 2.0, atol: float = 1e-6, name: str = "") -> None:
    """Low-precision check: err(fast, ref_fp32) <= factor * err(torch_same_dtype, ref_fp32) + atol."""
    e_fast, e_torch = rel_err(fast, ref32), rel_err(torch_same_dtype, ref32)
    assert e_fast <= factor * e_torch + atol, f"{name}: rel err {e_fast:.3g} > {factor} x torch's {e_torch:.3g} + {atol}"
