"""Modules of the published architecture, with the published parameter names.

Names and shapes match the released state dicts (spec 6.1) so that published
weights load with ``strict=True``. Each module takes its math from the model's
``ops`` (reference or fast), so the block code is shared by both backends.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.rotary import rotary_inv_freq, rotary_tables
from .ops import ReferenceOps


class EmbeddingLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding[indices]  # [B, T, d], fp32, outside autocast as published


class LayerNormWot(nn.Module):
    """Layer norm with no affine inside the normalisation, then * weight + bias."""

    def __init__(self, dim: int):
        super().__init__()
        # Quirk kept from the published init: weight AND bias start at one.
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.ones(dim))
        self.ops = ReferenceOps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias)


class Rotary(nn.Module):
    """Holds ``inv_freq`` (a persistent buffer in the published checkpoints) and caches cos/sin tables."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, base))
        self._cache: tuple | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, hd/2] fp32 (the second half of cat(freqs, freqs) repeats the first)."""
        key = (seq_len, device, self.inv_freq.data_ptr())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *rotary_tables(seq_len, self.inv_freq, device))
        return self._cache[1], self._cache[2]


class DDiTBlock(nn.Module):
    """Pre-norm transformer block: non-causal attention with rotary, then a GELU-tanh MLP."""

    def __init__(self, dim: int, n_heads: int, dropout: float, mlp_ratio: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNormWot(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNormWot(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim, bias=True),
        )
        self.ops = ReferenceOps

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d] fp32 residual stream; cos, sin: [T, hd/2] -> [B, T, d].

        rows: optional [P] int64 flat indices into the B * T positions: every position still
        gives keys and values to the attention, but the attention output projection, the
        residual adds and the MLP run at those rows only -> [P, d] (exact; used by the last
        block when only some positions need the head).
        """
        B, T, d = x.shape
        ops = self.ops
        h = ops.layer_norm(x, self.norm1.weight, self.norm1.bias)
        qkv = self.attn_qkv(h).view(B, T, 3, self.n_heads, d // self.n_heads)
        a = ops.attention_with_rotary(qkv, cos, sin).reshape(B, T, d)
        if rows is not None:
            x = x.reshape(B * T, d).index_select(0, rows)
            a = a.reshape(B * T, d).index_select(0, rows)
        x, h = ops.add_layer_norm(x, self.attn_out(a), self.norm2.weight, self.norm2.bias, self.dropout, self.training)
        return x + F.dropout(self.mlp(h), self.dropout, self.training)


class DDitFinalLayer(nn.Module):
    """LN_final then Linear(d, V); zero-initialised as published."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.norm_final = LayerNormWot(dim)
        self.linear = nn.Linear(dim, vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))
