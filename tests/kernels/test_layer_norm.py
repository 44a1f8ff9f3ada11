"""LayerNormWot kernels vs the fp32 reference: forward, every gradient, the fused
residual form (with and without dropout), launcher errors, torch.compile.

On CPU the kernels run through the Triton interpreter (tests/conftest.py), so shapes stay small.
"""
import pytest
import torch

from radd_fast.kernels import layer_norm as ln_mod
from radd_fast.kernels.layer_norm import (
    add_layer_norm,
    add_layer_norm_ref,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
    layer_norm_ref,
)
from tests.helpers import DEVICE, HAS_CUDA, assert_close, assert_within_torch_error, needs_cuda, poison_like

ROWS = [1, 7, 13]
DIMS = [64, 96, 768]


def _params(d, device=DEVICE, dtype=torch.float32):
    # random affine params (the published init is all ones, which would hide a w/b mix-up)
    w = (1 + 0.5 * torch.randn(d, device=device)).to(dtype)
    b = (0.5 * torch.randn(d, device=device)).to(dtype)
    return w, b


def _ref_grads(fn, inputs, grads_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o.float() for o in outs], [g.float() for g in grads_out])
    return [o.detach() for o in outs], [t.grad for t in leaves]


# ------------------------------------------------------------------ launchers, fp32
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("d", DIMS)
def test_forward_launcher_matches_reference(n, d):
    x = 3 * torch.randn(n, d, device=DEVICE) + 1
    w, b = _params(d)
    out = poison_like(torch.empty(n, d, device=DEVICE))
    y, new_x, mean, rstd = layer_norm_forward(x, w, b, out=out)
    assert y is out and new_x is None
    assert_close(y, layer_norm_ref(x, w, b), atol=1e-5, rtol=1e-5, name="y")
    x64 = x.double()
    assert_close(mean, x64.mean(-1), atol=1e-5, rtol=1e-5, name="mean")
    assert_close(rstd, (x64.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=1e-5, rtol=1e-5, name="rstd")


@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("d", DIMS)
def test_backward_launcher_matches_reference(n, d):
    x = torch.randn(n, d, device=DEVICE)
    w, b = _params(d)
    dy = torch.randn(n, d, device=DEVICE)
    _, _, mean, rstd = layer_norm_forward(x, w, b)
    dx_out = poison_like(x)
    dx, ddelta, dw, db = layer_norm_backward(dy, x, w, mean, rstd, dx_out=dx_out)
    assert dx is dx_out and ddelta is None
    _, (dx_ref, dw_ref, db_ref) = _ref_grads(layer_norm_ref, (x, w, b), (dy,))
    assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5, name="dx")
    assert_close(dw, dw_ref, atol=1e-5, rtol=1e-5, name="dweight")
    assert_close(db, db_ref, atol=1e-5, rtol=1e-5, name="dbias")


# ------------------------------------------------------------- public ops, autograd
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 7, 96), (13, 768)])
def test_layer_norm_autograd(shape):
    d = shape[-1]
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in _params(d))
    y = layer_norm(x, w, b)
    assert y.shape == x.shape and y.dtype == x.dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    (y_ref,), grads_ref = _ref_grads(layer_norm_ref, (x, w, b), (dy,))
    assert_close(y, y_ref, atol=1e-5, rtol=1e-5, name="y")
    for name, got, ref in zip(("dx", "dweight", "dbias"), (x.grad, w.grad, b.grad), grads_ref):
        assert_close(got, ref, atol=1e-5, rtol=1e-5, name=name)


def test_layer_norm_strided_rows():
    # rows with a stride larger than d (a slice of a wider tensor): no copy needed
    base = torch.randn(7, 2 * 96, device=DEVICE)
    x = base[:, :96]
    w, b = _params(96)
    assert_close(layer_norm(x, w, b), layer_norm_ref(x, w, b), atol=1e-5, rtol=1e-5, name="y")


@pytest.mark.parametrize("n,d", [(1, 64), (7, 96), (13, 768)])
def test_add_layer_norm_autograd_no_dropout(n, d):
    x = torch.randn(2, n, d, device=DEVICE, requires_grad=True)
    delta = torch.randn(2, n, d, device=DEVICE, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in _params(d))
    new_x, normed = add_layer_norm(x, delta, w, b, dropout_p=0.1, training=False)
    g_new, g_norm = torch.randn_like(new_x), torch.randn_like(normed)
    torch.autograd.backward([new_x, normed], [g_new, g_norm])
    (new_ref, norm_ref), grads_ref = _ref_grads(add_layer_norm_ref, (x, delta, w, b), (g_new, g_norm))
    assert_close(new_x, new_ref, atol=1e-6, rtol=1e-6, name="new_x")
    assert_close(normed, norm_ref, atol=1e-5, rtol=1e-5, name="normed")
    for name, got, ref in zip(("dx", "ddelta", "dweight", "dbias"), (x.grad, delta.grad, w.grad, b.grad), grads_ref):
        assert_close(got, ref, atol=1e-5, rtol=1e-5, name=name)


def test_add_layer_norm_only_normed_used():
    # new_x unused downstream: its incoming grad is zero (or None), handled in backward
    x = torch.randn(7, 96, device=DEVICE, requires_grad=True)
    delta = torch.randn(7, 96, device=DEVICE, requires_grad=True)
    w, b = _params(96)
    _, normed = add_layer_norm(x, delta, w, b)
    g = torch.randn_like(normed)
    normed.backward(g)
    (_, _), (dx_ref, dd_ref, _, _) = _ref_grads(add_layer_norm_ref, (x, delta, w, b), (torch.zeros_like(g), g))
    assert_close(x.grad, dx_ref, atol=1e-5, rtol=1e-5, name="dx")
    assert_close(delta.grad, dd_ref, atol=1e-5, rtol=1e-5, name="ddelta")


def test_add_layer_norm_dropout_mask_and_grads():
    n, d, p = 13, 768, 0.25
    x = torch.randn(n, d, device=DEVICE, requires_grad=True)
    delta = torch.randn(n, d, device=DEVICE, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in _params(d))
    torch.manual_seed(123)
    new_x, normed = add_layer_norm(x, delta, w, b, dropout_p=p, training=True)
    # the mask the kernel drew, read back from the output (delta is nonzero almost surely)
    keep = (new_x - x).detach().abs() > 1e-6
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03, f"keep rate {keep.float().mean().item():.3f}"
    torch.manual_seed(123)  # same torch RNG state -> same seed -> same mask
    new_x2, _ = add_layer_norm(x, delta, w, b, dropout_p=p, training=True)
    assert torch.equal(new_x2, new_x)

    g_new, g_norm = torch.randn_like(new_x), torch.randn_like(normed)
    torch.autograd.backward([new_x, normed], [g_new, g_norm])

    def masked_ref(x, delta, w, b):
        nx = x + delta * keep / (1 - p)
        return nx, layer_norm_ref(nx, w, b)

    (new_ref, norm_ref), grads_ref = _ref_grads(masked_ref, (x, delta, w, b), (g_new, g_norm))
    assert_close(new_x, new_ref, atol=1e-5, rtol=1e-5, name="new_x")
    assert_close(normed, norm_ref, atol=1e-5, rtol=1e-5, name="normed")
    for name, got, ref in zip(("dx", "ddelta", "dweight", "dbias"), (x.grad, delta.grad, w.grad, b.grad), grads_ref):
        assert_close(got, ref, atol=1e-5, rtol=1e-5, name=name)


def test_fallback_uses_reference(monkeypatch):
    monkeypatch.setattr(ln_mod, "triton_runs_on", lambda t: False)
    x, delta = torch.randn(3, 64), torch.randn(3, 64)
    w, b = _params(64, device="cpu")
    assert_close(layer_norm(x, w, b), layer_norm_ref(x, w, b), atol=0, rtol=0, name="y")
    new_x, normed = add_layer_norm(x, delta, w, b)
    assert_close(normed, layer_norm_ref(x + delta, w, b), atol=0, rtol=0, name="normed")


# ------------------------------------------------------------------ launcher errors
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(4, 8, 64), torch.ones(64), torch.zeros(64)), "expected \\[N, d\\]"),
        (lambda: (torch.randn(4, 64), torch.ones(32), torch.zeros(64)), "weight: expected shape"),
        (lambda: (torch.randn(4, 64).double(), torch.ones(64), torch.zeros(64)), "x: dtype torch.float64"),
        (lambda: (torch.randn(64, 4).t(), torch.ones(64), torch.zeros(64)), "last dim must be contiguous"),
        (lambda: (torch.randn(2, ln_mod.MAX_D + 1), torch.ones(ln_mod.MAX_D + 1), torch.zeros(ln_mod.MAX_D + 1)), "row size"),
    ],
)
def test_forward_launcher_errors(make, match):
    x, w, b = make()
    with pytest.raises(ValueError, match=match):
        layer_norm_forward(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE))


def test_launcher_error_details():
    x, w, b = torch.randn(4, 64, device=DEVICE), *_params(64)
    with pytest.raises(ValueError, match="out: dtype"):
        layer_norm_forward(x, w, b, out=torch.empty(4, 64, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="dropout needs seed"):
        layer_norm_forward(x, w, b, delta=x, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        layer_norm_forward(x, w, b, delta=x, dropout_p=1.0)
    _, _, mean, rstd = layer_norm_forward(x, w, b)
    with pytest.raises(ValueError, match="dy: expected shape"):
        layer_norm_backward(x[:3], x, w, mean, rstd)
    with pytest.raises(ValueError, match="mean: expected a contiguous fp32"):
        layer_norm_backward(x, x, w, mean.double(), rstd)


# ----------------------------------------------------------------------- compile
def test_torch_compile_fullgraph():
    # CPU: aot_eager traces dynamo + AOTAutograd through the custom ops' fake and autograd
    # registrations (inductor's C++ build takes ~30 s here); CUDA: the full inductor stack.
    backend = "inductor" if HAS_CUDA else "aot_eager"

    def step(x, delta, w, b):
        new_x, normed = add_layer_norm(x, delta, w, b, out_dtype=torch.float32)
        return (layer_norm(new_x, w, b) * normed).sum()

    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    delta = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in _params(64))
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    out = compiled(x, delta, w, b)
    grads = torch.autograd.grad(out, (x, delta, w, b))
    out_ref = step(x, delta, w, b)
    grads_ref = torch.autograd.grad(out_ref, (x, delta, w, b))
    assert_close(out, out_ref, atol=1e-4, rtol=1e-5, name="out")
    for g, r in zip(grads, grads_ref):
        assert_close(g, r, atol=1e-5, rtol=1e-5, name="grad")


def test_opcheck():
    # torch's own checks of the schema, fake (meta) functions and autograd registration
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    delta = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in _params(64))
    seed = torch.tensor([7], device=DEVICE)
    torch.library.opcheck(torch.ops.radd_fast.layer_norm_fwd.default, (x, w, b, 1e-5, torch.float32))
    torch.library.opcheck(torch.ops.radd_fast.add_layer_norm_fwd.default, (x, delta, w, b, seed, 0.1, 1e-5, torch.float32))


# ------------------------------------------------------------- half precision, CUDA
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(7, 96), (4096, 768), (1000, 1024)])
def test_half_precision_within_torch_error(dtype, n, d):
    x = torch.randn(n, d, device="cuda").to(dtype).requires_grad_(True)
    w, b = (t.requires_grad_(True) for t in _params(d))
    y = layer_norm(x, w, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    (y32,), (dx32, dw32, db32) = _ref_grads(layer_norm_ref, (x.float(), w, b), (dy.float(),))
    # torch's own same-dtype layer norm (half weight, half output) as the error yardstick
    xt, wt, bt = (t.detach().to(dtype).requires_grad_(True) for t in (x, w, b))
    yt = torch.nn.functional.layer_norm(xt, (d,), wt, bt, eps=1e-5)
    yt.backward(dy)
    assert_within_torch_error(y, y32, yt, name="y")
    assert_within_torch_error(x.grad, dx32, xt.grad, name="dx")
    assert_within_torch_error(w.grad, dw32, wt.grad, name="dweight")
    assert_within_torch_error(b.grad, db32, bt.grad, name="dbias")


@needs_cuda
def test_fp32_stream_bf16_output():
    # the model's call: fp32 residual stream, bf16 delta, bf16 normed output
    x = torch.randn(4096, 768, device="cuda")
    delta = torch.randn(4096, 768, device="cuda").bfloat16()
    w, b = _params(768)
    new_x, normed = add_layer_norm(x, delta, w, b, out_dtype=torch.bfloat16)
    new_ref, norm_ref = add_layer_norm_ref(x, delta, w, b)
    assert new_x.dtype == torch.float32 and normed.dtype == torch.bfloat16
    assert_close(new_x, new_ref, atol=1e-6, rtol=1e-6, name="new_x")
    assert_within_torch_error(normed, norm_ref, norm_ref.bfloat16(), factor=1.1, name="normed")
