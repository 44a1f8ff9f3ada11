"""Modules of the published architecture, with the published parameter names.

Names and shapes match the released state dicts (docs/MODEL.md, checkpoint layouts) so that published
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
        # [B, T, d], fp32, outside autocast as published. F.embedding, not indexing: its backward is a
        # deterministic sum (indexing's is an accumulating index_put_ that adds with atomics across CPU threads).
        return F.embedding(indices, self.embedding)


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
        if torch.compiler.is_compiling():  # traced once into the graph; the cache check would break it
            return rotary_tables(seq_len, self.inv_freq, device)
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
        return self._forward(x, cos, sin, rows, keep_kv=False)

    def _forward(self, x, cos, sin, rows, keep_kv: bool):
        B, T, d = x.shape
        ops = self.ops
        h = ops.layer_norm(x, self.norm1.weight, self.norm1.bias)
        qkv = self.attn_qkv(h).view(B, T, 3, self.n_heads, d // self.n_heads)
        # qkv is needed again only for the cache's keys: otherwise rotary may rotate it in place
        a = ops.attention_with_rotary(qkv, cos, sin, overwrite_qkv=not keep_kv).reshape(B, T, d)
        if rows is not None:
            x = x.reshape(B * T, d).index_select(0, rows)
            a = a.reshape(B * T, d).index_select(0, rows)
        out = self._after_attention(x, a)
        if not keep_kv:
            return out
        # The keys come from a separate rotary pass because the fast attention may fuse rotary
        # into its loads and never materialise them; that pass costs one read of q and k.
        k, v = ops.rotary(qkv, cos, sin)[:, :, 1:].unbind(2)
        return out, k, v

    def _after_attention(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The block after its attention: output projection, residual add + norm, MLP, residual add."""
        x, h = self.ops.add_layer_norm(x, self.attn_out(a), self.norm2.weight, self.norm2.bias, self.dropout,
                                       self.training)
        return x + F.dropout(self.mlp(h), self.dropout, self.training)

    # -- the approximate sampler's key/value cache (radd_fast/model/kv_cache.py) --------------------
    def forward_filling(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` that also returns this block's keys and values for a cache (inference only).

        x: [B, T, d]; cos, sin: [T, hd/2] -> (out, k, v): out exactly ``forward(x, cos, sin, rows)``
        (the same code on the same shapes, so bit-equal), k and v [B, T, h, hd] in the compute
        dtype, k after rotary.
        """
        return self._forward(x, cos, sin, rows, keep_kv=True)

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        """This block at a few positions per row, attending over cached keys and values (inference only).

        x: [B, S] residual rows of the pushed positions, [B, S, d]; cos, sin: [B * S, hd/2] rotary
        tables gathered at their positions; k_cache, v_cache: [B, L + 1, h, hd] this block's cache of
        the same B rows, contiguous (a leading slice of the whole cache: read in place, no gather;
        position L is a dump for padding queries, never attended to); write: [B * S] flat indices
        into the [B * (L + 1)] entries where each position's new key and value go. The pushed
        positions' entries are overwritten first, then their queries attend over all L cached keys
        of their row -> [B, S, d].
        """
        B, S, d = x.shape
        _, L1, nh, hd = k_cache.shape
        ops = self.ops
        h = ops.layer_norm(x, self.norm1.weight, self.norm1.bias)
        # [1, B * S] so that each query row gets its own position's rotary table
        qkv = ops.rotary(self.attn_qkv(h).view(1, B * S, 3, nh, hd), cos, sin).view(B, S, 3, nh, hd)
        q, k, v = qkv.unbind(2)  # [B, S, h, hd]
        k_cache.view(B * L1, nh, hd).index_copy_(0, write, k.reshape(B * S, nh, hd).to(k_cache.dtype))
        v_cache.view(B * L1, nh, hd).index_copy_(0, write, v.reshape(B * S, nh, hd).to(v_cache.dtype))
        keys, values = k_cache[:, :L1 - 1].transpose(1, 2), v_cache[:, :L1 - 1].transpose(1, 2)  # [B, h, L, hd] views
        a = F.scaled_dot_product_attention(q.transpose(1, 2).to(keys.dtype), keys, values)  # [B, h, S, hd]
        return self._after_attention(x, a.transpose(1, 2).reshape(B, S, d))


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
