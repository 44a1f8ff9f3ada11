"""Non-causal multi-head attention on packed qkv, with optional fused rotary.

    attention(qkv: [B, T, 3, h, hd], cos=None, sin=None) -> out [B, T, h, hd]
    out = softmax(q k^T / sqrt(hd)) v per head; no mask, no dropout.

When cos, sin ([T, hd/2] fp32) are given, q and k are first rotated with the
half-split (NeoX) rotary: y = x*cos + rot(x)*sin, rot([x1, x2]) = [-x2, x1].
Gradients flow to the UN-rotated qkv. This module decides, once, how: the
"triton" impl fuses the rotation into its q/k loads; every other impl runs the
rotary kernel first (``rotary.apply_rotary_qkv``: one pass over q and k, its
plain-PyTorch reference where Triton cannot run), then attends.

Implementations (``impl``):
  "flash_attn"  flash_attn_qkvpacked_func from the flash-attn package.
  "sdpa"        torch.nn.functional.scaled_dot_product_attention on [B, h, T, hd]
                views; PyTorch picks flash / cuDNN / efficient on CUDA.
  "triton"      our Triton flash attention (flash_attention.py): reads q, k, v
                straight from the packed tensor, rotary fused into the loads,
                no [B, T, h, hd] copies of q, k or v. Registered as the
                torch.library ops radd_fast::flash_attn_fwd / _bwd, so it
                traces under torch.compile. Runs on CUDA, or on CPU tensors
                under the Triton interpreter.
  "reference"   ``attention_ref``: explicit fp32 softmax, the test oracle.
  "auto"        (default) per call, the fastest available for the device, dtype
                and head dim (see ``resolve_impl``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from radd_fast.kernels import flash_attention as fa
from radd_fast.kernels.rotary import apply_rotary_qkv, apply_rotary_qkv_ref
from radd_fast.kernels.utils import require

IMPLS = ("auto", "flash_attn", "sdpa", "triton", "reference")
_impl = "auto"

try:  # optional dependency; never required
    from flash_attn import flash_attn_qkvpacked_func as _flash_attn_qkvpacked_func
except ImportError:
    _flash_attn_qkvpacked_func = None


def set_attention_impl(name: str) -> None:
    """Choose the implementation used when ``attention`` gets ``impl=None``."""
    global _impl
    _impl = _validate_impl(name)


def get_attention_impl() -> str:
    return _impl


def _validate_impl(name: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"unknown attention impl {name!r}; valid: {', '.join(IMPLS)}")
    return name


# ----------------------------------------------------------------------------- reference
def attention_ref(qkv: torch.Tensor, cos: Optional[torch.Tensor] = None,
                  sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The oracle: qkv [B, T, 3, h, hd] -> fp32 out [B, T, h, hd], explicit softmax in fp32.

    >>> attention_ref(torch.randn(2, 5, 3, 4, 32)).shape
    torch.Size([2, 5, 4, 32])
    """
    x = qkv.float()
    if cos is not None:  # rotated in fp32, never rounded back to qkv's dtype: the oracle
        x = apply_rotary_qkv_ref(x, cos, sin)
    q, k, v = x.unbind(2)  # [B, T, h, hd] each
    scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
    scores = scores - scores.amax(dim=-1, keepdim=True)
    p = scores.exp()
    p = p / p.sum(dim=-1, keepdim=True)
    return torch.einsum("bhts,bshd->bthd", p, v)


# ----------------------------------------------------------------------------- triton op
@torch.library.custom_op("radd_fast::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(qkv: torch.Tensor, cos: Optional[torch.Tensor],
                    sin: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return fa.flash_attention_forward(qkv, cos, sin)


@_flash_attn_fwd.register_fake
def _(qkv, cos, sin):
    B, T, _, h, hd = qkv.shape
    return qkv.new_empty((B, T, h, hd)), qkv.new_empty((B, h, T), dtype=torch.float32)


@torch.library.custom_op("radd_fast::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
    return fa.flash_attention_backward(dout, qkv, out, lse, cos, sin)


@_flash_attn_bwd.register_fake
def _(dout, qkv, out, lse, cos, sin):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, cos, sin = inputs
    out, lse = output
    ctx.save_for_backward(qkv, cos, sin, out, lse)


def _backward(ctx, dout, _dlse):
    qkv, cos, sin, out, lse = ctx.saved_tensors
    if dout.stride(-1) != 1:  # autograd may hand us an expanded or transposed gradient
        dout = dout.contiguous()
    return _flash_attn_bwd(dout, qkv, out, lse, cos, sin), None, None


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- dispatch
def _validate(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> None:
    require(isinstance(qkv, torch.Tensor) and qkv.dim() == 5 and qkv.shape[2] == 3,
            lambda: f"qkv must be [B, T, 3, h, hd]; got shape {tuple(qkv.shape)}")
    require(qkv.is_floating_point(), lambda: f"qkv must be floating point; got {qkv.dtype}")
    hd = qkv.shape[-1]
    require(hd % 2 == 0 and hd > 0, lambda: f"head dim must be even; got {hd}")
    fa.check_rotary_tables(qkv, cos, sin)


def _flash_attn_ok(qkv: torch.Tensor) -> bool:
    return (_flash_attn_qkvpacked_func is not None and qkv.is_cuda
            and qkv.dtype in (torch.float16, torch.bfloat16) and qkv.shape[-1] <= 256 and qkv.shape[-1] % 8 == 0)


def resolve_impl(qkv: torch.Tensor, impl: Optional[str] = None) -> str:
    """The implementation ``attention`` runs for ``qkv``: ``impl`` (None: ``get_attention_impl()``),
    with "auto" resolved from a preference table.

    NOT YET MEASURED (no GPU time was available when this was written): run
    ``python -m benchmarks.bench_attention`` on the target card and reorder.
    Until then: CUDA bf16/fp16: flash_attn > sdpa (PyTorch picks flash / cuDNN /
    efficient); CUDA fp32: sdpa; CPU: sdpa (the Triton interpreter is only for
    tests, so "triton" on CPU must be asked for explicitly).
    """
    name = _validate_impl(impl if impl is not None else _impl)
    if name != "auto":
        return name
    if qkv.is_cuda and _flash_attn_ok(qkv):
        return "flash_attn"
    return "sdpa"


# The impls below take q and k already rotated: qkv [B, T, 3, h, hd] -> out [B, T, h, hd].
def _attention_sdpa(qkv):
    q, k, v = qkv.unbind(2)  # [B, T, h, hd] views
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, T, h, hd]


def _attention_flash_attn(qkv):
    require(_flash_attn_qkvpacked_func is not None, "impl='flash_attn' needs the flash-attn package, not installed")
    require(_flash_attn_ok(qkv), lambda: "flash_attn needs CUDA fp16/bf16 qkv with head dim <= 256, a multiple of 8; "
            f"got {qkv.device} {qkv.dtype} hd={qkv.shape[-1]}")
    return _flash_attn_qkvpacked_func(qkv, dropout_p=0.0, causal=False)


def _attention_reference(qkv):
    return attention_ref(qkv).to(qkv.dtype)


_PRE_ROTATED_IMPLS = {"sdpa": _attention_sdpa, "flash_attn": _attention_flash_attn, "reference": _attention_reference}


def _attention_triton(qkv, cos, sin):
    fa.check_inputs(qkv, cos, sin)  # before tracing/launching: clear errors, not deep in the op
    out, _ = _flash_attn_fwd(qkv, cos, sin)
    return out


def attention(qkv: torch.Tensor, impl: Optional[str] = None, cos: Optional[torch.Tensor] = None,
              sin: Optional[torch.Tensor] = None, overwrite_qkv: bool = False) -> torch.Tensor:
    """Non-causal attention: qkv [B, T, 3, h, hd] -> out [B, T, h, hd] in qkv.dtype.

    impl: one of ``IMPLS``; None uses ``get_attention_impl()`` ("auto" unless set).
    cos, sin: optional [T, hd/2] fp32 rotary tables (half-split convention), applied to q, k:
        fused into the loads by the triton impl (which returns no gradient for them), else
        applied first by the rotary kernel (its fp32 math, stored in qkv's dtype).
    overwrite_qkv: the caller has no further use for qkv, so that rotary kernel may rotate q and
        k in place (no copy of v, no new tensor: inference). Where autograd records qkv it stays
        out of place, so training is unaffected.

    >>> qkv = torch.randn(2, 16, 3, 4, 32)
    >>> attention(qkv, impl="sdpa").shape
    torch.Size([2, 16, 4, 32])
    """
    _validate(qkv, cos, sin)
    name = resolve_impl(qkv, impl)
    if name == "triton":  # rotary fused into the kernel's q/k loads
        return _attention_triton(qkv, cos, sin)
    if cos is not None:
        qkv = apply_rotary_qkv(qkv, cos, sin, inplace=overwrite_qkv)
    return _PRE_ROTATED_IMPLS[name](qkv)


__all__ = ["IMPLS", "attention", "attention_ref", "get_attention_impl", "resolve_impl", "set_attention_impl"]
