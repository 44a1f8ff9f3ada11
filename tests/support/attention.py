"""What the attention tests share: rotary tables as the model builds them, CPU inputs for the
interpreter, and a call's output with its qkv gradient."""
from __future__ import annotations

import torch

from tests.support.compare import DEVICE
from tests.support.kernel_inputs import make_qkv


def rotary_tables(T: int, hd: int, device=DEVICE):
    """cos, sin: [T, hd/2] fp32, as the model builds them (RADD_SPEC 2.2), unique half only."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def qkv_of(B=1, T=4, h=2, hd=32, dtype=torch.float32):
    return make_qkv(B, T, h, hd, dtype, device="cpu")  # the interpreter's device


def grads(fn, qkv, dout):
    """fn(qkv) and the gradient of <fn(qkv), dout> with respect to qkv."""
    x = qkv.detach().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x, dout)
    return out.detach(), g
