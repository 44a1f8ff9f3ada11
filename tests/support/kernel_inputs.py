"""Random inputs of the kernels' shapes, shared by the kernel tests that build the same problems."""
from __future__ import annotations

import torch

from tests.support.compare import DEVICE


def make_qkv(B, T, h, hd, dtype=torch.float32, device=DEVICE):
    """Packed attention input: qkv [B, T, 3, h, hd] ~ N(0, 1)."""
    return torch.randn(B, T, 3, h, hd, device=device, dtype=dtype)


def loss_head_problem(N, d, C, dtype=torch.float32, bias=True, device=DEVICE):
    """The fused loss head's inputs: rows x [N, d], weight [C, d] (scaled so logits spread), bias [C], targets [N]."""
    x = torch.randn(N, d, device=device).to(dtype)
    w = (torch.randn(C, d, device=device) / d**0.5).mul(2.0).to(dtype)
    b = torch.randn(C, device=device).to(dtype) if bias else None
    t = torch.randint(0, C, (N,), device=device)
    return x, w, b, t
