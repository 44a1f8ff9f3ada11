"""Per-row key/value cache of RADD's blocks, for the approximate sampler (docs/SAMPLING.md).

RADD has no time input and every attention is bidirectional, so an evaluation's
keys and values at a position depend on the whole row. Between two evaluations
of one row only a few tokens change, though, and the keys and values of the
others barely move. The approximate sampler (``radd_fast.sampling.cached``)
therefore fills this cache with a full, exact evaluation of the row
(``hidden_filling``) and, for the next few evaluations, pushes only a few
positions through the blocks (``hidden_cached``): their queries attend over the
row's cached keys and values, their own entries overwritten first.

Layout: one tensor each for keys and values, ``[n_blocks, slots + 1, L + 1, h, hd]``
in the compute dtype (bf16 / fp16 on CUDA, fp32 on CPU). Slot ``slots`` and
position ``L`` are dumps: padding rows and padding queries of the static shapes
write there, and no query ever attends to position L. Memory:
``n_blocks x 2 x L x d x bytes`` per slot (RADD-small in bf16, L = 1024:
12 x 2 x 1024 x 768 x 2 B = 36 MiB), see ``KVCache.bytes_per_row``.

Example::

    cache = KVCache.allocate(model, slots=4, length=128)
    h = hidden_filling(model, x, cache, slots=torch.arange(4))          # [4, 128, d] == model.hidden(x)
    h_few = hidden_cached(model, x.gather(1, pos), pos, cache.write_index(torch.arange(4), pos), cache)  # [4, S, d]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Cached post-rotary keys and values of every block: k, v [n_blocks, slots + 1, L + 1, h, hd]."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def slots(self) -> int:
        """Real slots (the last one, index ``slots``, is the dump of padding rows)."""
        return self.k.shape[1] - 1

    @property
    def length(self) -> int:
        """Cached positions per row (index ``length`` is the dump of padding queries)."""
        return self.k.shape[2] - 1

    @property
    def dump_slot(self) -> int:
        return self.slots

    @staticmethod
    def bytes_per_row(model, length: int, dtype: torch.dtype | None = None) -> int:
        """Bytes of one row's cache: n_blocks x 2 (k, v) x L x d x element size."""
        m = model.config.model
        dtype = model.compute_dtype if dtype is None else dtype
        return m.n_blocks * 2 * length * m.hidden_size * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def allocate(cls, model, slots: int, length: int) -> "KVCache":
        """Zeroed cache of ``slots`` rows of ``length`` positions (plus the dumps) on the model's device."""
        m = model.config.model
        shape = (m.n_blocks, slots + 1, length + 1, m.n_heads, m.hidden_size // m.n_heads)
        dtype = model.compute_dtype
        return cls(torch.zeros(shape, dtype=dtype, device=model.device), torch.zeros(shape, dtype=dtype, device=model.device))

    def write_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat indices into one block's [slots + 1, L + 1] entries: slots [B], positions [B, S] -> [B * S]
        (for ``hidden_cached``, slots = arange(B): its rows are the leading slots)."""
        return (slots[:, None].long() * (self.length + 1) + positions.long()).reshape(-1)


def hidden_filling(model, indices: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """``model.hidden(indices, rows=rows)``, bit for bit, while filling the cache of ``slots``.

    indices: [B, L] int64 (L = cache.length); slots: [B] the cache slot of each row (padding rows:
    ``cache.dump_slot``) -> [B, L, d], or [P, d] at ``rows`` (flat indices into the B * L positions;
    the last block pruned to them, as in ``model.hidden``). The token check is the caller's.
    """
    x = model.vocab_embed(indices)
    cos, sin = model.rotary_emb(indices.shape[1], x.device)
    last = len(model.blocks) - 1
    with model.autocast():
        for i, block in enumerate(model.blocks):
            x, k, v = block.forward_filling(x, cos, sin, rows if i == last else None)
            cache.k[i, :, :cache.length].index_copy_(0, slots, k.to(cache.k.dtype))
            cache.v[i, :, :cache.length].index_copy_(0, slots, v.to(cache.v.dtype))
    if rows is not None and last < 0:  # no blocks: the embedding rows themselves
        x = x.reshape(-1, x.shape[-1]).index_select(0, rows)
    return x


def hidden_cached(model, tokens: torch.Tensor, positions: torch.Tensor, write: torch.Tensor,
                  cache: KVCache) -> torch.Tensor:
    """The residual stream after the last block at a few positions per row, from the rows' caches.

    Row b of the inputs is the row of cache slot b (b < B <= slots + 1: the leading slots, read in
    place). tokens: [B, S] the current tokens at ``positions`` [B, S] (int64, < L); write: [B * S]
    where each one's key and value go (``cache.write_index(arange(B), ...)``; padding queries: the
    dump position L) -> [B, S, d] fp32. Exact when no token outside ``positions`` changed since the
    cache was filled; otherwise the unpushed positions' keys and values are those of the fill (the
    approximation).
    """
    B = tokens.shape[0]
    x = model.vocab_embed(tokens)
    cos, sin = model.rotary_emb(cache.length, x.device)
    flat = positions.reshape(-1)
    cos, sin = cos.index_select(0, flat), sin.index_select(0, flat)  # [B * S, hd/2]
    with model.autocast():
        for i, block in enumerate(model.blocks):
            x = block.forward_cached(x, cos, sin, cache.k[i, :B], cache.v[i, :B], write)
    return x
