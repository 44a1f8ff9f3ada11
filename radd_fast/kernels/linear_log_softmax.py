# Fused output head for the RADD losses: log p(target) = log_softmax(x @ W^T + b)[target].
#
# What: for rows x [N, d] (the final-layer-normed hidden states of the masked
#   positions), classes W [C, d], b [C] and targets t [N], returns
#   target_logp[i] = logits[i, t_i] - lse[i] and lse[i] = logsumexp_v logits[i, v],
#   logits = x @ W^T + b computed in the inputs' dtype with fp32 accumulation
#   (the logits themselves stay fp32 inside the kernel, never rounded).
#   The backward takes arbitrary per-row upstream gradients g [N] (for
#   target_logp) and glse [N] (for lse, optional):
#   dlogits[i, v] = (glse_i - g_i) * softmax_iv + g_i * [v == t_i],
#   dx = dlogits @ W, dW = dlogits^T @ x, db = dlogits.sum(0).
#
# How: the forward is one Triton kernel over (row tile x vocab tile): each
#   program computes a [BLOCK_M, BLOCK_N] logits tile with tl.dot, reduces it to
#   a per-row partial logsumexp, and picks out the target logit when the target
#   falls in its tile (cut-cross-entropy style). A [N, C/BLOCK_N] fp32 table of
#   partials is merged by torch.logsumexp. Nothing of size [N, C] exists.
#   The backward walks the vocabulary in chunks of `cols` classes: a Triton
#   kernel recomputes the logits of the chunk, turns them into dlogits
#   [N, cols] (inputs' dtype; its column sums go to a fp32 [N/BLOCK_M, C] table
#   for db), then two cuBLAS GEMMs give dW[chunk] (complete) and add the chunk's
#   share of dx (accumulated in fp32). `cols` comes from a byte budget
#   (`vocab_chunk_cols`), so the largest temporary is <= max(budget, N x BLOCK_N).
#
# Memory, N = 16384 masked rows, C = 50257, d = 768, bf16: the full-logits path
#   holds [N, C] logits in bf16 (1.6 GB) plus fp32 copies / log-softmax output /
#   their gradients (3.3 GB each); here the forward keeps 13 MB of partials and
#   the backward one ~128 MB dlogits chunk + a 50 MB fp32 dx accumulator. Measured on
#   H200 (torch 2.11, triton 3.6): peak extra memory fwd 25 MB vs 6.3 GB eager, fwd+bwd
#   0.3 GB vs 12.6 GB eager (7.9 GB torch.compile), gradients included; time fwd 2.8 ms
#   vs 19.1 ms eager / 4.5 ms compiled, fwd+bwd 10.9 ms vs 41.9 / 19.6 ms.
#   Cost: the backward recomputes the logits (one extra 2*N*d*C GEMM).
#
# Limits: fp32 / bf16 / fp16 inputs (all three of x, W, b the same dtype; fp32
#   uses IEEE fp32 dot products in the kernels, the GEMMs follow torch's TF32
#   setting); int64 targets in [0, C); any d (the kernel loops over d).
#   Targets outside [0, C) raise a ValueError when validate=True (one host sync);
#   with validate=False they give NaN target_logp without a sync.
#
# t_DSE note: sum_v exp(log p_v) = sum_v exp(logit_v - lse) is identically 1
#   (up to fp32 rounding) and its gradient is exactly zero, so the loss can use
#   the closed form sum_v exp(log p_v - log e) = 1/e without touching the logits.
import functools
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from radd_fast.kernels.utils import (
    HAS_TRITON,
    SUPPORTED_DTYPES,
    TUNED_CAPABILITY,
    card_of,
    first_fitting,
    pipeline_buffers,
    require,
    triton_runs_on,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

# dlogits chunk of the backward. On H200 (N=16384, C=50257, bf16) 64 / 128 / 256 MiB chunks
# timed the same within run-to-run noise (8.0-9.1 ms); 128 MiB keeps the peak ~100 MB lower.
DEFAULT_CHUNK_BYTES = 128 * 2**20


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tile_ids(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # Walk GROUP_M row tiles together across the vocab tiles so that the
        # W tiles they share stay in L2 (grouped launch order).
        tiles_m = tl.cdiv(n_rows, BLOCK_M)
        tiles_n = tl.cdiv(n_cols, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        return pid_m, pid_n

    @triton.jit
    def _logits_tile(
        x_ptr,  # [N, d]
        w_ptr,  # [C, d]
        b_ptr,  # [C] (unused without HAS_BIAS)
        rows,  # [BLOCK_M] int32 row ids (may run past N)
        cols,  # [BLOCK_N] int32 class ids (may run past C)
        N, C, D,
        stride_xn, stride_wc,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # Out-of-range rows / classes read a valid row instead (wrap around), so
        # the loads need no row mask; the callers discard those lanes.
        rows_ld = (rows % N).to(tl.int64)
        cols_ld = (cols % C).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows_ld[:, None] * stride_xn + ks[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + cols_ld[:, None] * stride_wc + ks[None, :]  # [BLOCK_N, BLOCK_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_ok = (k0 + ks) < D
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols_ld).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _lse_partial_kernel(
        x_ptr,  # [N, d]
        w_ptr,  # [C, d]
        b_ptr,  # [C]
        tgt_ptr,  # [N] int64
        part_ptr,  # [N, cdiv(C, BLOCK_N)] fp32: logsumexp of each vocab tile
        tlogit_ptr,  # [N] fp32: the target logit (left as is when the target is out of range)
        N, C, D,
        stride_xn, stride_wc, stride_part,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid_m, pid_n = _tile_ids(tl.program_id(0), N, C, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        col_ok = cols < C
        logits = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, N, C, D, stride_xn, stride_wc,
                              HAS_BIAS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        # every tile holds at least one real class, so m is finite
        m = tl.max(logits, axis=1)
        s = tl.sum(tl.exp(logits - m[:, None]), axis=1)
        rows64 = rows.to(tl.int64)
        tl.store(part_ptr + rows64 * stride_part + pid_n, m + tl.log(s), mask=row_ok)

        tgt = tl.load(tgt_ptr + rows64, mask=row_ok, other=-1)
        hit = cols[None, :] == tgt[:, None]
        t_logit = tl.sum(tl.where(hit, logits, 0.0), axis=1)
        mine = row_ok & (tgt >= pid_n * BLOCK_N) & (tgt < pid_n * BLOCK_N + BLOCK_N) & (tgt < C)
        tl.store(tlogit_ptr + rows64, t_logit, mask=mine)

    @triton.jit
    def _dlogits_kernel(
        x_ptr,  # [N, d]
        w_ptr,  # [C, d]
        b_ptr,  # [C]
        tgt_ptr,  # [N] int64
        lse_ptr,  # [N] fp32
        g_ptr,  # [N] fp32, upstream gradient of target_logp
        glse_ptr,  # [N] fp32, upstream gradient of lse (unused without HAS_GLSE)
        dl_ptr,  # [N, cols] inputs' dtype: dlogits of classes [col0, col_end)
        dbp_ptr,  # [cdiv(N, BLOCK_M), C] fp32: per-row-tile column sums of dlogits
        N, C, D, col0, col_end,
        stride_xn, stride_wc, stride_dl, stride_dbp,
        HAS_BIAS: tl.constexpr, HAS_GLSE: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid_m, pid_n = _tile_ids(tl.program_id(0), N, col_end - col0, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside the chunk
        cols = col0 + local
        row_ok = rows < N
        col_ok = cols < col_end
        logits = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, N, C, D, stride_xn, stride_wc,
                              HAS_BIAS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        rows64 = rows.to(tl.int64)
        lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows64, mask=row_ok, other=0.0)
        tgt = tl.load(tgt_ptr + rows64, mask=row_ok, other=-1)
        if HAS_GLSE:
            coef = tl.load(glse_ptr + rows64, mask=row_ok, other=0.0) - g
        else:
            coef = -g
        p = tl.exp(logits - lse[:, None])
        hit = cols[None, :] == tgt[:, None]
        dl = coef[:, None] * p + tl.where(hit, g[:, None], 0.0)
        ok = row_ok[:, None] & col_ok[None, :]
        dl = tl.where(ok, dl, 0.0)  # wrapped rows may hold inf * 0
        tl.store(dl_ptr + rows64[:, None] * stride_dl + local[None, :],
                 dl.to(dl_ptr.dtype.element_ty), mask=ok)
        tl.store(dbp_ptr + pid_m.to(tl.int64) * stride_dbp + cols, tl.sum(dl, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------
# Launch configuration and plan (pure functions)
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            require(v >= 16 and v & (v - 1) == 0, f"TileConfig.{name} must be a power of two >= 16 (tl.dot), got {v}")
        require(self.group_m >= 1, f"TileConfig.group_m must be >= 1, got {self.group_m}")


def _tuned_tiles(dtype: torch.dtype) -> TileConfig:
    if dtype == torch.float32:  # IEEE fp32 dot products: register-bound, smaller tiles
        return TileConfig(64, 64, 32, num_warps=4, num_stages=3)
    # 16-bit, H200 sweep at N=16384, d=768, C=50257 (benchmarks/bench_linear_log_softmax.py --sweep):
    # fwd 2.8-2.9 ms vs 3.3-3.7 ms for 256x128 / 128x128 / 64x256 tiles; bwd 8.2-9.1 ms vs 9.2-9.9 ms
    # for 128x128 / 256x128 (noise between runs is ~0.5 ms)
    return TileConfig(128, 256, 64, num_warps=8, num_stages=3)


def tile_smem_bytes(cfg: TileConfig, capability: tuple, dtype: torch.dtype) -> int:
    """Estimated shared memory of either kernel: ``pipeline_buffers`` copies of the x and W tiles
    of one d step ([block_m + block_n, block_k] in the inputs' dtype); see docs/KERNELS.md."""
    step = (cfg.block_m + cfg.block_n) * cfg.block_k * dtype.itemsize
    return pipeline_buffers(capability, dtype, cfg.num_stages) * step


@functools.lru_cache(maxsize=None)  # pure, and asked on every launch
def tile_config_for(capability: tuple, smem_limit: int, dtype: torch.dtype, backward: bool = False) -> TileConfig:
    """Block sizes on a card: the tuned ones where they fit, else (in order) 2 stages, then 128 classes a tile.

    ``backward`` picks the dlogits kernel's (today the forward's)."""
    tuned = _tuned_tiles(dtype)
    if capability == TUNED_CAPABILITY:
        return tuned
    candidates = [tuned, replace(tuned, num_stages=2), replace(tuned, block_n=min(tuned.block_n, 128), num_stages=2)]
    return first_fitting(candidates, lambda cfg: tile_smem_bytes(cfg, capability, dtype), smem_limit)


def tile_config(dtype: torch.dtype, device: torch.device, backward: bool = False) -> TileConfig:
    """Block sizes per (dtype, device); `backward` picks the dlogits kernel's (today the forward's).

    Small tiles under the CPU interpreter keep the tests fast; on CUDA, ``tile_config_for`` the card.
    """
    if device.type != "cuda":
        return TileConfig(16, 64, 32)
    capability, smem_limit = card_of(device)
    return tile_config_for(capability, smem_limit, dtype, backward)


def vocab_chunk_cols(n_rows: int, n_classes: int, itemsize: int, budget_bytes: int, block_n: int) -> int:
    """Classes per backward chunk: the dlogits chunk [n_rows, cols] * itemsize fits the budget.

    cols is a multiple of block_n (or all n_classes), at least one block (so the
    bound is max(budget_bytes, n_rows * block_n * itemsize)), and the chunks are
    balanced: ceil(n_classes / cols) chunks of nearly equal width.
    """
    require(n_classes >= 1 and block_n >= 1 and itemsize >= 1, "vocab_chunk_cols: sizes must be positive")
    per_col = max(1, n_rows) * itemsize
    max_cols = max(block_n, budget_bytes // per_col // block_n * block_n)
    if max_cols >= n_classes:
        return n_classes
    n_chunks = -(-n_classes // max_cols)
    per_chunk = -(-n_classes // n_chunks)
    return -(-per_chunk // block_n) * block_n


def _dot_precision(dtype: torch.dtype) -> str:
    # IEEE fp32 products for fp32 inputs (no TF32); 16-bit inputs use the
    # tensor cores at their native precision (the option only affects fp32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _new(shape, dtype, device) -> torch.Tensor:
    # Every buffer the launchers write goes through here (tests poison it).
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------
def _check_inputs(x, weight, bias, targets) -> None:
    require(x.dim() == 2, f"x must be [N, d], got shape {tuple(x.shape)}")
    require(weight.dim() == 2, f"weight must be [C, d], got shape {tuple(weight.shape)}")
    require(x.shape[1] == weight.shape[1], f"x [N, d={x.shape[1]}] and weight [C, d={weight.shape[1]}] disagree on d")
    require(weight.shape[0] >= 1 and x.shape[1] >= 1, f"need C >= 1 and d >= 1, got weight {tuple(weight.shape)}")
    require(x.dtype in SUPPORTED_DTYPES, f"x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    require(weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}; cast explicitly")
    require(targets.dtype == torch.int64, f"targets must be int64, got {targets.dtype}")
    require(tuple(targets.shape) == (x.shape[0],), f"targets must be [N={x.shape[0]}], got {tuple(targets.shape)}")
    tensors = [x, weight, targets]
    if bias is not None:
        require(tuple(bias.shape) == (weight.shape[0],), f"bias must be [C={weight.shape[0]}], got {tuple(bias.shape)}")
        require(bias.dtype == x.dtype, f"bias dtype {bias.dtype} != x dtype {x.dtype}; cast explicitly")
        tensors.append(bias)
    require(len({t.device for t in tensors}) == 1, f"inputs on different devices: {[str(t.device) for t in tensors]}")
    require(x.stride(1) == 1 and weight.stride(1) == 1, "x and weight need unit stride along d (call .contiguous())")
    require(targets.stride(0) == 1 or targets.numel() <= 1, "targets must be contiguous")
    require(bias is None or bias.stride(0) == 1 or bias.numel() <= 1, "bias must be contiguous")


def _check_targets(targets: torch.Tensor, n_classes: int) -> None:
    if targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= n_classes)
    if bool(bad.any()):  # host sync, only when asked for
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets must lie in [0, C={n_classes}); targets[{i}] = {int(targets[i])}")


def linear_log_softmax_gather_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    validate: bool = True, config: Optional[TileConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (target_logp [N] fp32, lse [N] fp32). See the module header."""
    _check_inputs(x, weight, bias, targets)
    N, D = x.shape
    C = weight.shape[0]
    if validate:
        _check_targets(targets, C)
    cfg = config or tile_config(x.dtype, x.device)
    tlogit = _new((N,), torch.float32, x.device)
    if N == 0:
        return tlogit, _new((0,), torch.float32, x.device)
    tlogit.fill_(float("nan"))  # stays NaN for out-of-range targets
    tiles_n = triton.cdiv(C, cfg.block_n)
    part = _new((N, tiles_n), torch.float32, x.device)
    grid = (triton.cdiv(N, cfg.block_m) * tiles_n,)
    _lse_partial_kernel[grid](
        x, weight, bias if bias is not None else x, targets, part, tlogit,
        N, C, D,
        x.stride(0), weight.stride(0), part.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=D % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    lse = torch.logsumexp(part, dim=1)
    return tlogit - lse, lse


def linear_log_softmax_gather_backward(
    g_target: torch.Tensor, g_lse: Optional[torch.Tensor],
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, lse: torch.Tensor,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES, config: Optional[TileConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (dx [N, d], dW [C, d], db [C]) in the inputs' dtype; db is returned even without a bias."""
    _check_inputs(x, weight, bias, targets)
    N, D = x.shape
    C = weight.shape[0]
    for name, t in (("g_target", g_target), ("g_lse", g_lse), ("lse", lse)):
        if t is not None:
            require(tuple(t.shape) == (N,), f"{name} must be [N={N}], got {tuple(t.shape)}")
            require(t.dtype == torch.float32 and (t.stride(0) == 1 or N <= 1),
                    f"{name} must be contiguous fp32, got {t.dtype} stride {t.stride()}")
            require(t.device == x.device, f"{name} on {t.device}, x on {x.device}")
    require(chunk_bytes >= 1, f"chunk_bytes must be positive, got {chunk_bytes}")
    cfg = config or tile_config(x.dtype, x.device, backward=True)
    if N == 0:
        dw = _new(weight.shape, weight.dtype, x.device).zero_()
        return _new((0, D), x.dtype, x.device), dw, _new((C,), x.dtype, x.device).zero_()

    cols = vocab_chunk_cols(N, C, x.element_size(), chunk_bytes, cfg.block_n)
    tiles_m = triton.cdiv(N, cfg.block_m)
    dl = _new((N, cols), x.dtype, x.device)  # the one large temporary
    dbp = _new((tiles_m, C), torch.float32, x.device)
    dw = _new(weight.shape, weight.dtype, x.device)
    one_chunk = cols >= C
    # dx: written by one GEMM, or accumulated in fp32 over the chunks
    dx = _new((N, D), x.dtype if one_chunk else torch.float32, x.device)
    for col0 in range(0, C, cols):
        col_end = min(C, col0 + cols)
        dl_c = dl[:, : col_end - col0]
        grid = (tiles_m * triton.cdiv(col_end - col0, cfg.block_n),)
        _dlogits_kernel[grid](
            x, weight, bias if bias is not None else x, targets, lse, g_target,
            g_lse if g_lse is not None else g_target, dl_c, dbp,
            N, C, D, col0, col_end,
            x.stride(0), weight.stride(0), dl_c.stride(0), dbp.stride(0),
            HAS_BIAS=bias is not None, HAS_GLSE=g_lse is not None, EVEN_K=D % cfg.block_k == 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            DOT_PRECISION=_dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        w_c = weight[col0:col_end]
        torch.mm(dl_c.t(), x, out=dw[col0:col_end])  # dW of these classes, complete
        if one_chunk:
            torch.mm(dl_c, w_c, out=dx)
        elif col0 == 0:
            dx.copy_(torch.mm(dl_c, w_c))
        elif dx.dtype == dl_c.dtype:
            dx.addmm_(dl_c, w_c)
        else:
            dx.add_(torch.mm(dl_c, w_c))
    db = dbp.sum(dim=0).to(x.dtype)
    return dx.to(x.dtype), dw, db


# ----------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and their autograd rule
# ----------------------------------------------------------------------------
@torch.library.custom_op("radd_fast::linear_log_softmax_gather", mutates_args=())
def _op_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    validate: bool, chunk_bytes: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return linear_log_softmax_gather_forward(x, weight, bias, targets, validate=validate)


@_op_forward.register_fake
def _(x, weight, bias, targets, validate, chunk_bytes):
    n = x.shape[0]
    return x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("radd_fast::linear_log_softmax_gather_backward", mutates_args=())
def _op_backward(
    g_target: torch.Tensor, g_lse: Optional[torch.Tensor],
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, lse: torch.Tensor,
    chunk_bytes: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_log_softmax_gather_backward(g_target, g_lse, x, weight, bias, targets, lse, chunk_bytes)


@_op_backward.register_fake
def _(g_target, g_lse, x, weight, bias, targets, lse, chunk_bytes):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output):
    x, weight, bias, targets, _validate, chunk_bytes = inputs
    ctx.save_for_backward(x, weight, bias, targets, output[1])
    # An unused output's gradient stays None (not a zero-filled [N]): the backward then skips
    # its term (HAS_GLSE) instead of reading zeros.
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.chunk_bytes = chunk_bytes


def _autograd_backward(ctx, g_target, g_lse):
    x, weight, bias, targets, lse = ctx.saved_tensors
    # upstream grads may be None (unused output) or expanded views (stride 0)
    g_target = torch.zeros_like(lse) if g_target is None else g_target.float().contiguous()
    g_lse = None if g_lse is None else g_lse.float().contiguous()
    dx, dw, db = _op_backward(g_target, g_lse, x, weight, bias, targets, lse, ctx.chunk_bytes)
    return dx, dw, db if ctx.has_bias else None, None, None, None


_op_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def linear_log_softmax_gather(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    validate: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(x @ weight^T + bias)[i, targets[i]] without the [N, C] logits.

    Args:
        x: [N, d] rows (fp32 / bf16 / fp16), e.g. LN_final of the masked positions.
        weight: [C, d] same dtype (e.g. the head's W[:V-1], MASK row excluded).
        bias: [C] same dtype, or None.
        targets: [N] int64 in [0, C).
        validate: check targets on the host (one sync); False skips it and an
            out-of-range target then yields NaN in target_logp.
        chunk_bytes: budget for the backward's dlogits chunk [N, cols].
    Returns:
        target_logp [N] fp32 and lse [N] fp32 (logsumexp over the C classes);
        both differentiable w.r.t. x, weight, bias.

    Example:
        >>> x, w, b = torch.randn(5, 16), torch.randn(11, 16), torch.randn(11)
        >>> t = torch.randint(0, 11, (5,))
        >>> logp, lse = linear_log_softmax_gather(x, w, b, t)
        >>> logp.shape, lse.shape
        (torch.Size([5]), torch.Size([5]))
    """
    if not triton_runs_on(x):
        _check_inputs(x, weight, bias, targets)
        if validate:
            _check_targets(targets, weight.shape[0])
        return linear_log_softmax_gather_ref(x, weight, bias, targets)
    return _op_forward(x, weight, bias, targets, validate, chunk_bytes)


def linear_log_softmax_gather_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The published computation: full [N, C] logits in the inputs' dtype, upcast
    to fp32, log_softmax, gather. Pass fp32 copies for an fp32 ground truth."""
    logits = F.linear(x, weight, bias).float()  # [N, C]
    logp = torch.log_softmax(logits, dim=-1)
    t = targets[:, None]
    target_logp = logp.gather(1, t).squeeze(1)
    # lse = logit_t - log p_t: no second [N, C] pass for a logsumexp
    lse = logits.gather(1, t).squeeze(1) - target_logp
    return target_logp, lse
