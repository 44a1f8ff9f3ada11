"""Triton flash attention, non-causal, on the packed qkv the model produces.

Computes out = softmax(q k^T / sqrt(hd)) v per head, with q, k, v read straight
from qkv: [B, T, 3, h, hd] through its strides (no transpose, no split copy),
and optionally the rotary embedding (half-split NeoX convention,
y = x*cos + rot(x)*sin, rot([x1, x2]) = [-x2, x1]) applied to q and k as they
are loaded. The backward returns the gradient w.r.t. the UN-rotated qkv.

Memory traffic: the forward reads q once and k, v once per query block
(T / BLOCK_M times, mostly from L2) and writes out [B, T, h, hd] plus the
logsumexp [B, h, T] in fp32; the T x T score matrix never reaches device
memory. Fusing the rotary saves the two [B, T, h, hd] rotated copies of q and
k (one write, one read each) and, in the backward, the un-rotation pass.

Kernels (FlashAttention-2 schedule):
  _attn_fwd_kernel        one program per (query block, batch*head); online
                          softmax in the exp2 domain (log2(e)/sqrt(hd) folded
                          into one scale); saves lse2 = m + log2(l).
  _attn_bwd_delta_kernel  delta = rowsum(dO * O), fp32 [B, h, T].
  _attn_bwd_dkdv_kernel   one program per key block: loops over all query
                          blocks, accumulates dK and dV in registers.
  _attn_bwd_dq_kernel     one program per query block: loops over all key
                          blocks, accumulates dQ. No atomics: deterministic.

q and k are handled as two halves of hd/2 each (s = q1 k1^T + q2 k2^T), which
makes the rotary a pure elementwise mix of the halves. Limits: hd a multiple
of 16 in [32, 128] (48, 80, 96, 112 run with padded, masked tiles);
dtypes fp32, fp16, bf16, with fp32 accumulation. fp32 inputs use IEEE dots
(no tf32) so the fp32 path stays accurate on CUDA.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from radd_fast.kernels.utils import (
    HAS_TRITON,
    TUNED_CAPABILITY,
    card_of,
    first_fitting,
    interpreter_on,
    next_power_of_2,
    pipeline_buffers,
    require,
    triton_runs_on,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 32, 128, 16
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _load_cos_sin(COS, SIN, offs_r, offs_h, T, stride_cs, HALF: tl.constexpr, EVEN: tl.constexpr):
        # the fp32 [R, BLOCK_HALF] cos and sin tiles of rows offs_r, zero outside.
        cs_off = offs_r[:, None] * stride_cs + offs_h[None, :]
        if EVEN:
            c = tl.load(COS + cs_off)
            s = tl.load(SIN + cs_off)
        else:
            mask = (offs_r[:, None] < T) & (offs_h[None, :] < HALF)
            c = tl.load(COS + cs_off, mask=mask, other=0.0)
            s = tl.load(SIN + cs_off, mask=mask, other=0.0)
        return c, s

    @triton.jit
    def _load_half_pair(base, COS, SIN, offs_r, offs_h, T, stride_t, stride_cs,
                        HALF: tl.constexpr, ROTARY: tl.constexpr, EVEN: tl.constexpr):
        # base: the (b, head, q|k) slice; returns the two halves [R, BLOCK_HALF]
        # of rows offs_r, rotated when ROTARY (in fp32, rounded once to the input dtype).
        ptr1 = base + offs_r[:, None] * stride_t + offs_h[None, :]
        if EVEN:
            x1 = tl.load(ptr1)
            x2 = tl.load(ptr1 + HALF)
        else:
            mask = (offs_r[:, None] < T) & (offs_h[None, :] < HALF)
            x1 = tl.load(ptr1, mask=mask, other=0.0)
            x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
        if ROTARY:
            c, s = _load_cos_sin(COS, SIN, offs_r, offs_h, T, stride_cs, HALF, EVEN)
            a = x1.to(tl.float32)
            b = x2.to(tl.float32)
            x1 = (a * c - b * s).to(x1.dtype)
            x2 = (b * c + a * s).to(x2.dtype)
        return x1, x2

    @triton.jit
    def _store_half_pair(base, COS, SIN, g1, g2, offs_r, offs_h, T, stride_t, stride_cs,
                         HALF: tl.constexpr, ROTARY: tl.constexpr, EVEN: tl.constexpr):
        # g1, g2: fp32 gradients w.r.t. the ROTATED halves; stores the gradient
        # w.r.t. the un-rotated input: the transpose of the rotation.
        mask = (offs_r[:, None] < T) & (offs_h[None, :] < HALF)
        if ROTARY:
            c, s = _load_cos_sin(COS, SIN, offs_r, offs_h, T, stride_cs, HALF, EVEN)
            g1, g2 = g1 * c + g2 * s, g2 * c - g1 * s
        ptr1 = base + offs_r[:, None] * stride_t + offs_h[None, :]
        if EVEN:
            tl.store(ptr1, g1.to(base.dtype.element_ty))
            tl.store(ptr1 + HALF, g2.to(base.dtype.element_ty))
        else:
            tl.store(ptr1, g1.to(base.dtype.element_ty), mask=mask)
            tl.store(ptr1 + HALF, g2.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_rows(ptrs, offs_r, offs_d, T, HEAD_DIM: tl.constexpr, EVEN: tl.constexpr):
        # a [R, BLOCK_D] tile of full head-dim rows (v, o, dO), zero outside.
        if EVEN:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=(offs_r[:, None] < T) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    @triton.jit
    def _qkv_bases(QKV, pid_bh, H, stride_qb, stride_qh, stride_q3):
        # pid_bh = b * H + head -> (b, head) in int64 and the q, k, v slices of QKV for them.
        b = (pid_bh // H).to(tl.int64)
        head = (pid_bh % H).to(tl.int64)
        q_base = QKV + b * stride_qb + head * stride_qh
        return b, head, q_base, q_base + stride_q3, q_base + 2 * stride_q3

    @triton.jit
    def _load_lse_delta(lse_row, delta_row, offs_m, T, EVEN: tl.constexpr):
        # the fp32 lse and delta of query rows offs_m (lse_row, delta_row: this (b, head)'s [T] rows).
        if EVEN:
            lse = tl.load(lse_row + offs_m)
            delta = tl.load(delta_row + offs_m)
        else:  # +inf lse makes the padded queries' probabilities exactly 0
            lse = tl.load(lse_row + offs_m, mask=offs_m < T, other=float("inf"))
            delta = tl.load(delta_row + offs_m, mask=offs_m < T, other=0.0)
        return lse, delta

    @triton.jit
    def _attn_fwd_kernel(
        QKV,  # [B, T, 3, H, HEAD_DIM], last stride 1
        COS, SIN,  # [T, HALF] fp32 (unused unless ROTARY)
        OUT,  # [B, T, H, HEAD_DIM], last stride 1
        LSE,  # [B*H, T] fp32: log2-domain logsumexp of the scaled scores
        T, H, qk_scale,  # qk_scale = log2(e) / sqrt(HEAD_DIM)
        stride_qb, stride_qt, stride_q3, stride_qh, stride_cs,
        stride_ob, stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ROTARY: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b, head, q_base, k_base, v_base = _qkv_bases(QKV, pid_bh, H, stride_qb, stride_qh, stride_q3)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, BLOCK_HALF)
        offs_d = tl.arange(0, BLOCK_D)

        q1, q2 = _load_half_pair(q_base, COS, SIN, offs_m, offs_h, T, stride_qt, stride_cs, HALF, ROTARY, EVEN)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, T, BLOCK_N):
            offs_n = start_n + offs_n0
            k1, k2 = _load_half_pair(k_base, COS, SIN, offs_n, offs_h, T, stride_qt, stride_cs, HALF, ROTARY, EVEN)
            v = _load_rows(v_base + offs_n[:, None] * stride_qt + offs_d[None, :], offs_n, offs_d, T, HEAD_DIM, EVEN)
            s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            s = s * qk_scale
            if not EVEN:
                s = tl.where(offs_n[None, :] < T, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid column
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            m_i = m_new

        acc = acc / l_i[:, None]
        o_ptrs = OUT + b * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
        lse_ptrs = LSE + pid_bh.to(tl.int64) * T + offs_m
        if EVEN:
            tl.store(o_ptrs, acc.to(OUT.dtype.element_ty))
            tl.store(lse_ptrs, m_i + tl.log2(l_i))
        else:
            tl.store(o_ptrs, acc.to(OUT.dtype.element_ty),
                     mask=(offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM))
            tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=offs_m < T)

    @triton.jit
    def _attn_bwd_delta_kernel(
        OUT, DOUT,  # [B, T, H, HEAD_DIM] each, last stride 1
        DELTA,  # [B*H, T] fp32
        T, H,
        stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        head = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(OUT + b * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                    mask=mask, other=0.0)
        do = tl.load(DOUT + b * stride_db + head * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
                     mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        QKV,  # [B, T, 3, H, HEAD_DIM], last stride 1
        COS, SIN,  # [T, HALF] fp32 (unused unless ROTARY)
        DOUT,  # [B, T, H, HEAD_DIM], last stride 1
        LSE, DELTA,  # [B*H, T] fp32
        DQKV,  # [B, T, 3, H, HEAD_DIM]; this kernel writes the k and v slices
        T, H, qk_scale, sm_scale,
        stride_qb, stride_qt, stride_q3, stride_qh, stride_cs,
        stride_db, stride_dt, stride_dh,
        stride_gb, stride_gt, stride_g3, stride_gh,
        HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ROTARY: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # Transposed orientation (key rows x query columns) so that dV = P^T dO
        # and dK = dS^T Q need no transposed score tiles.
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b, head, q_base, k_base, v_base = _qkv_bases(QKV, pid_bh, H, stride_qb, stride_qh, stride_q3)
        do_base = DOUT + b * stride_db + head * stride_dh
        row_base = pid_bh.to(tl.int64) * T

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_h = tl.arange(0, BLOCK_HALF)
        offs_d = tl.arange(0, BLOCK_D)

        k1, k2 = _load_half_pair(k_base, COS, SIN, offs_n, offs_h, T, stride_qt, stride_cs, HALF, ROTARY, EVEN)
        v = _load_rows(v_base + offs_n[:, None] * stride_qt + offs_d[None, :], offs_n, offs_d, T, HEAD_DIM, EVEN)
        dk1 = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
        dk2 = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, T, BLOCK_M):
            offs_m = start_m + offs_m0
            q1, q2 = _load_half_pair(q_base, COS, SIN, offs_m, offs_h, T, stride_qt, stride_cs, HALF, ROTARY, EVEN)
            do = _load_rows(do_base + offs_m[:, None] * stride_dt + offs_d[None, :], offs_m, offs_d, T, HEAD_DIM, EVEN)
            lse, delta = _load_lse_delta(LSE + row_base, DELTA + row_base, offs_m, T, EVEN)
            st = tl.dot(k1, tl.trans(q1), input_precision=PRECISION)
            st = tl.dot(k2, tl.trans(q2), st, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
            pt = tl.exp2(st * qk_scale - lse[None, :])
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = (pt * (dpt - delta[None, :])).to(q1.dtype)
            dk1 = tl.dot(dst, q1, dk1, input_precision=PRECISION)
            dk2 = tl.dot(dst, q2, dk2, input_precision=PRECISION)

        g_base = DQKV + b * stride_gb + head * stride_gh
        _store_half_pair(g_base + stride_g3, COS, SIN, dk1 * sm_scale, dk2 * sm_scale,
                         offs_n, offs_h, T, stride_gt, stride_cs, HALF, ROTARY, EVEN)
        dv_ptrs = g_base + 2 * stride_g3 + offs_n[:, None] * stride_gt + offs_d[None, :]
        if EVEN:
            tl.store(dv_ptrs, dv.to(DQKV.dtype.element_ty))
        else:
            tl.store(dv_ptrs, dv.to(DQKV.dtype.element_ty),
                     mask=(offs_n[:, None] < T) & (offs_d[None, :] < HEAD_DIM))

    @triton.jit
    def _attn_bwd_dq_kernel(
        QKV,  # [B, T, 3, H, HEAD_DIM], last stride 1
        COS, SIN,  # [T, HALF] fp32 (unused unless ROTARY)
        DOUT,  # [B, T, H, HEAD_DIM], last stride 1
        LSE, DELTA,  # [B*H, T] fp32
        DQKV,  # [B, T, 3, H, HEAD_DIM]; this kernel writes the q slice
        T, H, qk_scale, sm_scale,
        stride_qb, stride_qt, stride_q3, stride_qh, stride_cs,
        stride_db, stride_dt, stride_dh,
        stride_gb, stride_gt, stride_g3, stride_gh,
        HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ROTARY: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b, head, q_base, k_base, v_base = _qkv_bases(QKV, pid_bh, H, stride_qb, stride_qh, stride_q3)
        row_base = pid_bh.to(tl.int64) * T

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, BLOCK_HALF)
        offs_d = tl.arange(0, BLOCK_D)

        q1, q2 = _load_half_pair(q_base, COS, SIN, offs_m, offs_h, T, stride_qt, stride_cs, HALF, ROTARY, EVEN)
        do = _load_rows(DOUT + b * stride_db + head * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
                        offs_m, offs_d, T, HEAD_DIM, EVEN)
        lse, delta = _load_lse_delta(LSE + row_base, DELTA + row_base, offs_m, T, EVEN)
        dq1 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
        dq2 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
        for start_n in range(0, T, BLOCK_N):
            offs_n = start_n + offs_n0
            k1, k2 = _load_half_pair(k_base, COS, SIN, offs_n, offs_h, T, stride_qt, stride_cs, HALF, ROTARY, EVEN)
            v = _load_rows(v_base + offs_n[:, None] * stride_qt + offs_d[None, :], offs_n, offs_d, T, HEAD_DIM, EVEN)
            s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            p = tl.exp2(s * qk_scale - lse[:, None])
            if not EVEN:  # padded key columns (k = 0, so s = 0) must not count
                p = tl.where(offs_n[None, :] < T, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = (p * (dp - delta[:, None])).to(k1.dtype)
            dq1 = tl.dot(ds, k1, dq1, input_precision=PRECISION)
            dq2 = tl.dot(ds, k2, dq2, input_precision=PRECISION)

        _store_half_pair(DQKV + b * stride_gb + head * stride_gh, COS, SIN, dq1 * sm_scale, dq2 * sm_scale,
                         offs_m, offs_h, T, stride_gt, stride_cs, HALF, ROTARY, EVEN)


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class FwdConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class BwdConfig:
    # dK/dV kernel: block_n1 key rows per program, block_m1 query rows per step;
    # dQ kernel: block_m2 query rows per program, block_n2 key rows per step.
    block_m1: int = 32
    block_n1: int = 128
    num_warps1: int = 8
    num_stages1: int = 3
    block_m2: int = 128
    block_n2: int = 32
    num_warps2: int = 8
    num_stages2: int = 3


# Under the interpreter every program runs in numpy: small tiles keep it quick
# and make small T span several tiles, so the loops and tail masks are exercised.
_INTERPRETER_FWD = FwdConfig(16, 16, 1, 1)
_INTERPRETER_BWD = BwdConfig(16, 16, 1, 1, 16, 16, 1, 1)


# Tiles chosen from ptxas reports for sm_90 (Triton 3.9 compiling ahead of time
# on a machine without a GPU; all use wgmma; NOT yet timed on a GPU: run
# benchmarks/bench_attention.py --sweep and update). bf16, regs/thread:
#   fwd  128x64, 8 warps: hd 64 126 (rotary 158), hd 128 255/249; 4 warps: 255 / 226.
#   dkdv 32x128, 8 warps: hd 64 197 (rotary 236); at hd >= 96, 128 keys spill,
#        32x64 keys 8 warps spills 32 B with rotary, 0 without.
#   dq   128x32, 8 warps: hd 64 128 (rotary 171); hd >= 96: 64x64, 8 warps, no spill.
# fp32 uses IEEE FMA dots (no tensor cores; a correctness path, auto never picks
# it): small tiles, which keep the spills near zero.
def _tuned_fwd(head_dim: int, dtype: torch.dtype) -> FwdConfig:
    if dtype == torch.float32:
        return FwdConfig(32, 32, 4, 1)
    return FwdConfig(128, 64, 8, 3)


def _tuned_bwd(head_dim: int, dtype: torch.dtype) -> BwdConfig:
    if dtype == torch.float32:
        return BwdConfig(16, 32, 4, 1, 32, 16, 4, 1)
    if head_dim <= 64:
        return BwdConfig(32, 128, 8, 3, 128, 32, 8, 3)
    return BwdConfig(32, 64, 8, 2, 64, 64, 8, 2)


# ----------------------------------------------------------------------------- per-card choice
# Shared memory of a configuration, estimated as Triton lays it out (an upper bound of the
# sizes tools/aot_build.py reads from the compiled kernels; see docs/KERNELS.md): the tiles a
# program loads once, plus `pipeline_buffers` copies of the tiles each loop step loads.
def _tile_widths(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_HALF): the padded widths of full rows and of half rows."""
    return max(16, next_power_of_2(head_dim)), max(16, next_power_of_2(head_dim // 2))


def _loop_rows_bytes(rows: int, head_dim: int, dtype: torch.dtype, rotary: bool, n_full: int) -> int:
    """Bytes of ``n_full`` [rows, hd] input tiles, plus the fp32 cos and sin of those rows under rotary."""
    block_d, block_half = _tile_widths(head_dim)
    size = n_full * rows * block_d * dtype.itemsize
    if rotary:
        size += 2 * rows * block_half * 4
    return size


def fwd_smem_bytes(cfg: FwdConfig, capability: tuple, dtype: torch.dtype, head_dim: int, rotary: bool) -> int:
    """Estimated shared memory of ``_attn_fwd_kernel``: q once; k, v (+ cos, sin) per key step."""
    block_d, _ = _tile_widths(head_dim)
    once = cfg.block_m * block_d * dtype.itemsize
    step = _loop_rows_bytes(cfg.block_n, head_dim, dtype, rotary, n_full=2)
    return once + pipeline_buffers(capability, dtype, cfg.num_stages) * step


def dkdv_smem_bytes(cfg: BwdConfig, capability: tuple, dtype: torch.dtype, head_dim: int, rotary: bool) -> int:
    """Estimated shared memory of ``_attn_bwd_dkdv_kernel``: k, v and one [keys, queries] probability
    tile (staged as the dV dot's operand; measured on the fp32 path) once; q, dO (+ cos, sin), lse,
    delta per step."""
    block_d, _ = _tile_widths(head_dim)
    once = (2 * cfg.block_n1 * block_d + cfg.block_n1 * cfg.block_m1) * dtype.itemsize
    step = _loop_rows_bytes(cfg.block_m1, head_dim, dtype, rotary, n_full=2) + 2 * cfg.block_m1 * 4
    return once + pipeline_buffers(capability, dtype, cfg.num_stages1) * step


def dq_smem_bytes(cfg: BwdConfig, capability: tuple, dtype: torch.dtype, head_dim: int, rotary: bool) -> int:
    """Estimated shared memory of ``_attn_bwd_dq_kernel``: q, dO once; k, v (+ cos, sin) per key step."""
    block_d, _ = _tile_widths(head_dim)
    once = 2 * cfg.block_m2 * block_d * dtype.itemsize
    step = _loop_rows_bytes(cfg.block_n2, head_dim, dtype, rotary, n_full=2)
    return once + pipeline_buffers(capability, dtype, cfg.num_stages2) * step


@functools.lru_cache(maxsize=None)  # pure, and asked on every launch
def fwd_config_for(capability: tuple, smem_limit: int, dtype: torch.dtype, head_dim: int,
                   rotary: bool) -> FwdConfig:
    """The forward's tiles on a card: the tuned ones where they fit, else the first smaller that does.

    Smaller means, in order: 32 keys a step, 2 stages, 64 queries a program. Head dims above
    64 start at 32 keys a step on cards without wgmma: there the 128x64 tile holds its fp32
    scores and accumulator in registers and spills (sm_80, hd 128 with rotary: 255 registers,
    444 B of spill stores; 128x32: 250, none; see the AOT table).
    """
    tuned = _tuned_fwd(head_dim, dtype)
    if capability == TUNED_CAPABILITY or dtype == torch.float32:
        candidates = [tuned]
    else:
        narrow = replace(tuned, block_n=32)
        wide = [tuned] if head_dim <= 64 else []
        candidates = wide + [narrow, replace(narrow, num_stages=2), replace(narrow, block_m=64, num_stages=2)]
    return first_fitting(candidates, lambda c: fwd_smem_bytes(c, capability, dtype, head_dim, rotary), smem_limit)


@functools.lru_cache(maxsize=None)  # pure, and asked on every launch
def bwd_config_for(capability: tuple, smem_limit: int, dtype: torch.dtype, head_dim: int,
                   rotary: bool) -> BwdConfig:
    """The backward's tiles on a card, each of its two kernels shrunk independently until it fits:
    dK/dV first with fewer stages, then fewer keys a program; dQ first with 32 keys a step,
    then fewer stages, then fewer queries a program."""
    tuned = _tuned_bwd(head_dim, dtype)
    if capability == TUNED_CAPABILITY or dtype == torch.float32:
        return tuned
    dkdv = [tuned, replace(tuned, num_stages1=2), replace(tuned, num_stages1=2, block_n1=tuned.block_n1 // 2)]
    dkdv_cfg = first_fitting(dkdv, lambda c: dkdv_smem_bytes(c, capability, dtype, head_dim, rotary), smem_limit)
    narrow = replace(dkdv_cfg, block_n2=32)
    dq = [dkdv_cfg, narrow, replace(narrow, num_stages2=2), replace(narrow, num_stages2=2, block_m2=64)]
    return first_fitting(dq, lambda c: dq_smem_bytes(c, capability, dtype, head_dim, rotary), smem_limit)


def default_fwd_config(head_dim: int, dtype: torch.dtype, device: torch.device, rotary: bool = False) -> FwdConfig:
    """The forward's tiles for a launch on ``device`` (the interpreter's small ones on the CPU)."""
    if device.type == "cpu":
        return _INTERPRETER_FWD
    capability, smem_limit = card_of(device)
    return fwd_config_for(capability, smem_limit, dtype, head_dim, rotary)


def default_bwd_config(head_dim: int, dtype: torch.dtype, device: torch.device, rotary: bool = False) -> BwdConfig:
    """The backward's tiles for a launch on ``device`` (the interpreter's small ones on the CPU)."""
    if device.type == "cpu":
        return _INTERPRETER_BWD
    capability, smem_limit = card_of(device)
    return bwd_config_for(capability, smem_limit, dtype, head_dim, rotary)


# ----------------------------------------------------------------------------- launchers
def check_head_dim(head_dim: int) -> None:
    require(MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0,
            f"triton attention supports head dims that are multiples of {HEAD_DIM_MULTIPLE} in "
            f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]; got head_dim={head_dim}")


def check_rotary_tables(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    """cos, sin: both None, or both [T, hd/2] float32 on qkv's device (qkv: [B, T, 3, h, hd])."""
    T, hd = qkv.shape[1], qkv.shape[-1]
    require((cos is None) == (sin is None), "pass both cos and sin, or neither")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            require(t.shape == (T, hd // 2), f"{name} must be [T, hd/2] = [{T}, {hd // 2}]; got {tuple(t.shape)}")
            require(t.dtype == torch.float32, f"{name} must be float32; got {t.dtype}")
            require(t.device == qkv.device, f"{name} is on {t.device}, qkv on {qkv.device}")


def check_inputs(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    """Shape/dtype/layout checks shared by the launchers (raise ValueError)."""
    require(qkv.dim() == 5 and qkv.shape[2] == 3,
            f"qkv must be [B, T, 3, h, hd]; got shape {tuple(qkv.shape)}")
    require(qkv.dtype in DTYPES, f"triton attention supports {DTYPES}; got {qkv.dtype}")
    require(qkv.stride(-1) == 1, f"qkv must have unit stride on the head dim; got strides {qkv.stride()}")
    B, T, _, h, hd = qkv.shape
    require(B * h > 0 and T > 0, f"empty qkv {tuple(qkv.shape)}")
    check_head_dim(hd)
    require(T * qkv.stride(1) < 2**31, "one sequence of qkv must span fewer than 2**31 elements")
    check_rotary_tables(qkv, cos, sin)
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            require(t.stride(-1) == 1, f"{name} must have unit stride on its last dim")
        require(cos.stride(0) == sin.stride(0), "cos and sin must share their row stride")
    require(triton_runs_on(qkv), f"triton attention cannot run on {qkv.device} "
            "(needs CUDA, or the CPU with TRITON_INTERPRET=1 set before triton is imported)")


def _common(qkv, cos, head_dim):
    half = head_dim // 2
    return dict(
        HEAD_DIM=head_dim, HALF=half, BLOCK_HALF=max(16, next_power_of_2(half)),
        BLOCK_D=max(16, next_power_of_2(head_dim)), ROTARY=cos is not None,
        PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
    ), half == next_power_of_2(half)


def flash_attention_forward(qkv: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                            out: torch.Tensor | None = None, config: FwdConfig | None = None):
    """qkv: [B, T, 3, h, hd] -> (out [B, T, h, hd] in qkv.dtype, lse2 [B, h, T] fp32, log2 units)."""
    check_inputs(qkv, cos, sin)
    B, T, _, h, hd = qkv.shape
    if out is None:
        out = torch.empty((B, T, h, hd), device=qkv.device, dtype=qkv.dtype)
    require(out.shape == (B, T, h, hd) and out.dtype == qkv.dtype and out.device == qkv.device
            and out.stride(-1) == 1, f"out must be [B, T, h, hd] {qkv.dtype} with unit last stride; got "
            f"{tuple(out.shape)} {out.dtype}")
    lse = torch.empty((B, h, T), device=qkv.device, dtype=torch.float32)
    cfg = config or default_fwd_config(hd, qkv.dtype, qkv.device, rotary=cos is not None)
    flags, even_d = _common(qkv, cos, hd)
    cos_t, sin_t = (cos, sin) if cos is not None else (qkv, qkv)  # dummies, never read
    grid = (triton.cdiv(T, cfg.block_m), B * h)
    _attn_fwd_kernel[grid](
        qkv, cos_t, sin_t, out, lse,
        T, h, LOG2E / hd**0.5,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3), cos.stride(0) if cos is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        EVEN=even_d and T % max(cfg.block_m, cfg.block_n) == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    return out, lse


def flash_attention_backward(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                             dqkv: torch.Tensor | None = None, config: BwdConfig | None = None) -> torch.Tensor:
    """Gradient w.r.t. the (un-rotated) qkv: [B, T, 3, h, hd], from dout, out: [B, T, h, hd], lse2: [B, h, T]."""
    check_inputs(qkv, cos, sin)
    B, T, _, h, hd = qkv.shape
    for name, t in (("dout", dout), ("out", out)):
        require(t.shape == (B, T, h, hd) and t.dtype == qkv.dtype and t.stride(-1) == 1,
                f"{name} must be [B, T, h, hd] {qkv.dtype} with unit last stride; got {tuple(t.shape)} {t.dtype}")
    require(lse.shape == (B, h, T) and lse.dtype == torch.float32 and lse.is_contiguous(),
            f"lse must be contiguous float32 [B, h, T]; got {tuple(lse.shape)} {lse.dtype}")
    if dqkv is None:
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    require(dqkv.shape == qkv.shape and dqkv.dtype == qkv.dtype and dqkv.stride(-1) == 1,
            f"dqkv must be {tuple(qkv.shape)} {qkv.dtype} with unit last stride")
    cfg = config or default_bwd_config(hd, qkv.dtype, qkv.device, rotary=cos is not None)
    flags, even_d = _common(qkv, cos, hd)

    delta = torch.empty_like(lse)
    block_pre = 16 if qkv.device.type == "cpu" else 128
    _attn_bwd_delta_kernel[(triton.cdiv(T, block_pre), B * h)](
        out, dout, delta, T, h,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        HEAD_DIM=hd, BLOCK_D=flags["BLOCK_D"], BLOCK_M=block_pre,
    )
    cos_t, sin_t = (cos, sin) if cos is not None else (qkv, qkv)
    args = (
        qkv, cos_t, sin_t, dout, lse, delta, dqkv,
        T, h, LOG2E / hd**0.5, 1.0 / hd**0.5,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3), cos.stride(0) if cos is not None else 0,
        dout.stride(0), dout.stride(1), dout.stride(2),
        dqkv.stride(0), dqkv.stride(1), dqkv.stride(2), dqkv.stride(3),
    )
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg.block_n1), B * h)](
        *args, BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1,
        EVEN=even_d and T % max(cfg.block_m1, cfg.block_n1) == 0,
        num_warps=cfg.num_warps1, num_stages=cfg.num_stages1, **flags,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg.block_m2), B * h)](
        *args, BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2,
        EVEN=even_d and T % max(cfg.block_m2, cfg.block_n2) == 0,
        num_warps=cfg.num_warps2, num_stages=cfg.num_stages2, **flags,
    )
    return dqkv


__all__ = [
    "BwdConfig", "FwdConfig", "bwd_config_for", "check_head_dim", "check_inputs", "check_rotary_tables",
    "default_bwd_config", "default_fwd_config", "dkdv_smem_bytes", "dq_smem_bytes", "fwd_config_for", "fwd_smem_bytes", "flash_attention_backward", "flash_attention_forward", "interpreter_on",
]
