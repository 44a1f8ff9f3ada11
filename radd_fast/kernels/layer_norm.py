"""LayerNormWot (layer norm without affine, stats in fp32, then ``* weight + bias``)
and its residual-fused form, as Triton kernels.

Computes, per row of ``x: [..., d]``::

    y = (x - mean) * rstd * weight + bias,   mean, rstd over the row in fp32

which is the published ``F.layer_norm(x.float(), [d]) * weight + bias``. The fused
form used by the transformer block also does the residual add first::

    new_x  = x + dropout(delta)              # x fp32 residual stream, delta may be bf16
    normed = LN(new_x) * weight + bias       # often stored in bf16 for the next GEMM

Limits: rows of at most ``MAX_D`` elements (a whole row lives in registers: each program
holds a [rows, next_pow2(d)] tile); x, delta, y in fp32 / bf16 / fp16; the last dim
must be contiguous; dropout needs N * d < 2^31 (int32 Philox counter).

Memory traffic (N rows, d columns, s_in / s_out bytes per element):
- forward: read x once, write y once (N d (s_in + s_out)) plus 8 bytes a row of
  saved mean/rstd. The eager LayerNormWot makes an fp32 copy, normalises it,
  then runs two more elementwise passes (mul, add) and a cast.
- backward: read x, dy (and the incoming residual grad), write dx: one pass.
  dweight/dbias are accumulated per program in registers and written as
  ``[P, d]`` fp32 partial sums (P ~ a few per SM), summed by a tiny reduction.
- fused: the residual add, dropout and norm share one read of x and delta; the
  dropout mask is regenerated in backward from a seed (Philox), never stored.

Measured (H200, [32768, 768] bf16, kernel-only via CUDA graphs): forward 29 us (3.4 TB/s),
backward 72 us (2.1 TB/s). Called eagerly, small shapes are bound by Python launch overhead.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from radd_fast.kernels.utils import (
    HAS_TRITON,
    next_power_of_2,
    require,
    require_device,
    require_dtype,
    require_tensor,
    triton_runs_on,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_D = 16384  # an fp32 row of 64 KiB in registers; beyond this a looped kernel is needed


# --------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _layer_norm_fwd_kernel(
        X,  # [N, d] LN input, or the residual stream when HAS_DELTA
        DELTA,  # [N, d] residual delta (HAS_DELTA)
        W,  # [d]
        B,  # [d]
        Y,  # [N, d] normed output
        XNEW,  # [N, d] x + dropout(delta) (HAS_DELTA)
        MEAN,  # [N] fp32
        RSTD,  # [N] fp32
        SEED,  # [1] int64 Philox seed (DROPOUT)
        N,
        d,
        eps,
        p_drop,
        keep_scale,
        stride_x,
        stride_delta,
        stride_y,
        stride_xnew,
        HAS_DELTA: tl.constexpr,
        DROPOUT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # a [ROWS, BLOCK] tile of whole rows per program: more bytes in flight than one row
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < N
        mask = row_ok[:, None] & (cols[None, :] < d)
        r2, c2 = rows[:, None], cols[None, :]
        x = tl.load(X + r2 * stride_x + c2, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            delta = tl.load(DELTA + r2 * stride_delta + c2, mask=mask, other=0.0).to(tl.float32)
            if DROPOUT:
                # element index as the Philox counter: backward regenerates the same mask
                rnd = tl.rand(tl.load(SEED), (r2 * d + c2).to(tl.int32))
                delta = tl.where(rnd >= p_drop, delta * keep_scale, 0.0)
            # round to the stored dtype first so backward (which reloads new_x) sees the same values
            x = (x + delta).to(XNEW.dtype.element_ty)
            tl.store(XNEW + r2 * stride_xnew + c2, x, mask=mask)
            x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / d
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / d
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        w = tl.load(W + cols, mask=cols < d, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cols < d, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + r2 * stride_y + c2, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _layer_norm_bwd_kernel(
        X,  # [N, d] saved LN input (new_x in the fused form)
        W,  # [d]
        DY,  # [N, d] grad of the normed output
        DXIN,  # [N, d] grad arriving at new_x directly (HAS_DXIN)
        MEAN,  # [N] fp32
        RSTD,  # [N] fp32
        DX,  # [N, d] grad of the LN input (+ DXIN)
        DDELTA,  # [N, d] grad of the residual delta (HAS_DELTA)
        SEED,  # [1] int64 (DROPOUT)
        DW_PART,  # [P, d] fp32 per-program partial sums
        DB_PART,  # [P, d] fp32
        N,
        d,
        tiles_per_prog,
        p_drop,
        keep_scale,
        stride_x,
        stride_dy,
        stride_dxin,
        stride_dx,
        stride_ddelta,
        HAS_DXIN: tl.constexpr,
        HAS_DELTA: tl.constexpr,
        DROPOUT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # each program walks its own run of [ROWS, BLOCK] tiles, keeping dw/db in registers
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < d
        c2 = cols[None, :]
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK], dtype=tl.float32)
        first_row = pid.to(tl.int64) * tiles_per_prog * ROWS
        for i in range(0, tiles_per_prog):
            rows = first_row + i * ROWS + tl.arange(0, ROWS)
            row_ok = rows < N
            mask = row_ok[:, None] & col_ok[None, :]
            r2 = rows[:, None]
            x = tl.load(X + r2 * stride_x + c2, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r2 * stride_dy + c2, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dw_acc += tl.sum(dy * xhat, axis=0)
            db_acc += tl.sum(dy, axis=0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=1) / d
            c0 = tl.sum(wdy, axis=1) / d
            dx = (wdy - (xhat * c1[:, None] + c0[:, None])) * rstd[:, None]
            if HAS_DXIN:
                dx += tl.load(DXIN + r2 * stride_dxin + c2, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r2 * stride_dx + c2, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DELTA:
                if DROPOUT:
                    rnd = tl.rand(tl.load(SEED), (r2 * d + c2).to(tl.int32))
                    dx = tl.where(rnd >= p_drop, dx * keep_scale, 0.0)
                tl.store(DDELTA + r2 * stride_ddelta + c2, dx.to(DDELTA.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid * d + cols, dw_acc, mask=col_ok)
        tl.store(DB_PART + pid * d + cols, db_acc, mask=col_ok)


# ------------------------------------------------------------------------- launchers
# Tile sizes from a sweep on an H200 at [32768, 768|1024] bf16 (CUDA-graph timings): the
# forward wants ~4K elements a program (4 rows of 768: 29 us, 3.4 TB/s vs 51 us with 1 row);
# the backward one row a step with 8 programs an SM (72 us vs 143 us with 2 an SM).
def _fwd_config(block: int):
    """(rows per program, num_warps) for the forward."""
    return max(1, min(16, 4096 // block)), 4 if block <= 2048 else 8 if block <= 8192 else 16


def _bwd_config(block: int, device: torch.device):
    """(rows per tile, num_warps, programs per SM) for the backward."""
    return max(1, min(16, 1024 // block)), 4 if block <= 2048 else 8 if block <= 8192 else 16, 8


def _check_x(x: torch.Tensor) -> Tuple[int, int]:
    """The LN input of a launcher: 2-D rows that fit one tile; returns ``(N, d)``."""
    require(x.dim() == 2, lambda: f"x: expected [N, d], got shape {tuple(x.shape)}")
    n, d = x.shape
    require(1 <= d <= MAX_D, lambda: f"x: row size d={d} outside [1, {MAX_D}] (a row must fit in one tile)")
    _check_rows("x", x, n, d)
    return n, d


def _check_rows(name: str, t: torch.Tensor, n: int, d: int) -> None:
    require_tensor(name, t, shape=(n, d))


def _check_vec(name: str, t: torch.Tensor, d: int, device: torch.device) -> None:
    require_tensor(name, t, shape=(d,), last_dim=None)
    require(t.is_contiguous(), lambda: f"{name}: must be contiguous")
    require_device(name, t, device)


def _check_dropout(p: float, seed: Optional[torch.Tensor], n: int, d: int, device: torch.device) -> bool:
    require(0.0 <= p < 1.0, lambda: f"dropout_p must be in [0, 1), got {p}")
    if p == 0.0:
        return False
    require(seed is not None and seed.numel() == 1 and seed.dtype == torch.int64 and seed.device == device,
            "dropout needs seed: a one-element int64 tensor on the input's device")
    require(n * d < 2**31, lambda: f"dropout: {n}x{d} elements overflow the int32 Philox counter")
    return True


def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    out_dtype: Optional[torch.dtype] = None,
    delta: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    new_x_out: Optional[torch.Tensor] = None,
):
    """Launch the forward kernel on 2-D ``x: [N, d]``.

    Returns ``(y [N, d] out_dtype, new_x [N, d] x.dtype or None, mean [N] fp32, rstd [N] fp32)``.
    With ``delta`` the kernel first forms ``new_x = x + dropout(delta)`` and normalises that.
    """
    n, d = _check_x(x)
    _check_vec("weight", weight, d, x.device)
    _check_vec("bias", bias, d, x.device)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    require_dtype("out_dtype", out_dtype)
    require(eps > 0, lambda: f"eps must be positive, got {eps}")
    has_delta = delta is not None
    dropout = False
    if has_delta:
        _check_rows("delta", delta, n, d)
        require_device("delta", delta, x.device)
        dropout = _check_dropout(dropout_p, seed, n, d, x.device)
        new_x = torch.empty((n, d), device=x.device, dtype=x.dtype) if new_x_out is None else new_x_out
        _check_rows("new_x_out", new_x, n, d)
        require(new_x.dtype == x.dtype, lambda: f"new_x_out: dtype {new_x.dtype}, expected {x.dtype}")
    else:
        require(dropout_p == 0.0, "dropout_p needs a residual delta")
        new_x = None
    y = torch.empty((n, d), device=x.device, dtype=out_dtype) if out is None else out
    _check_rows("out", y, n, d)
    require(y.dtype == out_dtype, lambda: f"out: dtype {y.dtype}, expected {out_dtype}")
    mean = torch.empty(n, device=x.device, dtype=torch.float32)
    rstd = torch.empty(n, device=x.device, dtype=torch.float32)
    if n == 0:
        return y, new_x, mean, rstd
    block = next_power_of_2(d)
    rows, warps = _fwd_config(block)
    _layer_norm_fwd_kernel[(triton.cdiv(n, rows),)](
        x, delta if has_delta else x, weight, bias, y, new_x if has_delta else y, mean, rstd,
        seed if dropout else mean,
        n, d, float(eps), float(dropout_p), 1.0 / (1.0 - dropout_p),
        x.stride(0), delta.stride(0) if has_delta else 0, y.stride(0), new_x.stride(0) if has_delta else 0,
        HAS_DELTA=has_delta, DROPOUT=dropout, ROWS=rows, BLOCK=block, num_warps=warps,
    )
    return y, new_x, mean, rstd


_SM_COUNT = {}


def _num_programs(tiles: int, per_sm: int, device: torch.device) -> int:
    if device.type != "cuda":
        return max(1, min(tiles, 4))  # interpreter: fewer programs, same work
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, _SM_COUNT[device] * per_sm))


def layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dx_in: Optional[torch.Tensor] = None,
    delta_dtype: Optional[torch.dtype] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    dx_out: Optional[torch.Tensor] = None,
    ddelta_out: Optional[torch.Tensor] = None,
):
    """Launch the backward kernel on 2-D ``dy, x: [N, d]`` (x = the saved LN input).

    Returns ``(dx [N, d] x.dtype, ddelta [N, d] delta_dtype or None, dweight [d], dbias [d])``.
    ``dx_in`` (the grad reaching new_x directly) is added to dx; with ``delta_dtype`` the kernel
    also writes ``ddelta = dropout_mask * dx`` for the fused residual form.
    """
    n, d = _check_x(x)
    _check_rows("dy", dy, n, d)
    require_device("dy", dy, x.device)
    _check_vec("weight", weight, d, x.device)
    for name, t in (("mean", mean), ("rstd", rstd)):
        require(t.dim() == 1 and t.shape[0] == n and t.dtype == torch.float32 and t.is_contiguous()
                and t.device == x.device,
                lambda: f"{name}: expected a contiguous fp32 [{n}] tensor on {x.device}, got {tuple(t.shape)} {t.dtype}")
    if dx_in is not None:
        _check_rows("dx_in", dx_in, n, d)
    has_delta = delta_dtype is not None
    dropout = False
    if has_delta:
        require_dtype("delta_dtype", delta_dtype)
        dropout = _check_dropout(dropout_p, seed, n, d, x.device)
        ddelta = torch.empty((n, d), device=x.device, dtype=delta_dtype) if ddelta_out is None else ddelta_out
        _check_rows("ddelta_out", ddelta, n, d)
    else:
        require(dropout_p == 0.0, "dropout_p needs delta_dtype (the fused residual form)")
        ddelta = None
    dx = torch.empty((n, d), device=x.device, dtype=x.dtype) if dx_out is None else dx_out
    _check_rows("dx_out", dx, n, d)
    block = next_power_of_2(d)
    rows, warps, per_sm = _bwd_config(block, x.device)
    tiles = triton.cdiv(n, rows)
    p = _num_programs(tiles, per_sm, x.device)
    part = torch.empty((2, p, d), device=x.device, dtype=torch.float32)  # dw, db partial sums
    if n > 0:
        _layer_norm_bwd_kernel[(p,)](
            x, weight, dy, dx_in if dx_in is not None else dy, mean, rstd, dx,
            ddelta if has_delta else dx, seed if dropout else mean, part[0], part[1],
            n, d, triton.cdiv(tiles, p), float(dropout_p), 1.0 / (1.0 - dropout_p),
            x.stride(0), dy.stride(0), dx_in.stride(0) if dx_in is not None else 0, dx.stride(0),
            ddelta.stride(0) if has_delta else 0,
            HAS_DXIN=dx_in is not None, HAS_DELTA=has_delta, DROPOUT=dropout, ROWS=rows, BLOCK=block,
            num_warps=warps,
        )
    else:
        part.zero_()
    # two separate reductions: the returned grads must not alias each other (custom op rule)
    return dx, ddelta, part[0].sum(0).to(weight.dtype), part[1].sum(0).to(weight.dtype)


# ------------------------------------------------------------------------- autograd
def _rows_view(t: torch.Tensor, d: int) -> torch.Tensor:
    """``[..., d]`` -> ``[N, d]`` without a copy when the last dim is already contiguous."""
    return t.reshape(-1, d) if t.stride(-1) == 1 else t.contiguous().view(-1, d)


class _LayerNormFn(torch.autograd.Function):
    """Eager path: a plain autograd.Function costs a few us a call, a custom op ~10x more."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        y, _, mean, rstd = layer_norm_forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, _, dw, db = layer_norm_backward(_rows_view(dy, x.shape[1]), x, weight, mean, rstd)
        return dx, dw, db, None, None


class _AddLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, bias, seed, dropout_p, eps, out_dtype):
        y, new_x, mean, rstd = layer_norm_forward(x, weight, bias, eps, out_dtype, delta=delta,
                                                  dropout_p=dropout_p, seed=seed)
        ctx.save_for_backward(new_x, weight, mean, rstd, seed)
        ctx.dropout_p, ctx.delta_dtype = dropout_p, delta.dtype
        ctx.set_materialize_grads(False)  # an unused output gets None, not a zero-filled [N, d]
        return new_x, y

    @staticmethod
    def backward(ctx, dnew_x, dy):
        new_x, weight, mean, rstd, seed = ctx.saved_tensors
        dx, ddelta, dw, db = _add_ln_backward_impl(dnew_x, dy, new_x, weight, mean, rstd, seed,
                                                   ctx.dropout_p, ctx.delta_dtype)
        return dx, ddelta, dw, db, None, None, None, None


def _add_ln_backward_impl(dnew_x, dy, new_x, weight, mean, rstd, seed, dropout_p, delta_dtype):
    d = new_x.shape[1]
    if dy is None:  # only new_x was used downstream
        dy = torch.zeros_like(new_x)
    dnew_x = None if dnew_x is None else _rows_view(dnew_x, d)
    return layer_norm_backward(_rows_view(dy, d), new_x, weight, mean, rstd, dx_in=dnew_x,
                               delta_dtype=delta_dtype, dropout_p=dropout_p, seed=seed)


# ------------------------------------------------------ custom ops (torch.compile path)
# Opaque to torch.compile (the fake functions give it output metadata); register_autograd
# gives them the same backward as the autograd.Functions above.
@torch.library.custom_op("radd_fast::layer_norm_fwd", mutates_args=())
def _ln_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = layer_norm_forward(x, weight, bias, eps, out_dtype)
    return y, mean, rstd


@_ln_fwd_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    n = x.shape[0]
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("radd_fast::layer_norm_bwd", mutates_args=())
def _ln_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
               rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, _, dw, db = layer_norm_backward(dy, x, weight, mean, rstd)
    return dx, dw, db


@_ln_bwd_op.register_fake
def _(dy, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _ln_setup_context(ctx, inputs, output):
    x, weight, _, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _ln_bwd_op(_rows_view(dy, x.shape[1]), x, weight, mean, rstd)
    return dx, dw, db, None, None


_ln_fwd_op.register_autograd(_ln_backward, setup_context=_ln_setup_context)


@torch.library.custom_op("radd_fast::add_layer_norm_fwd", mutates_args=())
def _add_ln_fwd_op(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   seed: Optional[torch.Tensor], dropout_p: float, eps: float,
                   out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, new_x, mean, rstd = layer_norm_forward(x, weight, bias, eps, out_dtype, delta=delta,
                                              dropout_p=dropout_p, seed=seed)
    return new_x, y, mean, rstd


@_add_ln_fwd_op.register_fake
def _(x, delta, weight, bias, seed, dropout_p, eps, out_dtype):
    n = x.shape[0]
    return (torch.empty_like(x), x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32))


@torch.library.custom_op("radd_fast::add_layer_norm_bwd", mutates_args=())
def _add_ln_bwd_op(dnew_x: Optional[torch.Tensor], dy: Optional[torch.Tensor], new_x: torch.Tensor,
                   weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, seed: Optional[torch.Tensor],
                   dropout_p: float,
                   delta_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_ln_backward_impl(dnew_x, dy, new_x, weight, mean, rstd, seed, dropout_p, delta_dtype)


@_add_ln_bwd_op.register_fake
def _(dnew_x, dy, new_x, weight, mean, rstd, seed, dropout_p, delta_dtype):
    return (torch.empty_like(new_x), new_x.new_empty(new_x.shape, dtype=delta_dtype),
            torch.empty_like(weight), torch.empty_like(weight))


def _add_ln_setup_context(ctx, inputs, output):
    _, delta, weight, _, seed, dropout_p, _, _ = inputs
    new_x, _, mean, rstd = output
    ctx.save_for_backward(new_x, weight, mean, rstd, seed)
    ctx.dropout_p, ctx.delta_dtype = dropout_p, delta.dtype


def _add_ln_backward(ctx, dnew_x, dy, _dmean, _drstd):
    new_x, weight, mean, rstd, seed = ctx.saved_tensors
    dx, ddelta, dw, db = _add_ln_bwd_op(dnew_x, dy, new_x, weight, mean, rstd, seed, ctx.dropout_p, ctx.delta_dtype)
    return dx, ddelta, dw, db, None, None, None, None


_add_ln_fwd_op.register_autograd(_add_ln_backward, setup_context=_add_ln_setup_context)


# --------------------------------------------------------------------- public functions
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LayerNormWot: ``F.layer_norm(x.float(), [d], eps=eps) * weight + bias``, stats in fp32.

    Shapes: ``x: [..., d]``, ``weight, bias: [d]``; returns ``[..., d]`` in ``out_dtype``
    (default ``x.dtype``; the model passes bf16 so the next GEMM reads half the bytes).
    Differentiable in x, weight and bias; works inside ``torch.compile`` (as the custom op
    ``radd_fast::layer_norm_fwd``). Falls back to :func:`layer_norm_ref` where Triton cannot
    run on ``x``'s device.

    Example::

        >>> x = torch.randn(2, 5, 64)
        >>> w, b = torch.ones(64), torch.zeros(64)
        >>> layer_norm(x, w, b).shape
        torch.Size([2, 5, 64])
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if not triton_runs_on(x):
        return layer_norm_ref(x, weight, bias, eps).to(out_dtype)
    x2 = _rows_view(x, x.shape[-1])
    if torch.compiler.is_compiling():
        y = _ln_fwd_op(x2, weight, bias, float(eps), out_dtype)[0]
    else:
        y = _LayerNormFn.apply(x2, weight, bias, float(eps), out_dtype)
    return y.view(x.shape)


def add_layer_norm(x: torch.Tensor, residual_delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   dropout_p: float = 0.0, training: bool = False, eps: float = 1e-5,
                   out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual add, dropout and LayerNormWot in one pass.

    ``new_x = x + dropout(residual_delta)`` (dropout only when ``training``), then
    ``normed = LN(new_x) * weight + bias``. Shapes: ``x, residual_delta: [..., d]`` (delta
    may be bf16 while x is fp32), ``weight, bias: [d]``. Returns ``(new_x [..., d] x.dtype,
    normed [..., d] out_dtype)``; ``out_dtype`` defaults to ``x.dtype``.

    The dropout mask comes from a Philox seed drawn from torch's RNG (so
    ``torch.manual_seed`` and checkpoint recomputation reproduce it) and is regenerated
    in backward, never stored; it is a different mask than ``F.dropout`` would draw.
    The fallback (no Triton) is :func:`add_layer_norm_ref` with ``F.dropout``.

    Example::

        >>> x, delta = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
        >>> w, b = torch.ones(64), torch.zeros(64)
        >>> new_x, normed = add_layer_norm(x, delta, w, b)
        >>> torch.allclose(new_x, x + delta)
        True
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    p = float(dropout_p) if training else 0.0
    if not triton_runs_on(x):
        new_x, normed = add_layer_norm_ref(x, residual_delta, weight, bias, p, training, eps)
        return new_x, normed.to(out_dtype)
    require(residual_delta.shape == x.shape,
            lambda: f"residual_delta: shape {tuple(residual_delta.shape)} != x {tuple(x.shape)}")
    d = x.shape[-1]
    seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64) if p > 0 else None
    args = (_rows_view(x, d), _rows_view(residual_delta, d), weight, bias, seed, p, float(eps), out_dtype)
    if torch.compiler.is_compiling():
        new_x, y = _add_ln_fwd_op(*args)[:2]
    else:
        new_x, y = _AddLayerNormFn.apply(*args)
    return new_x.view(x.shape), y.view(x.shape)


# ------------------------------------------------------------------------- references
def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The published LayerNormWot in plain PyTorch; returns fp32 ``[..., d]``.

    Statistics in fp32 with no affine inside the normalisation, then ``* weight + bias``;
    autocast is off so the result is fp32 whatever the caller's autocast region.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.layer_norm(x.float(), [x.shape[-1]], eps=eps) * weight.float() + bias.float()


def add_layer_norm_ref(x: torch.Tensor, residual_delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       dropout_p: float = 0.0, training: bool = False,
                       eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """``new_x = x + dropout(delta)`` (in x.dtype), ``normed = layer_norm_ref(new_x)`` (fp32)."""
    new_x = (x.float() + F.dropout(residual_delta.float(), dropout_p, training)).to(x.dtype)
    return new_x, layer_norm_ref(new_x, weight, bias, eps)
