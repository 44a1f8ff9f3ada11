"""Counter-based random numbers: Philox4x32-10 in PyTorch, bit for bit as Triton's ``tl.philox``.

Why: the sampler keys every random number by what it is for (the run's key, the sample's
index, the token position, the vocabulary column) instead of drawing it from a stream
whose order depends on how the work was split. A sample is then the same whichever rank,
wave or batch of rows in flight makes it (docs/SAMPLING.md, "Reproducible samples"). The
sampling kernels (kernels/sampling_update.py) draw the same bits on the GPU; this module is
their reference and the CPU path.

Exact in int64 on any device: a 32 x 32-bit product is formed from 16-bit halves, so no
intermediate exceeds 2^49. Every counter word and key half is a 32-bit value held in int64.

Example::

    u = keyed_uniforms(key=7, ids=torch.arange(4), width=3)            # [4, 3] float64 in (0, 1)
    torch.equal(u[2:], keyed_uniforms(7, torch.arange(2, 4), 3))      # True: row r depends on ids[r] only
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
ROUNDS = 10
CHUNK_ELEMENTS = 1 << 22  # elements per pass of keyed_uniforms: bounds the int64 temporaries (~32 MB each)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a * b (a a 32-bit constant, b 32-bit values)."""
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48; a * b = p_hi * 2^16 + p_lo
    return (p_hi + (p_lo >> 16)) >> 16, (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32


def philox(key: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
    """Philox4x32-10 of the counter (c0, c1, c2, c3) under the 64-bit ``key``: four int64 tensors of 32-bit words.

    The counters broadcast against each other; ``tl.philox(key, c0, c1, c2, c3)`` on uint32 gives the same words.
    """
    shape = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape)
    c0, c1, c2, c3 = (c.expand(shape).to(torch.int64) for c in (c0, c1, c2, c3))
    k0, k1 = int(key) & MASK32, (int(key) >> 32) & MASK32
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def open_uniform(r0: torch.Tensor, r1: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniforms strictly inside (0, 1) from two random words: 53 bits for float64 (r0's top 27, r1's
    top 26), 23 for float32 (r0's top 23), each centred in its cell; the kernels' conversion."""
    if dtype == torch.float64:
        bits = (r0 >> 5) * 67108864 + (r1 >> 6)  # a 53-bit integer, exact in float64
        return (bits.to(torch.float64) + 0.5) * 2.0**-53
    if dtype == torch.float32:
        return ((r0 >> 9).to(torch.float32) + 0.5) * 2.0**-23
    raise ValueError(f"open_uniform draws float32 or float64, got {dtype}")


def keyed_uniforms(key: int, ids: torch.Tensor, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """u[r, j] from Philox(key, counter (j, id_lo, id_hi, 0)) with id = ids[r]: ids [R] int64 (>= 0) -> [R, width].

    Row r depends only on (key, ids[r]): the same id gives the same row in any batch, at any place.
    """
    ids = ids.reshape(-1).to(torch.int64)
    out = torch.empty(ids.numel(), width, dtype=dtype, device=ids.device)
    if out.numel() == 0:
        return out
    cols = torch.arange(width, dtype=torch.int64, device=ids.device)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=ids.device)
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for r0 in range(0, ids.numel(), step):
        part = ids[r0:r0 + step, None]
        w0, w1, _, _ = philox(key, cols, part & MASK32, (part >> 32) & MASK32, zero)
        out[r0:r0 + step] = open_uniform(w0, w1, dtype)
    return out


def keyed_gumbel(key: int, ids: torch.Tensor, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u) of ``keyed_uniforms``: [R, width], row r keyed by ids[r] alone."""
    return keyed_uniforms(key, ids, width, dtype).log_().neg_().log_().neg_()
