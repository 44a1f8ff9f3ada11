"""LayerNormWot kernels (radd_fast/kernels/layer_norm.py) against the fp32 reference and float64
closed forms: forward, every gradient, the fused residual form (with and without dropout), each
argument at a non-default value on every path (the kernel, the no-Triton fallback, the custom ops
torch.compile calls), the launchers' messages word for word, their buffers' dtypes and tuned launch
configurations, the fallback with the interpreter off, torch.compile.

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
from tests.support.compare import DEVICE, HAS_CUDA, assert_close, assert_within_torch_error, needs_cuda, poison_like
from tests.support.kernel_paths import PATHS, take_path, with_interpreter
from tests.support.messages import error_of

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


# --------------------- non-default arguments on every path, against float64 closed forms
def ln_closed_form(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * w + b over the last dim, biased variance, in float64."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w.double() + b.double()


def _affine(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return 1 + 0.5 * torch.randn(d, generator=g), 0.5 * torch.randn(d, generator=g)


EPS = 0.25  # against rows of variance ~0.1: the default 1e-5 would give a very different result


@pytest.mark.parametrize("path", PATHS)
def test_layer_norm_eps_out_dtype_and_grads_on_every_path(monkeypatch, path):
    take_path(monkeypatch, ln_mod, path)
    g = torch.Generator().manual_seed(1)
    x = (0.3 * torch.randn(2, 3, 64, generator=g)).requires_grad_(True)
    w, b = (t.requires_grad_(True) for t in _affine(64))
    y = layer_norm(x, w, b, eps=EPS, out_dtype=torch.float16)
    assert y.dtype == torch.float16 and y.shape == x.shape
    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    expected = ln_closed_form(*leaves, EPS)
    assert_close(y.double(), expected, atol=2e-3, rtol=2e-3, name="y")
    dy = torch.randn(y.shape, generator=g).half().float()  # what reaches the fp16 output exactly
    y.float().backward(dy)
    expected.backward(dy.double())
    for name, got, want in zip(("dx", "dweight", "dbias"), (x.grad, w.grad, b.grad), leaves):
        assert_close(got.double(), want.grad, atol=1e-4, rtol=1e-4, name=name)


@pytest.mark.parametrize("path", PATHS)
def test_layer_norm_output_follows_the_input_dtype_by_default(monkeypatch, path):
    take_path(monkeypatch, ln_mod, path)
    x, (w, b) = 0.3 * torch.randn(4, 64), _affine(64)
    y = layer_norm(x, w, b, eps=EPS)
    assert y.dtype == torch.float32
    assert_close(y.double(), ln_closed_form(x, w, b, EPS), atol=1e-5, rtol=1e-5, name="y")


@pytest.mark.parametrize("which, dtype, tol", [("fallback", torch.float16, 2e-3), ("reference", torch.float32, 1e-5)])
def test_layer_norm_of_a_half_input(monkeypatch, which, dtype, tol):
    """The fallback returns the half input's dtype; the reference is fp32 (and both take their eps)."""
    if which == "fallback":
        take_path(monkeypatch, ln_mod, "fallback")
    x, (w, b) = (0.3 * torch.randn(4, 64)).half(), _affine(64)
    y = (layer_norm if which == "fallback" else layer_norm_ref)(x, w, b, eps=EPS)
    assert y.dtype == dtype
    assert_close(y.double(), ln_closed_form(x, w, b, EPS), atol=tol, rtol=tol, name="y")


@pytest.mark.parametrize("path", PATHS)
def test_add_layer_norm_eps_out_dtype_and_grads_on_every_path(monkeypatch, path):
    take_path(monkeypatch, ln_mod, path)
    g = torch.Generator().manual_seed(2)
    x = (0.2 * torch.randn(5, 64, generator=g)).requires_grad_(True)
    delta = (0.2 * torch.randn(5, 64, generator=g)).requires_grad_(True)
    w, b = (t.requires_grad_(True) for t in _affine(64, seed=1))
    # dropout_p given but training left at its default (False): no dropout
    new_x, normed = add_layer_norm(x, delta, w, b, dropout_p=0.5, eps=EPS, out_dtype=torch.float16)
    assert new_x.dtype == torch.float32 and normed.dtype == torch.float16
    assert torch.equal(new_x, x + delta)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, delta, w, b)]
    expected = ln_closed_form(leaves[0] + leaves[1], leaves[2], leaves[3], EPS)
    assert_close(normed.double(), expected, atol=2e-3, rtol=2e-3, name="normed")
    g_new, g_norm = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g).half().float()
    torch.autograd.backward([new_x, normed.float()], [g_new, g_norm])
    torch.autograd.backward([leaves[0] + leaves[1], expected], [g_new.double(), g_norm.double()])
    for name, got, want in zip(("dx", "ddelta", "dweight", "dbias"), (x.grad, delta.grad, w.grad, b.grad), leaves):
        assert_close(got.double(), want.grad, atol=1e-4, rtol=1e-4, name=name)


@pytest.mark.parametrize("path", PATHS)
def test_training_without_a_dropout_rate_drops_nothing_and_draws_nothing(monkeypatch, path):
    """dropout_p defaults to 0: training=True alone is a plain residual add, and no dropout seed
    is drawn from torch's generator (the next random number is the one a fresh seed gives)."""
    take_path(monkeypatch, ln_mod, path)
    x, delta, (w, b) = torch.randn(3, 64), torch.randn(3, 64), _affine(64)
    for kwargs in ({"training": True}, {"training": True, "dropout_p": 0.0}, {"dropout_p": 0.3}):
        torch.manual_seed(11)
        new_x, normed = add_layer_norm(x, delta, w, b, **kwargs)
        after = torch.rand(4)
        torch.manual_seed(11)
        assert torch.equal(after, torch.rand(4)), f"{kwargs}: a random number was drawn"
        assert torch.equal(new_x, x + delta), kwargs
        assert_close(normed.double(), ln_closed_form(x + delta, w, b, 1e-5), atol=1e-5, rtol=1e-5, name="normed")


def test_add_layer_norm_refuses_a_delta_of_another_shape():
    x, (w, b) = torch.randn(3, 64), _affine(64)
    with pytest.raises(ValueError) as e:
        add_layer_norm(x, torch.randn(3, 1), w, b)
    assert str(e.value) == "residual_delta: shape (3, 1) != x (3, 64)"


def test_dropout_seeds_are_drawn_from_a_wide_range():
    """Each training call draws a fresh Philox seed: 40 calls give 40 different masks (seeds from a
    few hundred values would repeat one: the birthday bound)."""
    x, delta, w, b = torch.zeros(1, 64), torch.ones(1, 64), torch.ones(64), torch.zeros(64)
    torch.manual_seed(0)
    masks = {add_layer_norm(x, delta, w, b, dropout_p=0.5, training=True)[0].ne(0).numpy().tobytes()
             for _ in range(40)}
    assert len(masks) == 40


def test_reference_dropout_follows_rate_and_training():
    g = torch.Generator().manual_seed(3)
    x, delta, (w, b) = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g), _affine(64)
    torch.manual_seed(0)
    new_x, _ = add_layer_norm_ref(x, delta, w, b, dropout_p=0.5, training=True)
    kept = (new_x - x).abs() > 1e-6
    assert abs(kept.float().mean().item() - 0.5) < 0.05
    assert_close((new_x - x)[kept], 2 * delta[kept], atol=1e-5, rtol=1e-5, name="kept delta / (1 - p)")
    for kwargs in ({"dropout_p": 0.5}, {"dropout_p": 0.5, "training": False}, {"training": True}):
        new_x, normed = add_layer_norm_ref(x, delta, w, b, eps=EPS, **kwargs)
        assert torch.equal(new_x, x + delta), kwargs
        assert_close(normed.double(), ln_closed_form(x + delta, w, b, EPS), atol=1e-5, rtol=1e-5, name="normed")


def test_reference_residual_keeps_the_stream_dtype():
    x, delta, (w, b) = torch.randn(4, 64).half(), torch.randn(4, 64).half(), _affine(64)
    new_x, normed = add_layer_norm_ref(x, delta, w, b)
    assert new_x.dtype == torch.float16 and normed.dtype == torch.float32
    assert torch.equal(new_x, (x.float() + delta.float()).half())


@pytest.mark.parametrize("path", PATHS)
def test_add_layer_norm_with_only_the_residual_used(monkeypatch, path):
    """normed unused: its grad is None in backward; dx = ddelta = the residual's grad, no weight grads."""
    take_path(monkeypatch, ln_mod, path)
    x, delta = torch.randn(3, 64, requires_grad=True), torch.randn(3, 64, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in _affine(64))
    new_x, _ = add_layer_norm(x, delta, w, b)
    g = torch.randn(3, 64)
    new_x.backward(g)
    assert torch.equal(x.grad, g) and torch.equal(delta.grad, g)
    assert w.grad is None or not w.grad.any()


def test_layer_norm_rows_of_any_layout():
    """Column-major rows, a stride-2 last dim, and [2, 5, 64] with strides (5, 1, 10) (its rows merge
    into a view whose last dim is strided): the launcher gets a contiguous copy."""
    w, b = _affine(64)
    for x in (torch.randn(64, 3).t(), torch.randn(3, 128)[:, ::2], torch.randn(2, 64, 5).transpose(1, 2),
              torch.randn(64, 2, 5).permute(1, 2, 0)):
        assert_close(layer_norm(x, w, b, eps=EPS).double(), ln_closed_form(x, w, b, EPS), atol=1e-5, rtol=1e-5,
                     name=f"strides {x.stride()}")


def test_dropout_checks():
    seed = torch.tensor([3])
    cpu = torch.device("cpu")
    assert ln_mod._check_dropout(0.0, None, 4, 4, cpu) is False
    assert ln_mod._check_dropout(0.5, seed, 1, 2**31 - 1, cpu) is True  # the largest Philox counter
    with pytest.raises(ValueError) as e:
        ln_mod._check_dropout(0.5, seed, 2**16, 2**15, cpu)
    assert str(e.value) == "dropout: 65536x32768 elements overflow the int32 Philox counter"
    for bad_seed in (None, seed.int(), torch.tensor([1, 2]), seed.to("meta")):
        with pytest.raises(ValueError) as e:
            ln_mod._check_dropout(0.5, bad_seed, 4, 4, cpu)
        assert str(e.value) == "dropout needs seed: a one-element int64 tensor on the input's device"
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError) as e:
            ln_mod._check_dropout(p, seed, 4, 4, cpu)
        assert str(e.value) == f"dropout_p must be in [0, 1), got {p}"


# ------ the launchers' messages word for word, buffers, dtypes and launch configurations
def test_layer_norm_forward_launcher_messages():
    fwd = ln_mod.layer_norm_forward
    x, (w, b) = torch.randn(4, 64), _affine(64)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    assert error_of(fwd, x[None], w, b) == "x: expected [N, d], got shape (1, 4, 64)"
    assert error_of(fwd, x[:, :0], w[:0], b[:0]) == "x: row size d=0 outside [1, 16384] (a row must fit in one tile)"
    assert error_of(fwd, x, w[:32], b) == "weight: expected shape (64,), got (32,)"
    assert error_of(fwd, x, w, b.double()) == f"bias: dtype torch.float64 not supported (use one of {dtypes})"
    assert error_of(fwd, x, torch.randn(128)[::2], b) == "weight: must be contiguous"
    assert error_of(fwd, x, w, b.to("meta")) == "bias: on meta, expected cpu"
    assert error_of(fwd, x, w, b, out_dtype=torch.float64) == (
        f"out_dtype: dtype torch.float64 not supported (use one of {dtypes})")
    assert error_of(fwd, x, w, b, eps=0.0) == "eps must be positive, got 0.0"
    assert error_of(fwd, x, w, b, dropout_p=0.1) == "dropout_p needs a residual delta"
    assert error_of(fwd, x, w, b, delta=x[:, :32]) == "delta: expected shape (4, 64), got (4, 32)"
    assert error_of(fwd, x, w, b, delta=x.to("meta")) == "delta: on meta, expected cpu"
    assert error_of(fwd, x, w, b, delta=x, new_x_out=torch.empty(4, 32)) == (
        "new_x_out: expected shape (4, 64), got (4, 32)")
    assert error_of(fwd, x, w, b, delta=x, new_x_out=torch.empty(4, 64, dtype=torch.float16)) == (
        "new_x_out: dtype torch.float16, expected torch.float32")
    assert error_of(fwd, x, w, b, out=torch.empty(4, 32)) == "out: expected shape (4, 64), got (4, 32)"
    assert error_of(fwd, x, w, b, out_dtype=torch.float16, out=torch.empty(4, 64)) == (
        "out: dtype torch.float32, expected torch.float16")
    y, new_x, mean, rstd = fwd(torch.zeros(0, 64), w, b, delta=torch.zeros(0, 64))
    assert y.shape == new_x.shape == (0, 64) and mean.shape == rstd.shape == (0,)
    assert mean.dtype == rstd.dtype == torch.float32


def test_layer_norm_backward_launcher_messages():
    bwd = ln_mod.layer_norm_backward
    x, (w, b) = torch.randn(4, 64), _affine(64)
    _, _, mean, rstd = ln_mod.layer_norm_forward(x, w, b)
    assert error_of(bwd, x[:3], x, w, mean, rstd) == "dy: expected shape (4, 64), got (3, 64)"
    assert error_of(bwd, x.to("meta"), x, w, mean, rstd) == "dy: on meta, expected cpu"
    assert error_of(bwd, x, x, w[:8], mean, rstd) == "weight: expected shape (64,), got (8,)"
    for name, bad in (("mean", mean[:3]), ("mean", mean.double()), ("rstd", rstd[None]), ("rstd", rstd.repeat(2)[::2]),
                      ("mean", mean.to("meta"))):
        args = (mean, bad) if name == "rstd" else (bad, rstd)
        assert error_of(bwd, x, x, w, *args) == (
            f"{name}: expected a contiguous fp32 [4] tensor on cpu, got {tuple(bad.shape)} {bad.dtype}")
    assert error_of(bwd, x, x, w, mean, rstd, dx_in=x[:2]) == "dx_in: expected shape (4, 64), got (2, 64)"
    assert error_of(bwd, x, x, w, mean, rstd, delta_dtype=torch.int64) == (
        "delta_dtype: dtype torch.int64 not supported (use one of (torch.float32, torch.bfloat16, torch.float16))")
    assert error_of(bwd, x, x, w, mean, rstd, dropout_p=0.1) == "dropout_p needs delta_dtype (the fused residual form)"
    assert error_of(bwd, x, x, w, mean, rstd, delta_dtype=torch.float32, ddelta_out=torch.empty(4, 8)) == (
        "ddelta_out: expected shape (4, 64), got (4, 8)")
    assert error_of(bwd, x, x, w, mean, rstd, dx_out=torch.empty(4, 8)) == "dx_out: expected shape (4, 64), got (4, 8)"
    empty = torch.zeros(0, 64)
    dx, ddelta, dw, db = bwd(empty, empty, w, mean[:0], rstd[:0], delta_dtype=torch.float32)
    assert dx.shape == ddelta.shape == (0, 64) and torch.equal(dw, torch.zeros(64)) and torch.equal(db, torch.zeros(64))


def test_fused_backward_writes_ddelta_in_its_dtype_and_buffer():
    """Without dropout ddelta = dx, stored in delta's dtype, into ddelta_out when given."""
    x, (w, b) = torch.randn(4, 64), _affine(64)
    dy = torch.randn(4, 64)
    _, _, mean, rstd = ln_mod.layer_norm_forward(x, w, b)
    dx, ddelta, _, _ = ln_mod.layer_norm_backward(dy, x, w, mean, rstd, delta_dtype=torch.float16)
    assert ddelta.dtype == torch.float16 and dx.dtype == torch.float32
    assert_close(ddelta.double(), dx.half().double(), atol=0, rtol=0, name="ddelta")
    given = torch.full((4, 64), float("nan"))
    _, ddelta, _, _ = ln_mod.layer_norm_backward(dy, x, w, mean, rstd, delta_dtype=torch.float32, ddelta_out=given)
    assert ddelta is given and torch.equal(given, dx)


def test_launchers_keep_the_dtypes_of_their_inputs():
    """dweight / dbias in the weights' dtype, dx in x's (fp16 here: exact enough under the interpreter)."""
    g = torch.Generator().manual_seed(5)
    x, dy = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    w, b = (t.half() for t in _affine(64))
    _, _, mean, rstd = ln_mod.layer_norm_forward(x, w, b)
    dx, _, dw, db = ln_mod.layer_norm_backward(dy, x, w, mean, rstd)
    assert dx.dtype == torch.float32 and dw.dtype == db.dtype == torch.float16
    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    ln_closed_form(*leaves, 1e-5).backward(dy.double())
    assert_close(dw.double(), leaves[1].grad, atol=5e-3, rtol=2e-3, name="dweight")
    assert_close(db.double(), leaves[2].grad, atol=5e-3, rtol=2e-3, name="dbias")
    y, _, mean, rstd = ln_mod.layer_norm_forward(x.half(), w, b)
    dx, _, _, _ = ln_mod.layer_norm_backward(dy.half(), x.half(), w, mean, rstd)
    assert y.dtype == dx.dtype == torch.float16


def test_fused_forward_writes_new_x_in_the_stream_dtype_and_buffer():
    x, delta, (w, b) = torch.randn(4, 64), torch.randn(4, 64), _affine(64)
    given = torch.full((4, 64), float("nan"))
    _, new_x, _, _ = ln_mod.layer_norm_forward(x, w, b, delta=delta, new_x_out=given)
    assert new_x is given and torch.equal(given, x + delta)
    y, new_x, _, _ = ln_mod.layer_norm_forward(x.half(), w, b, delta=delta.half())
    assert new_x.dtype == y.dtype == torch.float16
    assert torch.equal(new_x, (x.half().float() + delta.half().float()).half())


def test_row_sizes_at_both_limits():
    y = ln_mod.layer_norm_forward(torch.randn(2, 1), torch.ones(1), torch.full((1,), 0.5))[0]
    assert torch.equal(y, torch.full((2, 1), 0.5))  # one element: normalised to 0, then + bias
    d = ln_mod.MAX_D
    x = torch.randn(1, d)
    y = ln_mod.layer_norm_forward(x, torch.ones(d), torch.zeros(d))[0]
    assert_close(y.double(), ln_closed_form(x, torch.ones(d), torch.zeros(d), 1e-5), atol=1e-4, rtol=1e-4, name="y")
    with pytest.raises(ValueError) as e:
        ln_mod.layer_norm_forward(torch.randn(1, d + 1), torch.ones(d + 1), torch.zeros(d + 1))
    assert str(e.value) == f"x: row size d={d + 1} outside [1, {d}] (a row must fit in one tile)"


def test_layer_norm_launch_configs_are_the_tuned_ones():
    """The sweep in the launchers' comment: the forward ~4K elements a program (4 rows of 768),
    capped at 16 rows; the backward 1024 elements a tile step, 8 programs an SM; warps by width."""
    fwd = {64: (16, 4), 256: (16, 4), 1024: (4, 4), 2048: (2, 4), 4096: (1, 8), 8192: (1, 8), 16384: (1, 16)}
    assert {block: ln_mod._fwd_config(block) for block in fwd} == fwd
    bwd = {16: (16, 4, 8), 64: (16, 4, 8), 128: (8, 4, 8), 1024: (1, 4, 8), 2048: (1, 4, 8), 4096: (1, 8, 8),
           8192: (1, 8, 8), 16384: (1, 16, 8)}
    assert {block: ln_mod._bwd_config(block, torch.device("cpu")) for block in bwd} == bwd


def test_backward_programs_per_card(monkeypatch):
    """Interpreter: at most 4 programs; CUDA: SMs x programs-per-SM, the SM count read once a device."""
    reads = []

    class Props:
        multi_processor_count = 132

    def properties(device):
        reads.append(device)
        return Props()

    monkeypatch.setattr(ln_mod, "_SM_COUNT", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [ln_mod._num_programs(t, 8, cpu) for t in (0, 1, 3, 4, 5, 100)] == [1, 1, 3, 4, 4, 4]
    assert [ln_mod._num_programs(t, 8, gpu) for t in (0, 1, 100, 1056, 5000)] == [1, 1, 100, 1056, 1056]
    assert ln_mod._num_programs(5000, 2, gpu) == 264
    assert reads == [gpu]


# -------- the fallback where Triton cannot run (the interpreter off), against the kernel
def test_layer_norm_fallbacks_match_the_kernels(no_triton):
    x, delta = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    w, b = torch.randn(48), torch.randn(48)
    fallback = layer_norm(x, w, b)
    assert_close(fallback, layer_norm_ref(x, w, b), atol=0, rtol=0, name="fallback = ref")
    assert_close(fallback, with_interpreter(no_triton, lambda: layer_norm(x, w, b)), atol=1e-5, name="ln")
    new_x, normed = add_layer_norm(x, delta, w, b, out_dtype=torch.float64)
    assert normed.dtype == torch.float64
    k_new, k_normed = with_interpreter(no_triton, lambda: add_layer_norm(x, delta, w, b))
    assert_close(new_x, k_new, atol=1e-6, name="new_x")
    assert_close(normed, k_normed, atol=1e-5, name="normed")
    assert_close(new_x, x + delta, atol=0, rtol=0)
