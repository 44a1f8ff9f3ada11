# Fused absorbing-state update for the sampler: draw the revealed tokens and write them into x.
#
# What: for N revealed positions with final-normed hidden rows h [N, d], classes
#   W [C, d], b [C] (only classes [0, n_vocab) take part: callers pass
#   n_vocab = V - 1 so the MASK column never wins), Gumbel noise g [N, n_vocab]:
#     token[i] = argmax_v (h_i . W_v + b_v + g_iv)        (Gumbel-max = a draw from softmax)
#     x[dst[i]] = token[i]                                  (the absorbing-state update)
#   `head_sample_update` does this from h (the `direct` strategy: logits never
#   exist); `logits_sample_update` does it from given logits [N, n_vocab] that a
#   top-k / top-p filter already set to -inf outside the kept set.
#
# How: `_head_argmax_kernel` runs over (row tile x vocabulary split): each program
#   walks its vocab tiles, builds a [BLOCK_N, BLOCK_V] logits tile with tl.dot
#   (fp32 accumulation), adds bias and noise, and keeps a running (max, argmax).
#   A [N, SPLITS] table of partials is merged by `_finalize_kernel`, which also
#   writes x. Splitting the vocabulary keeps the GPU busy when N is small (a
#   sampler step reveals ~N = batch x L / E-NFE positions, often < 256).
#
# Noise: by default generated inside the kernels from Philox (tl.randint4x) keyed
#   by `seed`, at offset row * n_vocab + col, so nothing of size [N, n_vocab]
#   is ever stored. `gumbel_noise` materialises exactly that noise for the
#   references and tests; `noise=` passes explicit noise instead. fp64=True draws
#   53-bit uniforms and adds them to fp64 scores (fp32 Gumbel tops out at ~16.6,
#   which truncates the noise tail; lower precision lowers the effective
#   temperature). Launches with N * n_vocab >= 2^31 are split into row chunks with
#   derived keys (the Philox offset is int32). `noise_ids=` [N] int64 keys each row
#   by (seed, id) instead: the counter (col, id_lo, id_hi, 0), so a row's noise does
#   not depend on its place in the launch (the sampler's ids are sample x position;
#   radd_fast/philox.py draws the same bits in PyTorch and is the CPU fallback).
#
# Memory traffic saved (direct, N = 128, V = 50257, d = 768, bf16): the unfused
#   head writes + reads [N, V] logits in bf16, fp32 log-softmax and probs
#   (~100 MB) and a same-sized noise tensor; here W is read once per row tile
#   (77 MB per 64 rows) and only [N, SPLITS] partials are stored. The kernel is a
#   small share of a sampler step (the transformer body dominates); its job is to
#   keep the head off the critical path, not to be a roofline GEMM.
#
# Limits: h, W, b the same dtype (fp32 / bf16 / fp16); fp32 uses IEEE dot products;
#   any d (the kernel loops over d); dst int64 indices into a flat int64 x. Ties
#   resolve to the lowest class index like torch.argmax. Without Triton (CPU and
#   no interpreter) the public functions run the `*_ref` path with noise from a
#   torch.Generator seeded by `seed` (same distribution, different numbers).
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from radd_fast.kernels.utils import (
    HAS_TRITON,
    SUPPORTED_DTYPES,
    TUNED_CAPABILITY,
    card_of,
    first_fitting,
    next_power_of_2,
    pipeline_buffers,
    require,
    triton_runs_on,
)
from radd_fast.philox import keyed_gumbel

if HAS_TRITON:
    import triton
    import triton.language as tl

_MAX_OFFSET = 2**31 - 1

# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _gumbel(key, offsets, FP64: tl.constexpr):
        # Standard Gumbel noise at int32 offsets (the counter (offset, 0, 0, 0)).
        r0, r1, _r2, _r3 = tl.randint4x(key, offsets)
        return _gumbel_of_bits(r0, r1, FP64)

    @triton.jit
    def _gumbel_keyed(key, ids, cols, FP64: tl.constexpr):
        # Standard Gumbel noise of rows keyed by id: ids [BLOCK_N] int64, cols [BLOCK_V] ->
        # [BLOCK_N, BLOCK_V] from the counter (col, id_lo, id_hi, 0): radd_fast.philox.keyed_gumbel.
        zero = (ids[:, None] * 0 + cols[None, :] * 0).to(tl.uint32)
        c0 = cols[None, :].to(tl.uint32) + zero
        c1 = (ids & 0xFFFFFFFF)[:, None].to(tl.uint32) + zero
        c2 = ((ids >> 32) & 0xFFFFFFFF)[:, None].to(tl.uint32) + zero
        r0, r1, _r2, _r3 = tl.philox(key, c0, c1, c2, zero)
        return _gumbel_of_bits(r0, r1, FP64)

    @triton.jit
    def _gumbel_of_bits(r0, r1, FP64: tl.constexpr):
        # -log(-log(u)), u in (0, 1) strictly (no +-inf), from two random 32-bit words.
        r0 = r0.to(tl.uint32, bitcast=True)
        if FP64:
            r1 = r1.to(tl.uint32, bitcast=True)
            hi = (r0 >> 5).to(tl.float64)  # 27 bits
            lo = (r1 >> 6).to(tl.float64)  # 26 bits
            u = (hi * 67108864.0 + lo + 0.5) * 1.1102230246251565e-16  # (53-bit int + 1/2) / 2^53
        else:
            u = ((r0 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # (23-bit int + 1/2) / 2^23
        return -tl.log(-tl.log(u))

    @triton.jit
    def _gumbel_noise_kernel(
        out_ptr,  # [N, n_vocab] fp32 / fp64
        ids_ptr,  # [N] int64 noise id of each row (read only when KEYED)
        key, N, n_vocab,
        stride_out,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, FP64: tl.constexpr, KEYED: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        if KEYED:
            g = _gumbel_keyed(key, tl.load(ids_ptr + rows, mask=rows < N, other=0), cols, FP64)
        else:
            g = _gumbel(key, rows[:, None] * n_vocab + cols[None, :], FP64)
        ok = (rows < N)[:, None] & (cols < n_vocab)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], g, mask=ok)

    @triton.jit
    def _head_argmax_kernel(
        h_ptr,  # [N, D] final-normed hidden rows
        w_ptr,  # [C, D] class weights; classes >= n_vocab are never read
        b_ptr,  # [C] bias
        noise_ptr,  # [N, n_vocab] explicit Gumbel noise (read only when NOISE_GIVEN)
        ids_ptr,  # [N] int64 noise id of each row (read only when KEYED)
        val_ptr,  # [N, SPLITS] best score of each vocabulary split (fp32 / fp64)
        idx_ptr,  # [N, SPLITS] int32 class of that score
        key, N, D, n_vocab, tiles_per_split,
        stride_h, stride_w, stride_noise, stride_part,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        NOISE_GIVEN: tl.constexpr, KEYED: tl.constexpr, FP64: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows_ld = tl.where(row_ok, rows, 0).to(tl.int64)
        ks = tl.arange(0, BLOCK_D)
        score_dtype = tl.float64 if FP64 else tl.float32
        best = tl.full((BLOCK_N,), float("-inf"), score_dtype)
        best_idx = tl.zeros((BLOCK_N,), tl.int32)
        col0 = pid_s * tiles_per_split * BLOCK_V
        if KEYED:
            ids = tl.load(ids_ptr + rows_ld, mask=row_ok, other=0)
        else:
            ids = rows_ld  # unused
        for t in range(0, tiles_per_split):
            cols = col0 + t * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < n_vocab
            cols_ld = tl.where(col_ok, cols, 0).to(tl.int64)
            acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                h_ptrs = h_ptr + rows_ld[:, None] * stride_h + (d0 + ks)[None, :]  # [BLOCK_N, BLOCK_D]
                w_ptrs = w_ptr + cols_ld[:, None] * stride_w + (d0 + ks)[None, :]  # [BLOCK_V, BLOCK_D]
                if EVEN_D:
                    a = tl.load(h_ptrs)
                    b = tl.load(w_ptrs)
                else:
                    k_ok = (d0 + ks) < D
                    a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            logits = acc + tl.load(b_ptr + cols_ld).to(tl.float32)[None, :]
            if NOISE_GIVEN:
                g = tl.load(noise_ptr + rows_ld[:, None] * stride_noise + cols_ld[None, :])
            elif KEYED:
                g = _gumbel_keyed(key, ids, cols, FP64)
            else:
                g = _gumbel(key, rows[:, None] * n_vocab + cols[None, :], FP64)
            score = logits.to(score_dtype) + g.to(score_dtype)
            score = tl.where(col_ok[None, :], score, float("-inf"))
            tile_best = tl.max(score, axis=1)
            tile_idx = tl.argmax(score, axis=1).to(tl.int32) + col0 + t * BLOCK_V
            better = tile_best > best  # strict: an earlier tile wins ties (torch.argmax order)
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx, best_idx)
        part = rows_ld * stride_part + pid_s
        tl.store(val_ptr + part, best, mask=row_ok)
        tl.store(idx_ptr + part, best_idx, mask=row_ok)

    @triton.jit
    def _finalize_kernel(
        val_ptr,  # [N, SPLITS] partial best scores
        idx_ptr,  # [N, SPLITS] int32 partial best classes
        dst_ptr,  # [N] int64 flat positions in x (read only when HAS_DST)
        x_ptr,  # [M] int64 flat token buffer (written only when HAS_DST)
        tok_ptr,  # [N] int64 sampled tokens
        N, SPLITS,
        stride_part,
        BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, HAS_DST: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        s = tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (s < SPLITS)[None, :]
        v = tl.load(val_ptr + rows64[:, None] * stride_part + s[None, :], mask=ok, other=float("-inf"))
        best_s = tl.argmax(v, axis=1)  # first split holding the maximum = lowest class index
        tok = tl.load(idx_ptr + rows64 * stride_part + best_s, mask=row_ok, other=0).to(tl.int64)
        tl.store(tok_ptr + rows64, tok, mask=row_ok)
        if HAS_DST:
            dst = tl.load(dst_ptr + rows64, mask=row_ok, other=0)
            tl.store(x_ptr + dst, tok, mask=row_ok)

    @triton.jit
    def _logits_argmax_kernel(
        logits_ptr,  # [N, n_vocab] fp32 logits (-inf = filtered out)
        noise_ptr,  # [N, n_vocab] explicit Gumbel noise (read only when NOISE_GIVEN)
        ids_ptr,  # [N] int64 noise id of each row (read only when KEYED)
        dst_ptr,  # [N] int64 flat positions in x (read only when HAS_DST)
        x_ptr,  # [M] int64 flat token buffer (written only when HAS_DST)
        tok_ptr,  # [N] int64 sampled tokens
        key, N, n_vocab,
        stride_l, stride_noise,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
        NOISE_GIVEN: tl.constexpr, KEYED: tl.constexpr, FP64: tl.constexpr, HAS_DST: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows_ld = tl.where(row_ok, rows, 0).to(tl.int64)
        score_dtype = tl.float64 if FP64 else tl.float32
        best = tl.full((BLOCK_N,), float("-inf"), score_dtype)
        best_idx = tl.zeros((BLOCK_N,), tl.int32)
        if KEYED:
            ids = tl.load(ids_ptr + rows_ld, mask=row_ok, other=0)
        else:
            ids = rows_ld  # unused
        for v0 in range(0, n_vocab, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < n_vocab
            cols_ld = tl.where(col_ok, cols, 0).to(tl.int64)
            logit = tl.load(logits_ptr + rows_ld[:, None] * stride_l + cols_ld[None, :])
            if NOISE_GIVEN:
                g = tl.load(noise_ptr + rows_ld[:, None] * stride_noise + cols_ld[None, :])
            elif KEYED:
                g = _gumbel_keyed(key, ids, cols, FP64)
            else:
                g = _gumbel(key, rows[:, None] * n_vocab + cols[None, :], FP64)
            score = tl.where(col_ok[None, :], logit.to(score_dtype) + g.to(score_dtype), float("-inf"))
            tile_best = tl.max(score, axis=1)
            tile_idx = tl.argmax(score, axis=1).to(tl.int32) + v0
            better = tile_best > best  # strict: an earlier tile wins ties (torch.argmax order)
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx, best_idx)
        tok = best_idx.to(tl.int64)
        tl.store(tok_ptr + rows_ld, tok, mask=row_ok)
        if HAS_DST:
            dst = tl.load(dst_ptr + rows_ld, mask=row_ok, other=0)
            tl.store(x_ptr + dst, tok, mask=row_ok)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------
def mix64(x: int) -> int:
    """splitmix64 finaliser: well-spread 63-bit keys from (seed, chunk) pairs."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def row_chunks(n_rows: int, n_vocab: int, seed: int) -> list[tuple[int, int, int]]:
    """(row_begin, row_end, philox_key) per launch: row * n_vocab + col must fit in int32.

    The single-chunk case keys Philox with ``seed`` itself, so callers can reason about it."""
    per = max(1, _MAX_OFFSET // max(1, n_vocab) - 256)  # margin: masked lanes past the last row stay in range
    if n_rows <= per:
        return [(0, n_rows, int(seed) & 0x7FFFFFFFFFFFFFFF)]
    return [(r0, min(n_rows, r0 + per), mix64(int(seed) * 1_000_003 + c)) for c, r0 in enumerate(range(0, n_rows, per))]


def _check_noise(noise, n_rows: int, n_vocab: int, fp64: bool, device) -> None:
    require(tuple(noise.shape) == (n_rows, n_vocab), f"noise must be [N={n_rows}, n_vocab={n_vocab}], got {tuple(noise.shape)}")
    want = torch.float64 if fp64 else torch.float32
    require(noise.dtype == want, f"noise must be {want} (fp64={fp64}), got {noise.dtype}")
    require(noise.device == device, f"noise on {noise.device}, inputs on {device}")
    require(noise.stride(-1) == 1 or n_vocab <= 1, "noise needs unit stride along the vocabulary")


def _check_dst(dst, x_flat, n_rows: int, device) -> None:
    require((dst is None) == (x_flat is None), "pass both dst and x_flat (to write into x) or neither")
    if dst is None:
        return
    require(dst.dtype == torch.int64 and tuple(dst.shape) == (n_rows,), f"dst must be int64 [N={n_rows}], got {dst.dtype} {tuple(dst.shape)}")
    require(x_flat.dtype == torch.int64 and x_flat.dim() == 1 and x_flat.is_contiguous(),
            f"x_flat must be a contiguous 1-D int64 tensor, got {x_flat.dtype} {tuple(x_flat.shape)}")
    require(dst.device == device and x_flat.device == device, "dst, x_flat and the inputs must share a device")
    require(dst.is_contiguous(), "dst must be contiguous")


def _check_head(h, weight, bias, n_vocab: int) -> None:
    require(h.dim() == 2 and weight.dim() == 2, f"h must be [N, d] and weight [C, d], got {tuple(h.shape)}, {tuple(weight.shape)}")
    require(h.shape[1] == weight.shape[1], f"h [N, d={h.shape[1]}] and weight [C, d={weight.shape[1]}] disagree on d")
    require(h.dtype in SUPPORTED_DTYPES and weight.dtype == h.dtype and bias.dtype == h.dtype,
            f"h, weight, bias must share one of {SUPPORTED_DTYPES}, got {h.dtype}, {weight.dtype}, {bias.dtype}; "
            "cast explicitly")
    require(tuple(bias.shape) == (weight.shape[0],), f"bias must be [C={weight.shape[0]}], got {tuple(bias.shape)}")
    require(1 <= n_vocab <= weight.shape[0], f"n_vocab must be in [1, C={weight.shape[0]}], got {n_vocab}")
    require(h.device == weight.device == bias.device, "h, weight, bias on different devices")
    require(h.stride(1) == 1 and weight.stride(1) == 1 and bias.is_contiguous(), "h, weight need unit stride along d; bias contiguous")


def _check_noise_ids(noise_ids, noise, n_rows: int, device) -> None:
    if noise_ids is None:
        return
    require(noise is None, "pass explicit noise or noise_ids, not both")
    require(noise_ids.dtype == torch.int64 and tuple(noise_ids.shape) == (n_rows,) and noise_ids.is_contiguous(),
            f"noise_ids must be a contiguous int64 [N={n_rows}], got {noise_ids.dtype} {tuple(noise_ids.shape)}")
    require(noise_ids.device == device, f"noise_ids on {noise_ids.device}, inputs on {device}")


def _check_sample_args(dst, x_flat, noise, noise_ids, n_rows: int, n_vocab: int, fp64: bool, device) -> torch.Tensor:
    """The checks both samplers share (destination, explicit noise, noise ids); returns the [N] int64 token buffer."""
    _check_dst(dst, x_flat, n_rows, device)
    if noise is not None:
        _check_noise(noise, n_rows, n_vocab, fp64, device)
    _check_noise_ids(noise_ids, noise, n_rows, device)
    return torch.empty(n_rows, dtype=torch.int64, device=device)


def gumbel_noise(n_rows: int, n_vocab: int, seed: int, device, fp64: bool = False,
                 noise_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The noise the kernels draw for ``seed``, materialised: [n_rows, n_vocab] fp32 (fp64 if ``fp64``).

    noise_ids: [n_rows] int64, row i's noise keyed by (seed, noise_ids[i]) alone (``philox.keyed_gumbel``)."""
    dtype = torch.float64 if fp64 else torch.float32
    out = torch.empty(n_rows, n_vocab, dtype=dtype, device=device)
    _check_noise_ids(noise_ids, None, n_rows, out.device)
    if n_rows == 0:
        return out
    if not triton_runs_on(out):
        return _fallback_noise(None, noise_ids, n_rows, n_vocab, seed, out.device, fp64)
    bn = 16 if out.is_cuda else 128
    bv = min(1024 if out.is_cuda else 256, max(16, next_power_of_2(n_vocab)))
    chunks = row_chunks(n_rows, n_vocab, seed) if noise_ids is None else [(0, n_rows, int(seed) & 0x7FFFFFFFFFFFFFFF)]
    for r0, r1, key in chunks:
        grid = (triton.cdiv(r1 - r0, bn), triton.cdiv(n_vocab, bv))
        ids = out if noise_ids is None else noise_ids[r0:r1]  # out: an unused placeholder pointer
        _gumbel_noise_kernel[grid](out[r0:r1], ids, key, r1 - r0, n_vocab, out.stride(0), BLOCK_N=bn, BLOCK_V=bv,
                                   FP64=fp64, KEYED=noise_ids is not None)
    return out


def _launches(n_rows: int, n_vocab: int, seed: int, noise, noise_ids) -> list[tuple[int, int, int]]:
    """(row_begin, row_end, philox_key) per launch: keyed rows need one; row offsets may need several."""
    if noise is not None:
        return [(0, n_rows, 0)]
    if noise_ids is not None:
        return [(0, n_rows, int(seed) & 0x7FFFFFFFFFFFFFFF)]
    return row_chunks(n_rows, n_vocab, seed)


def _fallback_noise(noise, noise_ids, n_rows, n_vocab, seed, device, fp64: bool) -> torch.Tensor:
    """The CPU fallback's Gumbel noise: the caller's; else keyed by (seed, noise id), the kernels' own
    numbers; else torch's generator keyed by ``seed``."""
    dtype = torch.float64 if fp64 else torch.float32
    if noise is not None:
        return noise
    if noise_ids is not None:
        return keyed_gumbel(int(seed) & 0x7FFFFFFFFFFFFFFF, noise_ids, n_vocab, dtype)
    return _torch_gumbel(n_rows, n_vocab, seed, device, dtype)


def gumbel_ref(shape, dtype: torch.dtype, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise of ``shape`` in plain PyTorch, drawn on ``device`` from ``generator``.

    ``-log(-log u)`` with ``u ~ U[0, 1)`` clamped to the smallest normal (no ``log 0``),
    computed in place: one buffer of ``shape``.
    """
    u = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    return u.clamp_min_(torch.finfo(dtype).tiny).log_().neg_().log_().neg_()


def _torch_gumbel(n_rows, n_vocab, seed, device, dtype) -> torch.Tensor:
    """The fallback's noise [n_rows, n_vocab]: ``gumbel_ref`` from a torch generator keyed by ``seed``."""
    gen = torch.Generator(device=device).manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
    return gumbel_ref((n_rows, n_vocab), dtype, device, gen)


@dataclass(frozen=True)
class HeadConfig:
    """Launch configuration of ``_head_argmax_kernel``: tiles, vocabulary splits, warps, stages."""
    block_n: int
    block_v: int
    block_d: int
    splits: int
    num_warps: int
    num_stages: int = 3  # Triton's default, which the sm_90 build was measured with


def head_smem_bytes(cfg: HeadConfig, capability: tuple, dtype: torch.dtype) -> int:
    """Estimated shared memory: ``pipeline_buffers`` copies of one d step's h and W tiles
    ([block_n + block_v, block_d] in the inputs' dtype); see docs/KERNELS.md."""
    step = (cfg.block_n + cfg.block_v) * cfg.block_d * dtype.itemsize
    return pipeline_buffers(capability, dtype, cfg.num_stages) * step


def _head_warps(block_n: int, block_v: int) -> int:
    return 8 if block_n * block_v >= 8192 else 4  # Philox keeps 4 words per score element live


def _balanced_splits(n_rows: int, block_n: int, n_vocab: int, block_v: int, sm_count: int) -> int:
    """Vocabulary splits: enough programs to fill the SMs when N is small, balanced tiles per split."""
    tiles = -(-n_vocab // block_v)
    splits = min(tiles, max(1, -(-4 * sm_count // -(-n_rows // block_n))))
    return -(-tiles // -(-tiles // splits))


@functools.lru_cache(maxsize=None)  # pure, and asked on every launch
def head_config_for(capability: tuple, smem_limit: int, dtype: torch.dtype, n_rows: int, d: int,
                    n_vocab: int, fp64: bool, sm_count: int) -> HeadConfig:
    """The head's launch on a card: the tuned tiles where they fit, else 2 stages, then fewer rows a tile."""
    block_n = 16 if n_rows <= 16 else 32 if (n_rows <= 32 or fp64) else 64
    block_v = min(128, max(16, next_power_of_2(n_vocab)))
    block_d = min(64, max(16, next_power_of_2(d)))

    def config(bn: int, stages: int) -> HeadConfig:
        splits = _balanced_splits(n_rows, bn, n_vocab, block_v, sm_count)
        return HeadConfig(bn, block_v, block_d, splits, _head_warps(bn, block_v), stages)

    tuned = config(block_n, 3)
    if capability == TUNED_CAPABILITY:
        return tuned
    candidates = [tuned, config(block_n, 2), config(max(16, block_n // 2), 2)]
    return first_fitting(candidates, lambda cfg: head_smem_bytes(cfg, capability, dtype), smem_limit)


def _head_config(n_rows: int, d: int, n_vocab: int, fp64: bool, dtype: torch.dtype, device) -> HeadConfig:
    if device.type != "cuda":  # interpreter: fewer, larger programs, one split
        block_n = min(128, max(16, next_power_of_2(n_rows)))
        block_v = min(128, max(16, next_power_of_2(n_vocab)))
        return HeadConfig(block_n, block_v, min(64, max(16, next_power_of_2(d))), 1, _head_warps(block_n, block_v))
    capability, smem_limit = card_of(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return head_config_for(capability, smem_limit, dtype, n_rows, d, n_vocab, fp64, sms)


def finalize_blocks(n_rows: int, splits: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_S) of ``_finalize_kernel``: at most 8192 partials per program (64 per
    thread at 4 warps): a fixed 64-row tile against up to 512 splits spilled registers in the
    sm_90 build (ptxas -v, triton 3.6)."""
    fs = max(2, next_power_of_2(splits))
    return max(2, min(64, next_power_of_2(n_rows), 8192 // fs)), fs


def head_sample_update(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_vocab: int,
                       dst: torch.Tensor | None = None, x_flat: torch.Tensor | None = None, seed: int = 0,
                       noise: torch.Tensor | None = None, fp64: bool = False,
                       noise_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sample token[i] ~ softmax(h_i W[:n_vocab]^T + b[:n_vocab]) by Gumbel-max; write x_flat[dst[i]] = token[i].

    h: [N, d] final-normed rows (same dtype as weight [C, d] and bias [C]); dst: [N] int64 into the
    1-D int64 ``x_flat`` (optional); noise: explicit [N, n_vocab] Gumbel noise, else Philox keyed by
    ``seed`` at row offsets, or with ``noise_ids`` [N] int64 by (seed, noise_ids[i]) alone, whatever
    the row's place in the launch (``philox.keyed_gumbel``). Returns tokens [N] int64. Example::

        tok = head_sample_update(hn, W, b, n_vocab=W.shape[0] - 1, dst=flat_pos, x_flat=x.view(-1), seed=7)
    """
    _check_head(h, weight, bias, n_vocab)
    N, D = h.shape
    tokens = _check_sample_args(dst, x_flat, noise, noise_ids, N, n_vocab, fp64, h.device)
    if N == 0:
        return tokens
    if not triton_runs_on(h):
        noise = _fallback_noise(noise, noise_ids, N, n_vocab, seed, h.device, fp64)
        return head_sample_update_ref(h, weight, bias, n_vocab, dst, x_flat, noise, fp64)
    cfg = _head_config(N, D, n_vocab, fp64, h.dtype, h.device)
    splits = cfg.splits
    tiles_per_split = triton.cdiv(triton.cdiv(n_vocab, cfg.block_v), splits)
    vals = torch.empty(N, splits, dtype=torch.float64 if fp64 else torch.float32, device=h.device)
    idx = torch.empty(N, splits, dtype=torch.int32, device=h.device)
    for r0, r1, key in _launches(N, n_vocab, seed, noise, noise_ids):
        nz = noise[r0:r1] if noise is not None else vals  # vals: an unused placeholder pointer
        ids = noise_ids[r0:r1] if noise_ids is not None else idx  # idx: an unused placeholder pointer
        _head_argmax_kernel[(triton.cdiv(r1 - r0, cfg.block_n), splits)](
            h[r0:r1], weight, bias, nz, ids, vals[r0:r1], idx[r0:r1],
            key, r1 - r0, D, n_vocab, tiles_per_split,
            h.stride(0), weight.stride(0), nz.stride(0), vals.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, NOISE_GIVEN=noise is not None,
            KEYED=noise_ids is not None, FP64=fp64, EVEN_D=D % cfg.block_d == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    fb, fs = finalize_blocks(N, splits)
    _finalize_kernel[(triton.cdiv(N, fb),)](
        vals, idx, dst if dst is not None else tokens, x_flat if x_flat is not None else tokens, tokens,
        N, splits, vals.stride(0), BLOCK_N=fb, BLOCK_S=fs, HAS_DST=dst is not None,
    )
    return tokens


def logits_sample_update(logits: torch.Tensor, dst: torch.Tensor | None = None, x_flat: torch.Tensor | None = None,
                         seed: int = 0, noise: torch.Tensor | None = None, fp64: bool = False,
                         noise_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sample token[i] ~ softmax(logits[i]) by Gumbel-max (-inf logits never win); write x_flat[dst[i]].

    logits: [N, n_vocab] fp32 (e.g. top-k / top-p filtered); dst, x_flat, seed, noise, noise_ids as in
    ``head_sample_update``. Returns tokens [N] int64.
    """
    require(logits.dim() == 2 and logits.dtype == torch.float32, f"logits must be fp32 [N, n_vocab], got {logits.dtype} {tuple(logits.shape)}")
    require(logits.stride(1) == 1 or logits.shape[1] <= 1, "logits need unit stride along the vocabulary")
    N, n_vocab = logits.shape
    require(n_vocab >= 1, "logits need at least one class")
    tokens = _check_sample_args(dst, x_flat, noise, noise_ids, N, n_vocab, fp64, logits.device)
    if N == 0:
        return tokens
    if not triton_runs_on(logits):
        noise = _fallback_noise(noise, noise_ids, N, n_vocab, seed, logits.device, fp64)
        return logits_sample_update_ref(logits, dst, x_flat, noise, fp64)
    bn = 16 if logits.is_cuda else 128  # interpreter: fewer, larger programs
    bv = min(256, max(16, next_power_of_2(n_vocab)))
    for r0, r1, key in _launches(N, n_vocab, seed, noise, noise_ids):
        nz = noise[r0:r1] if noise is not None else logits[r0:r1]  # logits: an unused placeholder pointer
        ids = noise_ids[r0:r1] if noise_ids is not None else tokens[r0:r1]  # tokens: an unused placeholder
        d = dst[r0:r1] if dst is not None else tokens[r0:r1]
        _logits_argmax_kernel[(triton.cdiv(r1 - r0, bn),)](
            logits[r0:r1], nz, ids, d, x_flat if x_flat is not None else tokens, tokens[r0:r1],
            key, r1 - r0, n_vocab, logits.stride(0), nz.stride(0),
            BLOCK_N=bn, BLOCK_V=bv, NOISE_GIVEN=noise is not None, KEYED=noise_ids is not None, FP64=fp64, HAS_DST=dst is not None, num_warps=4,
        )
    return tokens


# ----------------------------------------------------------------------------
# PyTorch references (the oracle of the tests; the CPU fallback)
# ----------------------------------------------------------------------------
def logits_sample_update_ref(logits, dst, x_flat, noise, fp64: bool = False) -> torch.Tensor:
    """argmax(logits + noise) in fp32 (fp64), first index on ties; writes x_flat[dst] when given."""
    dtype = torch.float64 if fp64 else torch.float32
    tokens = (logits.to(dtype) + noise.to(dtype)).argmax(dim=-1)
    if dst is not None:
        x_flat[dst] = tokens
    return tokens


def head_sample_update_ref(h, weight, bias, n_vocab: int, dst, x_flat, noise, fp64: bool = False) -> torch.Tensor:
    """The unfused head: fp32 logits h @ W[:n_vocab]^T + b[:n_vocab], then ``logits_sample_update_ref``."""
    logits = h.float() @ weight[:n_vocab].float().t() + bias[:n_vocab].float()
    return logits_sample_update_ref(logits, dst, x_flat, noise, fp64)
