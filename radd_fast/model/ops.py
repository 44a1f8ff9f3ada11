"""The swappable units of a RADD block: layer norm, rotary, attention.

A model holds one ``Ops`` object; the ``reference`` ops are plain PyTorch and
are the oracle every fast path is tested against. ``fast`` ops (Triton kernels)
live in ``fast_ops.py`` and share these signatures, so the block code is the
same for both backends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ReferenceOps:
    """Plain PyTorch, following the published computation step by step."""

    name = "reference"

    @staticmethod
    def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
        # LayerNormWot: statistics in fp32 with no affine inside, then * weight + bias (fp32 out).
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), x.shape[-1:], eps=eps) * weight + bias

    @classmethod
    def add_layer_norm(cls, x, delta, weight, bias, dropout_p: float, training: bool, eps: float = 1e-5):
        """x + dropout(delta), and its layer norm: (new_x [B,T,d], normed [B,T,d])."""
        x = x + F.dropout(delta, dropout_p, training)
        return x, cls.layer_norm(x, weight, bias, eps)

    @staticmethod
    def rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Half-split rotary on q and k of qkv [B,T,3,h,hd]; cos, sin: [T, hd/2] fp32."""
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            # Published: tables cast to qkv's dtype, the rotation computed in that dtype.
            cos = torch.cat([cos, cos], -1).to(qkv.dtype)[None, :, None, None, :]
            sin = torch.cat([sin, sin], -1).to(qkv.dtype)[None, :, None, None, :]
            qk = qkv[:, :, :2]
            x1, x2 = qk.chunk(2, dim=-1)
            rotated = qk * cos + torch.cat([-x2, x1], dim=-1) * sin
            return torch.cat([rotated, qkv[:, :, 2:]], dim=2)

    @staticmethod
    def attention(qkv: torch.Tensor) -> torch.Tensor:
        """Non-causal softmax(q k^T / sqrt(hd)) v: qkv [B,T,3,h,hd] -> [B,T,h,hd]."""
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B,h,T,hd] views
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    @classmethod
    def attention_with_rotary(cls, qkv, cos, sin):
        return cls.attention(cls.rotary(qkv, cos, sin))


def get_ops(backend: str):
    if backend == "reference":
        return ReferenceOps
    if backend == "fast":
        from .fast_ops import FastOps

        return FastOps
    raise ValueError(f"unknown backend {backend!r}; expected 'reference' or 'fast'")
