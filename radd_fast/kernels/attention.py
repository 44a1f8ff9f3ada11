"""Non-causal multi-head attention on packed qkv, with optional fused rotary.

    attention(qkv: [B, T, 3, h, hd], cos=None, sin=None) -> out [B, T, h, hd]
    out = softmax(q k^T / sqrt(hd)) v per head; no mask, no dropout.

When cos, sin ([T, hd/2] fp32) are given, q and k are first rotated with the
half-split (NeoX) rotary: y = x*cos + rot(x)*sin, rot([x1, x2]) = [-x2, x1].
Gradients flow to the UN-rotated qkv.

Implementations (``impl``):
  "flash_attn"  flash_attn_qkvpacked_func from the flash-attn package (rotary
                applied first by ``apply_rotary_ref``).
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
                and head dim (see ``_pick_impl``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from radd_fast.kernels import flash_attention as fa
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
def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary on x: [B, T, h, hd] with cos, sin: [T, hd/2]; math in fp32, result in x.dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :].float(), sin[:, None, :].float()  # [T, 1, hd/2], broadcast over heads
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def attention_ref(qkv: torch.Tensor, cos: Optional[torch.Tensor] = None,
                  sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The oracle: qkv [B, T, 3, h, hd] -> fp32 out [B, T, h, hd], explicit softmax in fp32.

    >>> attention_ref(torch.randn(2, 5, 3, 4, 32)).shape
    torch.Size([2, 5, 4, 32])
    """
    q, k, v = qkv.float().unbind(2)  # [B, T, h, hd] each
    if cos is not None:
        q, k = apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)
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
            f"qkv must be [B, T, 3, h, hd]; got shape {tuple(qkv.shape)}")
    require(qkv.is_floating_point(), f"qkv must be floating point; got {qkv.dtype}")
    hd = qkv.shape[-1]
    require(hd % 2 == 0 and hd > 0, f"head dim must be even; got {hd}")
    fa.check_rotary_tables(qkv, cos, sin)


def _flash_attn_ok(qkv: torch.Tensor) -> bool:
    return (_flash_attn_qkvpacked_func is not None and qkv.is_cuda
            and qkv.dtype in (torch.float16, torch.bfloat16) and qkv.shape[-1] <= 256 and qkv.shape[-1] % 8 == 0)


def _pick_impl(qkv: torch.Tensor) -> str:
    """The "auto" choice, from a preference table.

    NOT YET MEASURED (no GPU time was available when this was written): run
    ``python -m benchmarks.bench_attention`` on the target card and reorder.
    Until then: CUDA bf16/fp16: flash_attn > sdpa (PyTorch picks flash / cuDNN /
    efficient); CUDA fp32: sdpa; CPU: sdpa (the Triton interpreter is only for
    tests, so "triton" on CPU must be asked for explicitly).
    """
    if qkv.is_cuda and _flash_attn_ok(qkv):
        return "flash_attn"
    return "sdpa"


def _attention_sdpa(qkv, cos, sin):
    q, k, v = qkv.unbind(2)  # [B, T, h, hd] views
    if cos is not None:
        q, k = apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, T, h, hd]


def _attention_flash_attn(qkv, cos, sin):
    require(_flash_attn_qkvpacked_func is not None, "impl='flash_attn' needs the flash-attn package, not installed")
    require(_flash_attn_ok(qkv), "flash_attn needs CUDA fp16/bf16 qkv with head dim <= 256, a multiple of 8; "
            f"got {qkv.device} {qkv.dtype} hd={qkv.shape[-1]}")
    if cos is not None:
        q, k, v = qkv.unbind(2)
        qkv = torch.stack((apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin), v), dim=2)
    return _flash_attn_qkvpacked_func(qkv, dropout_p=0.0, causal=False)


def _attention_triton(qkv, cos, sin):
    fa.check_inputs(qkv, cos, sin)  # before tracing/launching: clear errors, not deep in the op
    out, _ = _flash_attn_fwd(qkv, cos, sin)
    return out


def attention(qkv: torch.Tensor, impl: Optional[str] = None, cos: Optional[torch.Tensor] = None,
              sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Non-causal attention: qkv [B, T, 3, h, hd] -> out [B, T, h, hd] in qkv.dtype.

    impl: one of ``IMPLS``; None uses ``get_attention_impl()`` ("auto" unless set).
    cos, sin: optional [T, hd/2] fp32 rotary tables (half-split convention), applied to q, k;
        the triton impl treats them as constants (returns no gradient for them).

    >>> qkv = torch.randn(2, 16, 3, 4, 32)
    >>> attention(qkv, impl="sdpa").shape
    torch.Size([2, 16, 4, 32])
    """
    name = _validate_impl(impl if impl is not None else _impl)
    _validate(qkv, cos, sin)
    if name == "auto":
        name = _pick_impl(qkv)
    if name == "sdpa":
        return _attention_sdpa(qkv, cos, sin)
    if name == "triton":
        return _attention_triton(qkv, cos, sin)
    if name == "flash_attn":
        return _attention_flash_attn(qkv, cos, sin)
    if name == "reference":
        return attention_ref(qkv, cos, sin).to(qkv.dtype)
    raise AssertionError(f"unhandled impl {name!r}")  # every name in IMPLS is handled above


__all__ = ["IMPLS", "apply_rotary_ref", "attention", "attention_ref", "get_attention_impl", "set_attention_impl"]
