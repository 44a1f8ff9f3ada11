"""The ``fast`` backend: the same units as ``ReferenceOps``, computed by Triton kernels.

- layer norm writes its output directly in the autocast dtype (bf16: the next
  GEMM reads half the bytes) while the residual stream stays fp32;
- the residual add (+ dropout) and the following layer norm are one pass;
- rotary is fused into the Triton attention kernel's q/k loads when that
  kernel is picked, else one rotary kernel runs before SDPA / flash-attn.
Where Triton cannot run (CPU without ``TRITON_INTERPRET=1``), every kernel
function falls back to its reference, so the fast backend is always usable.

Under ``torch.compile`` the layer norms are left to inductor, which fuses them
with the residual add and the casts around them: on an H200 (2026-11-27,
benchmarks/results/layer_norm_h200_*) the compiled fp32-in / bf16-out norm
took 0.47 ms at [32768, 768] fwd+bwd against 0.74 ms for our opaque custom op.
Rotary and attention stay custom ops (ours beat inductor there).
"""
from __future__ import annotations

import torch

from ..kernels import attention as attention_kernels
from ..kernels.layer_norm import add_layer_norm, layer_norm
from ..kernels.rotary import apply_rotary_qkv
from .ops import ReferenceOps


def _activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the next matmul will run in: the autocast dtype when autocast is on."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class FastOps:
    name = "fast"

    @staticmethod
    def layer_norm(x, weight, bias, eps: float = 1e-5):
        if torch.compiler.is_compiling():  # fp32 out; inductor fuses the cast into the next matmul's input
            return ReferenceOps.layer_norm(x, weight, bias, eps)
        return layer_norm(x, weight, bias, eps, out_dtype=_activation_dtype(x))

    @staticmethod
    def add_layer_norm(x, delta, weight, bias, dropout_p: float, training: bool, eps: float = 1e-5):
        if torch.compiler.is_compiling():
            return ReferenceOps.add_layer_norm(x, delta, weight, bias, dropout_p, training, eps)
        return add_layer_norm(x, delta, weight, bias, dropout_p, training, eps, out_dtype=_activation_dtype(x))

    @staticmethod
    def rotary(qkv, cos, sin):
        return apply_rotary_qkv(qkv, cos, sin)

    @staticmethod
    def attention(qkv):
        return attention_kernels.attention(qkv)

    @staticmethod
    def attention_with_rotary(qkv, cos, sin):
        impl = attention_kernels.get_attention_impl()
        if impl == "auto":
            impl = attention_kernels._pick_impl(qkv)
        if impl == "triton":  # rotary fused into the kernel's q/k loads
            return attention_kernels.attention(qkv, impl="triton", cos=cos, sin=sin)
        return attention_kernels.attention(apply_rotary_qkv(qkv, cos, sin), impl=impl)
