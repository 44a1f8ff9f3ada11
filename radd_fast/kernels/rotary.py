"""Half-split (NeoX) rotary embedding on the q and k of a packed qkv tensor, as a Triton kernel.

For ``qkv: [B, T, 3, h, hd]`` (3 = q | k | v) and tables ``cos, sin: [T, hd/2]`` (the
half-width tables: the published ``emb = cat(freqs, freqs)`` repeats them), on q and k::

    y1 = x1 * cos - x2 * sin,   y2 = x2 * cos + x1 * sin      # x = [x1, x2] halves of hd

i.e. ``y = x * cos + rot(x) * sin`` with ``rot([x1, x2]) = [-x2, x1]``; v is untouched.
The backward is the same rotation with ``sin`` negated (the transpose of a rotation).
Math in fp32, stored in qkv's dtype.

Limits: hd even, the head dim contiguous, cos/sin fp32 ``[T, hd/2]`` with a contiguous last
dim; no gradient for cos/sin (they are fixed tables).

Memory traffic: one read and one write of q and k (4 B T h hd elements), plus a copy of v
when out of place (none in place), and the small tables. Eager rotary materialises
``rot(x)``, ``x*cos``, ``rot(x)*sin`` and a ``cat`` of q, k, v: about five passes.
"""
from typing import Optional, Tuple

import torch

from radd_fast.kernels.utils import HAS_TRITON, next_power_of_2, require, require_tensor, triton_runs_on

if HAS_TRITON:
    import triton
    import triton.language as tl


# --------------------------------------------------------------------------- kernel
if HAS_TRITON:

    @triton.jit
    def _rotary_qkv_kernel(
        X,  # [B, T, 3, h, hd] input (any strides, hd contiguous)
        Y,  # [B, T, 3, h, hd] output (may be X: in place)
        COS,  # [T, hd/2] fp32
        SIN,  # [T, hd/2] fp32
        n_tok,
        T,
        h,
        half,
        stride_xb,
        stride_xt,
        stride_xs,
        stride_xh,
        stride_yb,
        stride_yt,
        stride_ys,
        stride_yh,
        stride_ct,
        stride_st,
        CONJ: tl.constexpr,  # rotate by -angle (the backward)
        COPY_V: tl.constexpr,  # out of place: copy v through
        TOK: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        # TOK tokens (b, t) per program, all heads of q and k: [TOK, BLOCK_H, BLOCK_HALF] tiles
        tok = tl.program_id(0).to(tl.int64) * TOK + tl.arange(0, TOK)[:, None, None]
        b = tok // T
        t = tok % T
        heads = tl.arange(0, BLOCK_H)[None, :, None]
        cols = tl.arange(0, BLOCK_HALF)[None, None, :]
        tab_mask = (tok < n_tok) & (cols < half)
        mask = tab_mask & (heads < h)
        cos = tl.load(COS + t * stride_ct + cols, mask=tab_mask, other=0.0).to(tl.float32)
        sin = tl.load(SIN + t * stride_st + cols, mask=tab_mask, other=0.0).to(tl.float32)
        if CONJ:
            sin = -sin
        x_tok = X + b * stride_xb + t * stride_xt + heads * stride_xh + cols
        y_tok = Y + b * stride_yb + t * stride_yt + heads * stride_yh + cols
        for s in tl.static_range(2):  # q, then k
            x1 = tl.load(x_tok + s * stride_xs, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_tok + s * stride_xs + half, mask=mask, other=0.0).to(tl.float32)
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
            tl.store(y_tok + s * stride_ys, y1.to(Y.dtype.element_ty), mask=mask)
            tl.store(y_tok + s * stride_ys + half, y2.to(Y.dtype.element_ty), mask=mask)
        if COPY_V:
            for part in tl.static_range(2):
                v = tl.load(x_tok + 2 * stride_xs + part * half, mask=mask)
                tl.store(y_tok + 2 * stride_ys + part * half, v, mask=mask)


# ------------------------------------------------------------------------- launchers
def _config(tile: int):
    """(tokens per program, num_warps) for a per-token tile of ``tile`` = BLOCK_H * BLOCK_HALF.

    From a sweep on an H200 (bf16, hd 64, h 12 and 16): one token a program with 4 warps
    reads+writes at ~4 TB/s; more tokens a program only helps tiny heads."""
    return max(1, min(8, 512 // tile)), 4


def _check_qkv(name: str, t: torch.Tensor) -> None:
    require(t.dim() == 5 and t.shape[2] == 3, lambda: f"{name}: expected [B, T, 3, h, hd], got shape {tuple(t.shape)}")
    require(t.shape[4] % 2 == 0, lambda: f"{name}: head dim {t.shape[4]} must be even (half-split rotary)")
    require_tensor(name, t, last_dim="head dim")


def _check_tables(cos: torch.Tensor, sin: torch.Tensor, T: int, half: int, device: torch.device) -> None:
    for name, tab in (("cos", cos), ("sin", sin)):
        require_tensor(name, tab, shape=(T, half), meaning=" = [T, hd/2]", dtypes=None, device=device)
        require(tab.dtype == torch.float32, lambda: f"{name}: expected fp32 tables, got {tab.dtype}")


def rotary_qkv_forward(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conj: bool = False,
                       out: Optional[torch.Tensor] = None, inplace: bool = False) -> torch.Tensor:
    """Launch the rotary kernel on ``qkv: [B, T, 3, h, hd]`` with ``cos, sin: [T, hd/2]`` fp32.

    ``conj=True`` rotates by the negative angle (the backward). Writes a new tensor, ``out``,
    or (``inplace=True``) q and k of ``qkv`` itself, leaving v alone; returns the result.
    """
    _check_qkv("qkv", qkv)
    B, T, _, h, hd = qkv.shape
    _check_tables(cos, sin, T, hd // 2, qkv.device)
    require(not (inplace and out is not None), "pass either out= or inplace=True, not both")
    y = qkv if inplace else (torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype) if out is None else out)
    if not inplace:
        _check_qkv("out", y)
        require(y.shape == qkv.shape and y.dtype == qkv.dtype and y.device == qkv.device,
                lambda: f"out: expected {tuple(qkv.shape)} {qkv.dtype} on {qkv.device}, "
                        f"got {tuple(y.shape)} {y.dtype} on {y.device}")
    if y.numel() == 0:
        return y
    half = hd // 2
    block_h, block_half = next_power_of_2(h), next_power_of_2(half)
    tok, warps = _config(block_h * block_half)
    _rotary_qkv_kernel[(triton.cdiv(B * T, tok),)](
        qkv, y, cos, sin, B * T, T, h, half,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3), cos.stride(0), sin.stride(0),
        CONJ=conj, COPY_V=not inplace, TOK=tok, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=warps,
    )
    return y


def rotary_qkv_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dqkv`` from ``dy: [B, T, 3, h, hd]``: the inverse rotation on q, k; dv = dy's v."""
    return rotary_qkv_forward(dy, cos, sin, conj=True, out=out)


# ------------------------------------------------------------------------- autograd
def _head_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()  # e.g. an expanded grad of .sum()


class _RotaryFn(torch.autograd.Function):
    """Eager path: a plain autograd.Function costs a few us a call, a custom op ~10x more."""

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_qkv_forward(qkv, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotary_qkv_backward(_head_dim_contiguous(dy), cos, sin), None, None


# ------------------------------------------------------ custom ops (torch.compile path)
# Opaque to torch.compile (the fake functions give it output metadata); register_autograd
# gives the out-of-place op the backward above. The in-place op (no autograd) is for inference.
@torch.library.custom_op("radd_fast::rotary_qkv", mutates_args=())
def _rotary_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conj: bool) -> torch.Tensor:
    return rotary_qkv_forward(qkv, cos, sin, conj=conj)


@_rotary_op.register_fake
def _(qkv, cos, sin, conj):
    return torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)


def _rotary_setup_context(ctx, inputs, output):
    _, cos, sin, conj = inputs
    ctx.save_for_backward(cos, sin)
    ctx.conj = conj


def _rotary_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rotary_op(_head_dim_contiguous(dy), cos, sin, not ctx.conj), None, None, None


_rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


@torch.library.custom_op("radd_fast::rotary_qkv_", mutates_args=("qkv",))
def _rotary_inplace_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    rotary_qkv_forward(qkv, cos, sin, inplace=True)


@_rotary_inplace_op.register_fake
def _(qkv, cos, sin):
    return None


# --------------------------------------------------------------------- public functions
def apply_rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Half-split rotary on q and k of ``qkv: [B, T, 3, h, hd]``; v passes through.

    ``cos, sin: [T, hd/2]`` fp32 from :func:`rotary_tables` (the caller slices them to T).
    Returns ``[B, T, 3, h, hd]`` in qkv's dtype. Differentiable in qkv (not in cos/sin);
    works inside ``torch.compile``. ``inplace=True`` allows rotating qkv itself (returning it):
    honoured only where autograd does not need qkv (no grad mode, or qkv not requiring grad) and
    the kernel can write qkv's layout (a contiguous head dim); otherwise a new tensor is returned
    and qkv is left as it was, so callers always use the return value. Falls back to
    :func:`apply_rotary_qkv_ref` where Triton cannot run on qkv's device.

    Example::

        >>> cos, sin = rotary_tables(5, rotary_inv_freq(16), "cpu")
        >>> apply_rotary_qkv(torch.randn(2, 5, 3, 4, 16), cos, sin).shape
        torch.Size([2, 5, 3, 4, 16])
    """
    if not triton_runs_on(qkv):
        y = apply_rotary_qkv_ref(qkv, cos, sin)
        return qkv.copy_(y) if inplace and not (torch.is_grad_enabled() and qkv.requires_grad) else y
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    compiling = torch.compiler.is_compiling()
    if inplace and not (torch.is_grad_enabled() and qkv.requires_grad):
        if compiling:
            _rotary_inplace_op(qkv, cos, sin)
        else:
            rotary_qkv_forward(qkv, cos, sin, inplace=True)
        return qkv
    return _rotary_op(qkv, cos, sin, False) if compiling else _RotaryFn.apply(qkv, cos, sin)


def rotary_inv_freq(head_dim: int, base: float = 10_000.0) -> torch.Tensor:
    """``inv_freq: [hd/2]`` fp32, ``1 / base ** (arange(0, hd, 2) / hd)`` (the checkpoint's ``rotary_emb.inv_freq``)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def rotary_tables(T: int, inv_freq: torch.Tensor, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[T, hd/2]`` fp32, for positions ``0..T-1`` and ``inv_freq: [hd/2]``.

    The one table builder: the model's ``Rotary`` module caches what this returns.
    """
    device = inv_freq.device if device is None else torch.device(device)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq.to(device, torch.float32))
    return freqs.cos(), freqs.sin()


# ------------------------------------------------------------------------- reference
def apply_rotary_qkv_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         published_precision: bool = False) -> torch.Tensor:
    """The published rotary in plain PyTorch: ``qkv [B, T, 3, h, hd]`` -> ``[B, T, 3, h, hd]`` in qkv's dtype.

    Full-width tables ``cat(cos, cos)``, ``y = x * cos + rot(x) * sin`` on q and k, v passed through.
    ``published_precision=False`` (the kernel's contract): the rotation in fp32, stored in qkv's
    dtype. ``True`` (the ``reference`` backend): as the published code, the tables cast to qkv's
    dtype and the rotation computed in that dtype (bf16 under autocast rounds each step).
    Autocast is off inside, so the dtype is exactly the one chosen here.
    """
    compute_dtype = qkv.dtype if published_precision else torch.float32
    with torch.autocast(device_type=qkv.device.type, enabled=False):
        x = qkv.to(compute_dtype)
        cos_full = torch.cat([cos, cos], dim=-1).to(compute_dtype)[None, :, None, None, :]  # [1, T, 1, 1, hd]
        sin_full = torch.cat([sin, sin], dim=-1).to(compute_dtype)[None, :, None, None, :]
        qk = x[:, :, :2]
        x1, x2 = qk.chunk(2, dim=-1)
        rotated = qk * cos_full + torch.cat([-x2, x1], dim=-1) * sin_full
        return torch.cat([rotated, x[:, :, 2:]], dim=2).to(qkv.dtype)
