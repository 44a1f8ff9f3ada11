"""The paths a kernel module's public functions can take, and switches that force each one.

A kernel module runs its Triton kernel where Triton can run (CUDA, or the CPU under
``TRITON_INTERPRET=1``), its PyTorch fallback elsewhere, and its ``torch.library`` custom ops
where ``torch.compile`` traces it. The CPU suite runs with the interpreter on, so the other two
paths are taken only when a test forces them, with these.
"""
from __future__ import annotations

import pytest
import torch

from radd_fast.kernels.utils import HAS_TRITON, triton_runs_on

PATHS = ["kernel", "fallback", "custom_op"]

# Triton on CPU tensors: tests that build their inputs on the CPU (the interpreter's device).
needs_triton_on_cpu = pytest.mark.skipif(not (HAS_TRITON and triton_runs_on(torch.empty(0))),
                                         reason="Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")


def take_path(monkeypatch, module, path: str) -> None:
    """Route ``module``'s public functions down ``path``: the Triton kernel (interpreter on CPU),
    the PyTorch fallback (Triton 'cannot run'), or the torch.library custom ops torch.compile
    calls (``is_compiling`` true; custom ops run eagerly too)."""
    if path == "fallback":
        monkeypatch.setattr(module, "triton_runs_on", lambda t: False)
    elif path == "custom_op":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


@pytest.fixture
def no_triton(monkeypatch):
    """Triton cannot run on CPU tensors inside the test (the interpreter is off:
    ``kernels.utils.interpreter_on`` reads the environment at every call)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_runs_on(torch.zeros(1))
    return monkeypatch


def with_interpreter(monkeypatch, fn):
    """fn() with the interpreter on (the kernel path), back off afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        return fn()
    finally:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
