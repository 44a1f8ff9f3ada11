"""The attention dispatcher (radd_fast/kernels/attention.py): the Triton op (forward + dqkv, fused
rotary, its torch.library registration) and SDPA against attention_ref, the impl setting and its
resolution, the flash-attn path's conditions and call (with a stand-in for the package, which CI
does not install), every dispatcher message word for word, and the reference's stable softmax.

On CPU the Triton kernels run through the interpreter (tests/conftest.py), so
shapes are small; bf16/fp16 run only on CUDA.
"""
from types import SimpleNamespace

import pytest
import torch

from radd_fast.kernels import attention as att
from radd_fast.kernels.attention import (
    IMPLS,
    attention,
    attention_ref,
    get_attention_impl,
    resolve_impl,
    set_attention_impl,
)
from radd_fast.kernels.rotary import apply_rotary_qkv, apply_rotary_qkv_ref
from tests.support.attention import grads, qkv_of, rotary_tables
from tests.support.compare import DEVICE, assert_close, assert_within_torch_error
from tests.support.kernel_inputs import make_qkv
from tests.support.kernel_paths import needs_triton_on_cpu
from tests.support.messages import error_of

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="bf16/fp16 need CUDA: the interpreter's low-precision tl.dot is wrong")


# ----------------------------------------------------------------------------- triton, fp32
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("hd", [32, 64])
@pytest.mark.parametrize("T", [1, 7, 13, 64, 67])
def test_triton_matches_reference_fp32(T, hd, rotary):
    B, h = (2, 2) if T < 64 else (1, 2)  # the interpreter's cost grows with B*h*T^2
    qkv = make_qkv(B, T, h, hd)
    cos, sin = rotary_tables(T, hd) if rotary else (None, None)
    dout = torch.randn(B, T, h, hd, device=DEVICE)
    out, dqkv = grads(lambda x: attention(x, impl="triton", cos=cos, sin=sin), qkv, dout)
    ref, dref = grads(lambda x: attention_ref(x, cos, sin), qkv, dout)
    assert_close(out, ref, atol=1e-4, rtol=1e-4, name="out")
    assert_close(dqkv, dref, atol=1e-4, rtol=1e-4, name="dqkv")


@pytest.mark.parametrize("hd", [48, 96])
def test_triton_padded_head_dims(hd):
    # hd/2 = 24, 48 are not powers of two: padded, masked tiles.
    B, T, h = 1, 19, 1
    qkv = make_qkv(B, T, h, hd)
    cos, sin = rotary_tables(T, hd)
    dout = torch.randn(B, T, h, hd, device=DEVICE)
    out, dqkv = grads(lambda x: attention(x, impl="triton", cos=cos, sin=sin), qkv, dout)
    ref, dref = grads(lambda x: attention_ref(x, cos, sin), qkv, dout)
    assert_close(out, ref, atol=1e-4, rtol=1e-4, name="out")
    assert_close(dqkv, dref, atol=1e-4, rtol=1e-4, name="dqkv")


def test_triton_strided_qkv_and_gradient():
    # qkv a view with padded heads (stride_h != hd) and a transposed dout: no copies needed.
    B, T, h, hd = 2, 9, 2, 32
    big = make_qkv(B, T, h, hd + 16)
    qkv = big[..., :hd]
    assert not qkv.is_contiguous()
    dout = torch.randn(B, h, T, hd, device=DEVICE).transpose(1, 2)
    out, dqkv = grads(lambda x: attention(x, impl="triton"), qkv, dout)
    ref, dref = grads(attention_ref, qkv, dout)
    assert_close(out, ref, atol=1e-4, rtol=1e-4, name="out")
    assert_close(dqkv, dref, atol=1e-4, rtol=1e-4, name="dqkv")


def test_triton_op_under_torch_compile():
    # Fake + autograd registrations let the op sit in a compiled graph, backward included.
    B, T, h, hd = 1, 8, 2, 32
    qkv = make_qkv(B, T, h, hd)
    cos, sin = rotary_tables(T, hd)
    dout = torch.randn(B, T, h, hd, device=DEVICE)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    fn = torch.compile(lambda x: attention(x, impl="triton", cos=cos, sin=sin) * 2.0, backend=backend, fullgraph=True)
    out, dqkv = grads(fn, qkv, dout)
    ref, dref = grads(lambda x: attention_ref(x, cos, sin) * 2.0, qkv, dout)
    assert_close(out, ref, atol=1e-4, rtol=1e-4, name="out")
    assert_close(dqkv, dref, atol=1e-4, rtol=1e-4, name="dqkv")


def test_triton_op_registration_opcheck():
    qkv = make_qkv(1, 5, 1, 32)
    cos, sin = rotary_tables(5, 32)
    torch.library.opcheck(torch.ops.radd_fast.flash_attn_fwd.default, (qkv, cos, sin),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- other impls
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("impl", ["sdpa", "reference", "auto"])
def test_impls_match_reference_fp32(impl, rotary):
    B, T, h, hd = 2, 33, 3, 32
    qkv = make_qkv(B, T, h, hd)
    cos, sin = rotary_tables(T, hd) if rotary else (None, None)
    dout = torch.randn(B, T, h, hd, device=DEVICE)
    out, dqkv = grads(lambda x: attention(x, impl=impl, cos=cos, sin=sin), qkv, dout)
    ref, dref = grads(lambda x: attention_ref(x, cos, sin), qkv, dout)
    assert out.dtype == qkv.dtype
    assert_close(out, ref, atol=1e-4, rtol=1e-4, name="out")
    assert_close(dqkv, dref, atol=1e-4, rtol=1e-4, name="dqkv")


def test_rotary_ref_matches_spec_full_width_form():
    # Spec form: emb = cat(freqs, freqs); y = x * cos(emb) + rot(x) * sin(emb) on q and k; v unchanged.
    T, hd = 11, 32
    qkv = make_qkv(2, T, 3, hd)
    cos, sin = rotary_tables(T, hd)
    cos_full, sin_full = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    q, k, v = qkv.unbind(2)
    expected = [x * cos_full + torch.cat((-x.chunk(2, -1)[1], x.chunk(2, -1)[0]), -1) * sin_full for x in (q, k)]
    assert_close(apply_rotary_qkv_ref(qkv, cos, sin), torch.stack((*expected, v), 2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_unfused_impls_run_the_rotary_kernel_first(impl):
    # The dispatcher's one rotary decision: outside triton, rotate with the rotary kernel, then attend.
    qkv = make_qkv(2, 9, 2, 32)
    cos, sin = rotary_tables(9, 32)
    assert torch.equal(attention(qkv, impl=impl, cos=cos, sin=sin), attention(apply_rotary_qkv(qkv, cos, sin), impl=impl))


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_overwrite_qkv_rotates_in_place_only_where_nothing_records_it(impl):
    """Inference may let rotary overwrite qkv (no v copy): the same output, qkv now rotated; with
    autograd recording qkv the call stays out of place and qkv is untouched."""
    qkv = make_qkv(2, 11, 2, 32)
    cos, sin = rotary_tables(11, 32)
    expected = attention(qkv, impl=impl, cos=cos, sin=sin)
    rotated = apply_rotary_qkv(qkv, cos, sin)
    work = qkv.clone()
    with torch.no_grad():
        out = attention(work, impl=impl, cos=cos, sin=sin, overwrite_qkv=True)
    assert torch.equal(out, expected) and torch.equal(work, rotated)
    leaf = qkv.clone().requires_grad_(True)
    out = attention(leaf, impl=impl, cos=cos, sin=sin, overwrite_qkv=True)
    assert torch.equal(leaf.detach(), qkv) and torch.equal(out.detach(), expected)


def test_resolve_impl():
    qkv = make_qkv(1, 4, 1, 32)
    assert resolve_impl(qkv, "triton") == "triton"
    assert resolve_impl(qkv.cpu()) == "sdpa"  # auto: the interpreter is never picked on CPU
    with pytest.raises(ValueError, match="unknown attention impl 'nope'"):
        resolve_impl(qkv, "nope")


def test_impl_setting():
    assert get_attention_impl() == "auto"
    try:
        set_attention_impl("sdpa")
        assert get_attention_impl() == "sdpa"
        with pytest.raises(ValueError, match="valid: " + ", ".join(IMPLS)):
            set_attention_impl("xformers")
    finally:
        set_attention_impl("auto")


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "shape, kwargs, match",
    [
        ((1, 4, 3, 2, 24), {"impl": "triton"}, "head dims that are multiples of 16 in \\[32, 128\\]"),
        ((1, 4, 3, 2, 256), {"impl": "triton"}, "head_dim=256"),
        ((4, 3, 2, 32), {}, "qkv must be \\[B, T, 3, h, hd\\]"),
        ((1, 4, 2, 2, 32), {}, "qkv must be \\[B, T, 3, h, hd\\]"),
        ((1, 4, 3, 2, 32), {"impl": "nope"}, "unknown attention impl 'nope'; valid: auto, flash_attn"),
        ((1, 4, 3, 2, 32), {"cos": "bad"}, "cos must be \\[T, hd/2\\]"),
        ((1, 4, 3, 2, 32), {"cos": "only"}, "both cos and sin"),
    ],
)
def test_errors(shape, kwargs, match):
    qkv = torch.randn(*shape, device=DEVICE)
    if kwargs.get("cos") == "bad":
        kwargs = {"cos": torch.ones(4, 32, device=DEVICE), "sin": torch.ones(4, 32, device=DEVICE)}
    elif kwargs.get("cos") == "only":
        kwargs = {"cos": torch.ones(4, 16, device=DEVICE)}
    with pytest.raises(ValueError, match=match):
        attention(qkv, **kwargs)


def test_error_dtype():
    with pytest.raises(ValueError, match="floating point"):
        attention(torch.ones(1, 4, 3, 2, 32, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="float64"):
        attention(torch.ones(1, 4, 3, 2, 32, dtype=torch.float64, device=DEVICE), impl="triton")


# ----------------------------------------------------------------------------- CUDA, low precision
@cuda_only
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, T, h, hd", [(2, 1, 2, 64), (2, 67, 3, 64), (2, 257, 2, 128), (4, 1024, 12, 64), (1, 200, 2, 96)])
def test_triton_low_precision_cuda(B, T, h, hd, dtype, rotary):
    qkv32 = make_qkv(B, T, h, hd)
    qkv = qkv32.to(dtype)
    cos, sin = rotary_tables(T, hd) if rotary else (None, None)
    dout = torch.randn(B, T, h, hd, device=DEVICE, dtype=dtype)
    out, dqkv = grads(lambda x: attention(x, impl="triton", cos=cos, sin=sin), qkv, dout)
    ref, dref = grads(lambda x: attention_ref(x, cos, sin), qkv.float(), dout.float())
    tout, tdqkv = grads(lambda x: attention(x, impl="sdpa", cos=cos, sin=sin), qkv, dout)
    assert_within_torch_error(out, ref, tout, name="out")
    assert_within_torch_error(dqkv, dref, tdqkv, name="dqkv")


@cuda_only
def test_auto_picks_a_fast_impl_on_cuda():
    qkv = make_qkv(1, 64, 2, 64, dtype=torch.bfloat16)
    out = attention(qkv)
    assert_within_torch_error(out, attention_ref(qkv.float()), attention(qkv, impl="sdpa"), name="auto")


# ------------- the dispatcher's messages, the flash-attn path and the reference, exactly
def test_dispatcher_messages():
    assert error_of(att.attention, torch.zeros(4, 3, 2, 32)) == "qkv must be [B, T, 3, h, hd]; got shape (4, 3, 2, 32)"
    assert error_of(att.attention, torch.zeros(1, 4, 2, 2, 32)) == (
        "qkv must be [B, T, 3, h, hd]; got shape (1, 4, 2, 2, 32)")
    assert error_of(att.attention, torch.zeros(1, 4, 3, 2, 32, dtype=torch.int64)) == (
        "qkv must be floating point; got torch.int64")
    assert error_of(att.attention, torch.zeros(1, 4, 3, 2, 5)) == "head dim must be even; got 5"
    assert error_of(att.attention, torch.zeros(1, 4, 3, 2, 0)) == "head dim must be even; got 0"
    assert error_of(att.set_attention_impl, "xformers") == (
        "unknown attention impl 'xformers'; valid: auto, flash_attn, sdpa, triton, reference")


def fake_qkv(hd=64, dtype=torch.bfloat16, cuda=True):
    """What _flash_attn_ok reads of a tensor: a CUDA bf16 qkv without a GPU."""
    return SimpleNamespace(is_cuda=cuda, dtype=dtype, shape=(1, 4, 3, 2, hd))


def test_flash_attn_conditions(monkeypatch):
    monkeypatch.setattr(att, "_flash_attn_qkvpacked_func", None)
    assert not att._flash_attn_ok(fake_qkv())  # the package is not installed
    monkeypatch.setattr(att, "_flash_attn_qkvpacked_func", lambda *a, **k: None)
    assert att._flash_attn_ok(fake_qkv()) and att._flash_attn_ok(fake_qkv(dtype=torch.float16))
    assert att._flash_attn_ok(fake_qkv(hd=256)) and att._flash_attn_ok(fake_qkv(hd=8))
    assert not att._flash_attn_ok(fake_qkv(hd=264))  # > 256
    assert not att._flash_attn_ok(fake_qkv(hd=60))  # not a multiple of 8
    assert not att._flash_attn_ok(fake_qkv(dtype=torch.float32))
    assert not att._flash_attn_ok(fake_qkv(cuda=False))
    assert att.resolve_impl(fake_qkv(), "auto") == "flash_attn"
    assert att.resolve_impl(fake_qkv(dtype=torch.float32), "auto") == "sdpa"


def test_resolve_impl_follows_the_setting():
    qkv = qkv_of()
    try:
        att.set_attention_impl("reference")
        assert att.resolve_impl(qkv) == "reference" and att.resolve_impl(qkv, "sdpa") == "sdpa"
    finally:
        att.set_attention_impl("auto")


def test_the_flash_attn_path_calls_the_package_without_dropout_or_mask(monkeypatch):
    calls = []
    monkeypatch.setattr(att, "_flash_attn_qkvpacked_func", lambda qkv, **kw: calls.append(kw) or qkv[:, :, 0])
    monkeypatch.setattr(att, "_flash_attn_ok", lambda qkv: True)
    qkv = qkv_of()
    assert torch.equal(att.attention(qkv, impl="flash_attn"), qkv[:, :, 0])
    assert calls == [{"dropout_p": 0.0, "causal": False}]


def test_the_flash_attn_path_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(att, "_flash_attn_qkvpacked_func", None)
    assert error_of(att.attention, qkv_of(), impl="flash_attn") == (
        "impl='flash_attn' needs the flash-attn package, not installed")
    monkeypatch.setattr(att, "_flash_attn_qkvpacked_func", lambda *a, **k: None)
    assert error_of(att.attention, qkv_of(hd=32), impl="flash_attn") == (
        "flash_attn needs CUDA fp16/bf16 qkv with head dim <= 256, a multiple of 8; got cpu torch.float32 hd=32")


def test_the_reference_impl_returns_the_inputs_dtype():
    qkv = qkv_of(dtype=torch.float64)
    out = att.attention(qkv, impl="reference")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, att.attention_ref(qkv).double())


@needs_triton_on_cpu
@pytest.mark.parametrize("how", ["expanded", "transposed", "time_innermost"])
def test_the_triton_backward_takes_gradients_of_any_layout(how):
    """out.sum() hands back an expanded gradient (stride 0); a transposed one has stride h on the head dim;
    a permuted one can have unit stride on T or on h and still not on the head dim."""
    B, T, h, hd = 1, 5, 2, 32
    qkv = qkv_of(B, T, h, hd)
    leaf, ref_leaf = qkv.clone().requires_grad_(True), qkv.clone().requires_grad_(True)
    out, ref = att.attention(leaf, impl="triton"), att.attention_ref(ref_leaf)
    if how == "expanded":
        out.sum().backward()
        ref.sum().backward()
    else:
        if how == "transposed":
            g = torch.randn(B, T, hd, h).transpose(-1, -2)  # [B, T, h, hd], unit stride on h, last stride h = 2
            assert g.stride(-2) == 1 and g.stride(-1) == h
        else:
            g = torch.randn(B, h, hd, T).permute(0, 3, 1, 2)  # unit stride on T, last stride T
            assert g.stride(1) == 1 and g.stride(-1) == T
        out.backward(g)
        ref.backward(g)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=1e-5, rtol=1e-5)


def test_the_reference_softmax_is_stable_per_row():
    """Scores far apart between rows (one query 300x larger): subtracting each row's own max keeps every
    row finite and equal to a float64 softmax; any other shift overflows or underflows a row to 0 / 0."""
    torch.manual_seed(0)
    qkv = qkv_of(B=1, T=6, h=2, hd=32)
    qkv[:, 0, 0] *= 300.0  # query 0: scores in the thousands
    out = att.attention_ref(qkv)
    x = qkv.double()
    q, k, v = x.unbind(2)
    p = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k) / 32**0.5, dim=-1)
    expected = torch.einsum("bhts,bshd->bthd", p, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
