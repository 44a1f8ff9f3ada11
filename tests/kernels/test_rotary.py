"""Rotary kernel (radd_fast/kernels/rotary.py) against the fp32 reference and a float64 closed form:
forward, dqkv, in place (exactly where autograd allows), strides and layouts, a non-default base on
every path (the kernel, the no-Triton fallback, the custom ops), eager vs compiling dispatch, tables,
the launchers' messages word for word and tuned configuration, the fallback with the interpreter
off, torch.compile.

On CPU the kernel runs through the Triton interpreter (tests/conftest.py), so shapes stay small.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from radd_fast.kernels import rotary as rot_mod
from radd_fast.kernels.rotary import (
    apply_rotary_qkv,
    apply_rotary_qkv_ref,
    rotary_inv_freq,
    rotary_qkv_backward,
    rotary_qkv_forward,
    rotary_tables,
)
from tests.support.compare import DEVICE, HAS_CUDA, assert_close, assert_within_torch_error, needs_cuda, poison_like
from tests.support.kernel_paths import PATHS, take_path, with_interpreter

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


# --- a non-default base, layouts and dispatch on every path, against a float64 closed form
def rotary_closed_form(qkv: torch.Tensor, base: float = 10_000.0, conj: bool = False) -> torch.Tensor:
    """Half-split rotary in float64 from the angles t * base^(-2i/hd): on q and k,
    y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin (the angle negated when ``conj``); v unchanged."""
    B, T, _, h, hd = qkv.shape
    half = hd // 2
    i = torch.arange(half, dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-2 * i / hd)  # [T, half]
    cos, sin = angle.cos()[None, :, None, None, :], angle.sin()[None, :, None, None, :]
    sin = -sin if conj else sin
    x = qkv.double()
    x1, x2 = x[:, :, :2, :, :half], x[:, :, :2, :, half:]
    qk = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([qk, x[:, :, 2:]], dim=2)


def _rotary_input(B=2, T=5, h=3, hd=16, seed=0):
    return torch.randn(B, T, 3, h, hd, generator=torch.Generator().manual_seed(seed))


def test_inv_freq_at_another_base():
    hd, base = 16, 500.0
    expected = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    assert_close(rot_mod.rotary_inv_freq(hd, base=base).double(), expected, atol=0, rtol=1e-6, name="inv_freq")
    cos, sin = rot_mod.rotary_tables(3, rot_mod.rotary_inv_freq(hd, base=base))
    assert cos.device == torch.device("cpu") and cos.dtype == sin.dtype == torch.float32


@pytest.mark.parametrize("path", PATHS)
def test_rotary_values_and_grads_on_every_path(monkeypatch, path):
    """A non-default base, q/k/v of a head-dim-strided view, and the expanded grad of ``.sum()``."""
    take_path(monkeypatch, rot_mod, path)
    B, T, h, hd, base = 2, 5, 3, 16, 500.0
    cos, sin = rot_mod.rotary_tables(T, rot_mod.rotary_inv_freq(hd, base=base))
    storage = _rotary_input(B, T, h, hd).transpose(-1, -2).contiguous().requires_grad_(True)
    qkv = storage.transpose(-1, -2)  # the head dim is not contiguous
    y = rot_mod.apply_rotary_qkv(qkv, cos, sin)
    assert y.shape == qkv.shape and y.dtype == torch.float32
    assert_close(y.double(), rotary_closed_form(qkv.detach(), base), atol=1e-5, rtol=1e-5, name="y")
    y.sum().backward()  # dy = ones, expanded (stride 0)
    expected = rotary_closed_form(torch.ones(qkv.shape), base, conj=True)  # the transpose of a rotation
    assert_close(storage.grad.transpose(-1, -2).double(), expected, atol=1e-5, rtol=1e-5, name="dqkv")


@pytest.mark.parametrize("path", PATHS)
def test_rotary_in_place_exactly_where_autograd_allows(monkeypatch, path):
    take_path(monkeypatch, rot_mod, path)
    cos, sin = rot_mod.rotary_tables(5, rot_mod.rotary_inv_freq(16))
    original = _rotary_input()
    expected = rotary_closed_form(original)
    for grad_mode, requires_grad, in_place in ((False, False, True), (True, False, True), (False, True, True),
                                               (True, True, False)):
        qkv = original.clone().requires_grad_(requires_grad)
        with torch.set_grad_enabled(grad_mode):
            y = rot_mod.apply_rotary_qkv(qkv, cos, sin, inplace=True)
        case = f"grad mode {grad_mode}, requires_grad {requires_grad}"
        assert (y.data_ptr() == qkv.data_ptr()) == in_place, case
        assert_close(y.detach().double(), expected, atol=1e-5, rtol=1e-5, name=case)
        if not in_place:
            assert torch.equal(qkv.detach(), original), f"{case}: the input was changed"


def test_rotary_grads_of_any_layout_and_the_second_derivative(monkeypatch):
    """Upstream grads whose head dim is not contiguous (stride h, stride 2) are copied before the
    launch; through the custom op the backward's own backward is the forward rotation again."""
    cos, sin = rot_mod.rotary_tables(5, rot_mod.rotary_inv_freq(16))
    qkv = _rotary_input().requires_grad_(True)
    y = rot_mod.apply_rotary_qkv(qkv, cos, sin)
    t_innermost = torch.randn(2, 3, 3, 16, 5).permute(0, 4, 1, 2, 3)  # T has stride 1, the head dim stride 5
    for g in (torch.randn(2, 5, 3, 16, 3).transpose(-1, -2), torch.randn(2, 5, 3, 3, 32)[..., ::2], t_innermost):
        (dq,) = torch.autograd.grad(y, qkv, g, retain_graph=True)
        assert_close(dq.double(), rotary_closed_form(g, conj=True), atol=1e-5, rtol=1e-5, name=f"strides {g.stride()}")
    take_path(monkeypatch, rot_mod, "custom_op")
    y = rot_mod.apply_rotary_qkv(qkv, cos, sin)
    dy = torch.randn(qkv.shape).requires_grad_(True)
    (dq,) = torch.autograd.grad(y, qkv, dy, create_graph=True)
    w = torch.randn(qkv.shape)
    (dq * w).sum().backward()  # d/d(dy) <R^T dy, w> = R w
    assert_close(dy.grad.double(), rotary_closed_form(w), atol=1e-5, rtol=1e-5, name="second derivative")


def test_rotary_inputs_with_a_strided_head_dim_on_the_kernel_path():
    cos, sin = rot_mod.rotary_tables(5, rot_mod.rotary_inv_freq(16))
    for qkv in (torch.randn(2, 5, 3, 3, 32)[..., ::2], torch.randn(2, 3, 3, 16, 5).permute(0, 4, 1, 2, 3)):
        assert_close(rot_mod.apply_rotary_qkv(qkv, cos, sin).double(), rotary_closed_form(qkv), atol=1e-5, rtol=1e-5,
                     name=f"strides {qkv.stride()}")


def test_rotary_dispatch_eager_and_under_compilation(monkeypatch):
    """Eager: the autograd.Function (a few us a call); compiling: the registered custom ops, which
    torch.compile can trace (in place: radd_fast::rotary_qkv_)."""
    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    cos, sin = rot_mod.rotary_tables(5, rot_mod.rotary_inv_freq(16))
    qkv = _rotary_input().requires_grad_(True)
    assert "_RotaryFn" in type(rot_mod.apply_rotary_qkv(qkv, cos, sin).grad_fn).__name__
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "radd_fast_rotary_qkv" in type(rot_mod.apply_rotary_qkv(qkv, cos, sin).grad_fn).__name__
    with torch.no_grad(), Ops() as ops:
        rot_mod.apply_rotary_qkv(qkv.detach().clone(), cos, sin, inplace=True)
    assert "radd_fast.rotary_qkv_.default" in ops.names


def test_rotary_reference_precision_defaults_to_fp32_math():
    """The default is the kernel's contract: the rotation in fp32, rounded once to qkv's dtype."""
    qkv = _rotary_input().half()
    cos, sin = rot_mod.rotary_tables(5, rot_mod.rotary_inv_freq(16))
    y = rot_mod.apply_rotary_qkv_ref(qkv, cos, sin)
    assert y.dtype == torch.float16
    assert torch.equal(y, rot_mod.apply_rotary_qkv_ref(qkv, cos, sin, published_precision=False))
    assert not torch.equal(y, rot_mod.apply_rotary_qkv_ref(qkv, cos, sin, published_precision=True))
    assert_close(y.double(), rotary_closed_form(qkv), atol=2e-3, rtol=1e-3, name="y")


def test_rotary_tables_follow_the_device_asked_for_and_are_fp32():
    inv_freq = rot_mod.rotary_inv_freq(16)
    cos, sin = rot_mod.rotary_tables(4, inv_freq, "meta")
    assert cos.device.type == sin.device.type == "meta" and cos.shape == (4, 8)
    cos, sin = rot_mod.rotary_tables(4, inv_freq.double())
    assert cos.dtype == sin.dtype == torch.float32
    angle = torch.arange(4, dtype=torch.float64)[:, None] * inv_freq.double()
    assert_close(cos.double(), angle.cos(), atol=1e-6, rtol=0, name="cos")
    assert_close(sin.double(), angle.sin(), atol=1e-6, rtol=0, name="sin")


def test_rotary_launcher_keeps_the_dtype_and_sizes_its_tile(monkeypatch):
    """The output is in qkv's dtype; the launch configuration is chosen for the per-token tile of
    next_power_of_2(h) x next_power_of_2(hd / 2) elements."""
    cos, sin = rot_mod.rotary_tables(5, rot_mod.rotary_inv_freq(16))
    qkv = _rotary_input(1, 5, 3, 16).half()
    y = rot_mod.rotary_qkv_forward(qkv, cos, sin)
    assert y.dtype == torch.float16
    assert_close(y.double(), rotary_closed_form(qkv), atol=2e-3, rtol=1e-3, name="y")
    tiles = []
    real = rot_mod._config
    monkeypatch.setattr(rot_mod, "_config", lambda tile: tiles.append(tile) or real(tile))
    rot_mod.rotary_qkv_forward(_rotary_input(1, 5, 3, 16), cos, sin)  # h 3 -> 4, hd / 2 = 8
    rot_mod.rotary_qkv_forward(_rotary_input(1, 5, 12, 64), *rot_mod.rotary_tables(5, rot_mod.rotary_inv_freq(64)))
    assert tiles == [32, 16 * 32]


def test_rotary_launcher_on_empty_batches():
    cos, sin = rot_mod.rotary_tables(5, rot_mod.rotary_inv_freq(16))
    y = rot_mod.rotary_qkv_forward(torch.zeros(0, 5, 3, 2, 16), cos, sin)
    assert y.shape == (0, 5, 3, 2, 16)
    y = rot_mod.rotary_qkv_forward(torch.zeros(1, 5, 3, 0, 16), cos, sin)
    assert y.shape == (1, 5, 3, 0, 16)


def test_rotary_launch_config_is_the_tuned_one():
    """One token a program from 512 elements a token (4 warps), up to 8 tokens for tiny heads."""
    configs = {16: (8, 4), 64: (8, 4), 128: (4, 4), 256: (2, 4), 512: (1, 4), 1024: (1, 4), 4096: (1, 4)}
    assert {tile: rot_mod._config(tile) for tile in configs} == configs


def _rotary_error(qkv, cos, sin, **kwargs) -> str:
    with pytest.raises(ValueError) as e:
        rot_mod.rotary_qkv_forward(qkv, cos, sin, **kwargs)
    return str(e.value)


def test_rotary_launcher_messages():
    qkv = _rotary_input(1, 3, 2, 16)
    cos, sin = rot_mod.rotary_tables(3, rot_mod.rotary_inv_freq(16))
    assert _rotary_error(qkv[:, :, 0], cos, sin) == "qkv: expected [B, T, 3, h, hd], got shape (1, 3, 2, 16)"
    assert _rotary_error(qkv[:, :, :2], cos, sin) == "qkv: expected [B, T, 3, h, hd], got shape (1, 3, 2, 2, 16)"
    assert _rotary_error(qkv[..., :15], cos, sin) == "qkv: head dim 15 must be even (half-split rotary)"
    assert _rotary_error(qkv.transpose(3, 4)[..., :2, :], cos[:, :1], sin[:, :1]) == (
        "qkv: the head dim must be contiguous (stride 16)")
    assert _rotary_error(qkv, cos[:2], sin) == "cos: expected shape (3, 8) = [T, hd/2], got (2, 8)"
    assert _rotary_error(qkv, cos, sin[:, :4]) == "sin: expected shape (3, 8) = [T, hd/2], got (3, 4)"
    assert _rotary_error(qkv, cos, sin.double()) == "sin: expected fp32 tables, got torch.float64"
    assert _rotary_error(qkv, cos, sin.to("meta")) == "sin: on meta, expected cpu"
    assert _rotary_error(qkv, cos, sin, out=qkv.clone(), inplace=True) == "pass either out= or inplace=True, not both"
    assert _rotary_error(qkv, cos, sin, out=torch.empty(1, 3, 3, 2, 8)) == (
        "out: expected (1, 3, 3, 2, 16) torch.float32 on cpu, got (1, 3, 3, 2, 8) torch.float32 on cpu")
    assert _rotary_error(qkv, cos, sin, out=torch.empty(1, 3, 3, 2, 15)) == (
        "out: head dim 15 must be even (half-split rotary)")


# -------- the fallback where Triton cannot run (the interpreter off), against the kernel
def test_rotary_fallback_matches_the_kernel_and_honours_inplace(no_triton):
    cos, sin = rotary_tables(7, rotary_inv_freq(16), "cpu")
    qkv = torch.randn(2, 7, 3, 2, 16)
    fallback = apply_rotary_qkv(qkv, cos, sin)
    assert_close(fallback, apply_rotary_qkv_ref(qkv, cos, sin), atol=0, rtol=0)
    assert_close(fallback, with_interpreter(no_triton, lambda: apply_rotary_qkv(qkv, cos, sin)), atol=1e-5)
    buf = qkv.clone()
    with torch.no_grad():
        out = apply_rotary_qkv(buf, cos, sin, inplace=True)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(buf, fallback)
    grad_in = qkv.clone().requires_grad_()
    out = apply_rotary_qkv(grad_in, cos, sin, inplace=True)  # autograd needs qkv: a new tensor
    assert out.data_ptr() != grad_in.data_ptr() and torch.equal(grad_in.detach(), qkv)
