"""The swappable units of a RADD block: layer norm, rotary, attention, one class per backend.

A model holds one ``Ops`` class, picked by name from ``BACKENDS`` with :func:`get_ops`;
both share these signatures, so the block code is the same for every backend.

``reference`` (:class:`ReferenceOps`): plain PyTorch, the oracle every fast path is
tested against. Each unit is the kernel module's ``<op>_ref`` (rotary in the published
precision) or, for attention, PyTorch's SDPA through the kernels' dispatcher.

``fast`` (:class:`FastOps`): Triton kernels.

- layer norm writes its output directly in the autocast dtype (bf16: the next
  GEMM reads half the bytes) while the residual stream stays fp32;
- the residual add (+ dropout) and the following layer norm are one pass;
- attention with rotary is one call to the kernels' dispatcher, which decides
  whether rotary is fused into the attention kernel or run first.
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
import torch.nn.functional as F

from ..kernels.attention import attention
from ..kernels.layer_norm import add_layer_norm, layer_norm, layer_norm_ref
from ..kernels.rotary import apply_rotary_qkv, apply_rotary_qkv_ref


class ReferenceOps:
    """Plain PyTorch, following the published computation step by step."""

    name = "reference"

    @staticmethod
    def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
        """LayerNormWot: x [..., d] -> fp32 [..., d], statistics in fp32."""
        return layer_norm_ref(x, weight, bias, eps)

    @staticmethod
    def add_layer_norm(x, delta, weight, bias, dropout_p: float, training: bool, eps: float = 1e-5):
        """x + dropout(delta), and its layer norm: (new_x [B,T,d], normed [B,T,d]).

        The published residual add: dropout in delta's own dtype (bf16 under autocast), where
        the kernel's ``add_layer_norm_ref`` drops out in fp32 to match the kernel.
        """
        x = x + F.dropout(delta, dropout_p, training)
        return x, layer_norm_ref(x, weight, bias, eps)

    @staticmethod
    def rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Half-split rotary on q and k of qkv [B,T,3,h,hd]; cos, sin: [T, hd/2] fp32."""
        return apply_rotary_qkv_ref(qkv, cos, sin, published_precision=True)

    @staticmethod
    def attention(qkv: torch.Tensor) -> torch.Tensor:
        """Non-causal softmax(q k^T / sqrt(hd)) v: qkv [B,T,3,h,hd] -> [B,T,h,hd], PyTorch's SDPA."""
        return attention(qkv, impl="sdpa")

    @classmethod
    def attention_with_rotary(cls, qkv, cos, sin, overwrite_qkv: bool = False):
        """Rotary on q, k, then attention. overwrite_qkv: the caller allows qkv to be rotated in
        place (the reference never does: it follows the published out-of-place computation)."""
        return cls.attention(cls.rotary(qkv, cos, sin))


def _activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the next matmul will run in: the autocast dtype when autocast is on."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class FastOps:
    """Triton kernels (each falls back to its reference where Triton cannot run)."""

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
        return attention(qkv)

    @staticmethod
    def attention_with_rotary(qkv, cos, sin, overwrite_qkv: bool = False):
        return attention(qkv, cos=cos, sin=sin, overwrite_qkv=overwrite_qkv)


BACKENDS = {"reference": ReferenceOps, "fast": FastOps}


AUTO = "auto"  # the fast backend on CUDA, the reference one elsewhere (re-decided when the model moves)


def resolve_backend(backend: str, device: torch.device) -> str:
    """A backend name for ``device``: ``auto`` becomes ``fast`` on CUDA and ``reference`` elsewhere."""
    if backend == AUTO:
        return "fast" if device.type == "cuda" else "reference"
    get_ops(backend)  # a clear error for an unknown name
    return backend


def get_ops(backend: str):
    """The ops class of ``backend``, one of ``BACKENDS``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)} (or {AUTO})")
    return BACKENDS[backend]
