"""Rotary kernel vs the fp32 reference: forward, dqkv, in place, strides, tables,
launcher errors, torch.compile.

On CPU the kernel runs through the Triton interpreter (tests/conftest.py), so shapes stay small.
"""
import pytest
import torch

from radd_fast.kernels import rotary as rot_mod
from radd_fast.kernels.rotary import (
    apply_rotary_qkv,
    apply_rotary_qkv_ref,
    rotary_inv_freq,
    rotary_qkv_backward,
    rotary_qkv_forward,
    rotary_tables,
)
from tests.helpers import DEVICE, HAS_CUDA, assert_close, assert_within_torch_error, needs_cuda, poison_like

# (B, T, h, hd): T = 1 and primes, odd head counts, head dims whose half is not a power of two
SHAPES = [(1, 1, 1, 32), (2, 7, 3, 64), (1, 13, 12, 64), (2, 5, 2, 96), (1, 3, 5, 16)]


def _tables(T, hd, device=DEVICE):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    return rotary_tables(T, inv_freq, device)


def _ref_grad(qkv, cos, sin, dy):
    leaf = qkv.detach().clone().requires_grad_(True)
    apply_rotary_qkv_ref(leaf, cos, sin).backward(dy)
    return leaf.grad


def test_tables_match_published_formula():
    T, hd = 11, 64
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = rotary_tables(T, inv_freq, "cpu")
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (T, hd // 2)
    assert_close(torch.cat([cos, cos], -1), emb.cos(), atol=0, rtol=0, name="cos")
    assert_close(torch.cat([sin, sin], -1), emb.sin(), atol=0, rtol=0, name="sin")


def test_reference_is_the_spec_formula():
    # y = x*cos + rot(x)*sin, rot([x1, x2]) = [-x2, x1], v untouched; written out per element
    B, T, h, hd = 1, 3, 2, 8
    qkv = torch.randn(B, T, 3, h, hd)
    cos, sin = _tables(T, hd, "cpu")
    y = apply_rotary_qkv_ref(qkv, cos, sin)
    half = hd // 2
    for t in range(T):
        for i in range(half):
            c, s = cos[t, i], sin[t, i]
            x1, x2 = qkv[0, t, :2, :, i], qkv[0, t, :2, :, i + half]
            assert_close(y[0, t, :2, :, i], x1 * c - x2 * s, name="y1")
            assert_close(y[0, t, :2, :, i + half], x2 * c + x1 * s, name="y2")
    assert torch.equal(y[:, :, 2], qkv[:, :, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_published_precision_is_the_old_reference_ops_formula(dtype):
    # The reference backend's rotary: tables cast to qkv's dtype, every step computed in that
    # dtype (bf16 rounds after each op), v passed through; written out independently here.
    B, T, h, hd = 2, 5, 3, 16
    qkv = torch.randn(B, T, 3, h, hd).to(dtype)
    cos, sin = _tables(T, hd, "cpu")
    c = torch.cat([cos, cos], -1).to(dtype).view(1, T, 1, 1, hd)
    s = torch.cat([sin, sin], -1).to(dtype).view(1, T, 1, 1, hd)
    qk = qkv[:, :, :2]
    rot = torch.cat([-qk[..., hd // 2:], qk[..., : hd // 2]], dim=-1)
    expected = torch.cat([qk * c + rot * s, qkv[:, :, 2:]], dim=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not change the chosen precision
        y = apply_rotary_qkv_ref(qkv, cos, sin, published_precision=True)
    assert y.dtype == dtype
    assert torch.equal(y, expected)
    if dtype == torch.float32:  # in fp32 both precisions are the same computation
        assert torch.equal(y, apply_rotary_qkv_ref(qkv, cos, sin))


def test_inv_freq_is_the_published_buffer():
    hd = 64
    expected = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    assert torch.equal(rotary_inv_freq(hd), expected)


@pytest.mark.parametrize("B,T,h,hd", SHAPES)
def test_forward_launcher_matches_reference(B, T, h, hd):
    qkv = torch.randn(B, T, 3, h, hd, device=DEVICE)
    cos, sin = _tables(T, hd)
    out = poison_like(qkv)
    y = rotary_qkv_forward(qkv, cos, sin, out=out)
    assert y is out
    assert_close(y, apply_rotary_qkv_ref(qkv, cos, sin), atol=1e-6, rtol=1e-5, name="y")


@pytest.mark.parametrize("B,T,h,hd", SHAPES)
def test_backward_launcher_matches_reference(B, T, h, hd):
    qkv = torch.randn(B, T, 3, h, hd, device=DEVICE)
    dy = torch.randn_like(qkv)
    cos, sin = _tables(T, hd)
    out = poison_like(qkv)
    dx = rotary_qkv_backward(dy, cos, sin, out=out)
    assert dx is out
    assert_close(dx, _ref_grad(qkv, cos, sin, dy), atol=1e-6, rtol=1e-5, name="dqkv")
    # a rotation: backward undoes forward
    assert_close(rotary_qkv_backward(rotary_qkv_forward(qkv, cos, sin), cos, sin), qkv, atol=1e-5, rtol=1e-5, name="roundtrip")


def test_autograd_on_strided_qkv():
    # qkv as a permuted view ([B, 3, T, h, hd] storage): the kernel reads any strides but hd's
    B, T, h, hd = 2, 7, 3, 32
    base = torch.randn(B, 3, T, h, hd, device=DEVICE, requires_grad=True)
    qkv = base.permute(0, 2, 1, 3, 4)
    cos, sin = _tables(T, hd)
    y = apply_rotary_qkv(qkv, cos, sin)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close(y, apply_rotary_qkv_ref(qkv, cos, sin), atol=1e-6, rtol=1e-5, name="y")
    assert_close(base.grad.permute(0, 2, 1, 3, 4), _ref_grad(qkv, cos, sin, dy), atol=1e-6, rtol=1e-5, name="dqkv")


def test_inplace():
    B, T, h, hd = 2, 5, 3, 32
    cos, sin = _tables(T, hd)
    qkv = torch.randn(B, T, 3, h, hd, device=DEVICE)
    ref = apply_rotary_qkv_ref(qkv, cos, sin)
    work = qkv.clone()
    with torch.no_grad():
        y = apply_rotary_qkv(work, cos, sin, inplace=True)
    assert y.data_ptr() == work.data_ptr()
    assert_close(y, ref, atol=1e-6, rtol=1e-5, name="y")
    # needs grad: in place is declined, the input is left alone
    leaf = qkv.clone().requires_grad_(True)
    y2 = apply_rotary_qkv(leaf, cos, sin, inplace=True)
    assert y2.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), qkv)
    assert_close(y2, ref, atol=1e-6, rtol=1e-5, name="y2")


def test_fallback_uses_reference(monkeypatch):
    monkeypatch.setattr(rot_mod, "triton_runs_on", lambda t: False)
    qkv = torch.randn(1, 3, 3, 2, 16)
    cos, sin = _tables(3, 16, "cpu")
    assert torch.equal(apply_rotary_qkv(qkv, cos, sin), apply_rotary_qkv_ref(qkv, cos, sin))


@pytest.mark.parametrize(
    "shape, tables, match",
    [
        ((2, 5, 3, 4), (5, 8), "expected \\[B, T, 3, h, hd\\]"),
        ((2, 5, 2, 4, 16), (5, 8), "expected \\[B, T, 3, h, hd\\]"),
        ((2, 5, 3, 4, 15), (5, 7), "must be even"),
        ((2, 5, 3, 4, 16), (6, 8), "cos: expected shape"),
        ((2, 5, 3, 4, 16), (5, 16), "cos: expected shape"),
    ],
)
def test_launcher_shape_errors(shape, tables, match):
    qkv = torch.randn(shape, device=DEVICE)
    cos = sin = torch.zeros(tables, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        rotary_qkv_forward(qkv, cos, sin)


def test_launcher_dtype_errors():
    qkv = torch.randn(1, 3, 3, 2, 16, device=DEVICE)
    cos, sin = _tables(3, 16)
    with pytest.raises(ValueError, match="qkv: dtype torch.float64"):
        rotary_qkv_forward(qkv.double(), cos, sin)
    with pytest.raises(ValueError, match="cos: expected fp32"):
        rotary_qkv_forward(qkv, cos.half(), sin)
    with pytest.raises(ValueError, match="head dim must be contiguous"):
        rotary_qkv_forward(qkv.transpose(3, 4), *_tables(3, 2))
    with pytest.raises(ValueError, match="out: expected"):
        rotary_qkv_forward(qkv, cos, sin, out=torch.empty_like(qkv, dtype=torch.float16))


def test_torch_compile_fullgraph():
    # CPU: aot_eager (dynamo + AOTAutograd through the custom op); CUDA: inductor
    backend = "inductor" if HAS_CUDA else "aot_eager"
    B, T, h, hd = 1, 5, 2, 16
    cos, sin = _tables(T, hd)

    def step(qkv):
        return (apply_rotary_qkv(qkv * 2, cos, sin) ** 2).sum()

    qkv = torch.randn(B, T, 3, h, hd, device=DEVICE, requires_grad=True)
    out = torch.compile(step, fullgraph=True, backend=backend)(qkv)
    (g,) = torch.autograd.grad(out, qkv)
    out_ref = step(qkv)
    (g_ref,) = torch.autograd.grad(out_ref, qkv)
    assert_close(out, out_ref, atol=1e-4, rtol=1e-5, name="out")
    assert_close(g, g_ref, atol=1e-5, rtol=1e-5, name="dqkv")


def test_opcheck():
    qkv = torch.randn(1, 3, 3, 2, 16, device=DEVICE, requires_grad=True)
    cos, sin = _tables(3, 16)
    torch.library.opcheck(torch.ops.radd_fast.rotary_qkv.default, (qkv, cos, sin, False))
    torch.library.opcheck(torch.ops.radd_fast.rotary_qkv_.default, (qkv.detach().clone(), cos, sin))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,h,hd", [(2, 7, 3, 64), (4, 1024, 12, 64), (2, 257, 16, 64)])
def test_half_precision_within_torch_error(dtype, B, T, h, hd):
    cos, sin = _tables(T, hd)
    x32 = torch.randn(B, T, 3, h, hd, device="cuda")
    qkv = x32.to(dtype).requires_grad_(True)
    y = apply_rotary_qkv(qkv, cos, sin)
    dy = torch.randn_like(y)
    y.backward(dy)
    y32 = apply_rotary_qkv_ref(qkv.float(), cos, sin)
    dx32 = _ref_grad(qkv.float(), cos, sin, dy.float())
    # torch's own same-dtype rotary: the published formula evaluated in the half type
    c, s = (torch.cat([t, t], -1).to(dtype)[None, :, None, None, :] for t in (cos, sin))
    xt = qkv.detach().clone().requires_grad_(True)
    qk = xt[:, :, :2]
    x1, x2 = qk.chunk(2, -1)
    yt = torch.cat([qk * c + torch.cat([-x2, x1], -1) * s, xt[:, :, 2:]], dim=2)
    yt.backward(dy)
    assert_within_torch_error(y, y32, yt, name="y")
    assert_within_torch_error(qkv.grad, dx32, xt.grad, name="dqkv")
