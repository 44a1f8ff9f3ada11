"""The kernel modules' launchers, dispatch and references away from their defaults (issue 17).

Found by mutation testing: the kernel tests ran every public function at ``eps=1e-5``, in fp32
only, through the eager autograd path only (the custom-op path runs only under torch.compile),
and never looked at which launch configuration was chosen. Here each parameter is set to a
non-default value and checked against a closed form computed in float64, and each path (the
kernel through the interpreter, the no-Triton fallback, the custom ops called eagerly as
torch.compile would) is taken explicitly.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from radd_fast.kernels import layer_norm as ln_mod
from radd_fast.kernels import rotary as rot_mod
from radd_fast.kernels import sampling_update as su
from radd_fast.kernels.layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref
from tests.helpers import assert_close

PATHS = ["kernel", "fallback", "custom_op"]


def take_path(monkeypatch, module, path: str) -> None:
    """Route ``module``'s public functions down ``path``: the Triton kernel (interpreter on CPU),
    the PyTorch fallback (Triton 'cannot run'), or the torch.library custom ops torch.compile
    calls (``is_compiling`` true; custom ops run eagerly too)."""
    if path == "fallback":
        monkeypatch.setattr(module, "triton_runs_on", lambda t: False)
    elif path == "custom_op":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def ln_closed_form(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * w + b over the last dim, biased variance, in float64."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w.double() + b.double()


def _affine(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return 1 + 0.5 * torch.randn(d, generator=g), 0.5 * torch.randn(d, generator=g)


# ------------------------------------------------------------------------- layer norm
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


def _ln_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_layer_norm_forward_launcher_messages():
    fwd = ln_mod.layer_norm_forward
    x, (w, b) = torch.randn(4, 64), _affine(64)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    assert _ln_error(fwd, x[None], w, b) == "x: expected [N, d], got shape (1, 4, 64)"
    assert _ln_error(fwd, x[:, :0], w[:0], b[:0]) == "x: row size d=0 outside [1, 16384] (a row must fit in one tile)"
    assert _ln_error(fwd, x, w[:32], b) == "weight: expected shape (64,), got (32,)"
    assert _ln_error(fwd, x, w, b.double()) == f"bias: dtype torch.float64 not supported (use one of {dtypes})"
    assert _ln_error(fwd, x, torch.randn(128)[::2], b) == "weight: must be contiguous"
    assert _ln_error(fwd, x, w, b.to("meta")) == "bias: on meta, expected cpu"
    assert _ln_error(fwd, x, w, b, out_dtype=torch.float64) == (
        f"out_dtype: dtype torch.float64 not supported (use one of {dtypes})")
    assert _ln_error(fwd, x, w, b, eps=0.0) == "eps must be positive, got 0.0"
    assert _ln_error(fwd, x, w, b, dropout_p=0.1) == "dropout_p needs a residual delta"
    assert _ln_error(fwd, x, w, b, delta=x[:, :32]) == "delta: expected shape (4, 64), got (4, 32)"
    assert _ln_error(fwd, x, w, b, delta=x.to("meta")) == "delta: on meta, expected cpu"
    assert _ln_error(fwd, x, w, b, delta=x, new_x_out=torch.empty(4, 32)) == (
        "new_x_out: expected shape (4, 64), got (4, 32)")
    assert _ln_error(fwd, x, w, b, delta=x, new_x_out=torch.empty(4, 64, dtype=torch.float16)) == (
        "new_x_out: dtype torch.float16, expected torch.float32")
    assert _ln_error(fwd, x, w, b, out=torch.empty(4, 32)) == "out: expected shape (4, 64), got (4, 32)"
    assert _ln_error(fwd, x, w, b, out_dtype=torch.float16, out=torch.empty(4, 64)) == (
        "out: dtype torch.float32, expected torch.float16")
    y, new_x, mean, rstd = fwd(torch.zeros(0, 64), w, b, delta=torch.zeros(0, 64))
    assert y.shape == new_x.shape == (0, 64) and mean.shape == rstd.shape == (0,)
    assert mean.dtype == rstd.dtype == torch.float32


def test_layer_norm_backward_launcher_messages():
    bwd = ln_mod.layer_norm_backward
    x, (w, b) = torch.randn(4, 64), _affine(64)
    _, _, mean, rstd = ln_mod.layer_norm_forward(x, w, b)
    assert _ln_error(bwd, x[:3], x, w, mean, rstd) == "dy: expected shape (4, 64), got (3, 64)"
    assert _ln_error(bwd, x.to("meta"), x, w, mean, rstd) == "dy: on meta, expected cpu"
    assert _ln_error(bwd, x, x, w[:8], mean, rstd) == "weight: expected shape (64,), got (8,)"
    for name, bad in (("mean", mean[:3]), ("mean", mean.double()), ("rstd", rstd[None]), ("rstd", rstd.repeat(2)[::2]),
                      ("mean", mean.to("meta"))):
        args = (mean, bad) if name == "rstd" else (bad, rstd)
        assert _ln_error(bwd, x, x, w, *args) == (
            f"{name}: expected a contiguous fp32 [4] tensor on cpu, got {tuple(bad.shape)} {bad.dtype}")
    assert _ln_error(bwd, x, x, w, mean, rstd, dx_in=x[:2]) == "dx_in: expected shape (4, 64), got (2, 64)"
    assert _ln_error(bwd, x, x, w, mean, rstd, delta_dtype=torch.int64) == (
        "delta_dtype: dtype torch.int64 not supported (use one of (torch.float32, torch.bfloat16, torch.float16))")
    assert _ln_error(bwd, x, x, w, mean, rstd, dropout_p=0.1) == "dropout_p needs delta_dtype (the fused residual form)"
    assert _ln_error(bwd, x, x, w, mean, rstd, delta_dtype=torch.float32, ddelta_out=torch.empty(4, 8)) == (
        "ddelta_out: expected shape (4, 64), got (4, 8)")
    assert _ln_error(bwd, x, x, w, mean, rstd, dx_out=torch.empty(4, 8)) == "dx_out: expected shape (4, 64), got (4, 8)"
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


# ------------------------------------------------------------------------- rotary
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


# ------------------------------------------------------------------------- sampling update
GAMMA = 0x9E3779B97F4A7C15  # splitmix64's state increment


def test_mix64_is_the_published_splitmix64():
    """Vigna's splitmix64 from seed 1234567 outputs 6457827717110365317, 3203168211198807973,
    9817491932198370423 (prng.di.unimi.it); mix64 of the k-th state, top bit cleared."""
    published = [6457827717110365317, 3203168211198807973, 9817491932198370423]
    states = [(1234567 + k * GAMMA) % 2**64 for k in range(3)]
    assert [su.mix64(s) for s in states] == [v & (2**63 - 1) for v in published]


def test_row_chunks_boundaries():
    # (2^31 - 1) // 50257 = 42730 rows fit int32 offsets; 256 rows of margin leave 42474 a launch
    chunks = su.row_chunks(100_000, 50_257, seed=9)
    assert [(r0, r1) for r0, r1, _ in chunks] == [(0, 42474), (42474, 84948), (84948, 100_000)]
    keys = [k for _, _, k in chunks]
    assert len(set(keys)) == 3 and all(0 <= k < 2**63 for k in keys)
    other_seed = [k for _, _, k in su.row_chunks(100_000, 50_257, seed=10)]
    assert not set(keys) & set(other_seed)  # every (seed, chunk) its own stream
    # 2^20 classes: 2047 - 256 = 1791 rows a launch; one row more needs a second launch
    assert su.row_chunks(1791, 2**20, seed=5) == [(0, 1791, 5)]
    assert [(r0, r1) for r0, r1, _ in su.row_chunks(1792, 2**20, seed=5)] == [(0, 1791), (1791, 1792)]
    # more classes than int32 offsets: one row a launch (never zero rows)
    assert [(r0, r1) for r0, r1, _ in su.row_chunks(3, 2**32, seed=1)] == [(0, 1), (1, 2), (2, 3)]
    # one class: (2^31 - 1) - 256 rows fit one launch
    assert su.row_chunks(2**31 - 1 - 256, 1, seed=3) == [(0, 2**31 - 1 - 256, 3)]
    # a single launch keys Philox with the seed itself, as a non-negative int64
    assert su.row_chunks(4, 0, seed=-1) == [(0, 4, 2**63 - 1)]
    assert su.row_chunks(4, 100, seed=2**64 + 3) == [(0, 4, 3)]


def _su_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_sampling_update_launcher_messages():
    h, w, b = torch.randn(3, 16), torch.randn(5, 16), torch.randn(5)
    head = su.head_sample_update
    assert _su_error(head, h[0], w, b, 4) == "h must be [N, d] and weight [C, d], got (16,), (5, 16)"
    assert _su_error(head, h, w[0], b, 4) == "h must be [N, d] and weight [C, d], got (3, 16), (16,)"
    assert _su_error(head, h[:, :8], w, b, 4) == "h [N, d=8] and weight [C, d=16] disagree on d"
    dtypes = su.SUPPORTED_DTYPES
    assert _su_error(head, h.half(), w, b, 4) == (
        f"h, weight, bias must share one of {dtypes}, got torch.float16, torch.float32, torch.float32; cast explicitly")
    assert _su_error(head, h.double(), w.double(), b.double(), 4).startswith(
        f"h, weight, bias must share one of {dtypes}, got torch.float64")
    assert _su_error(head, h, w, b.half(), 4).endswith("got torch.float32, torch.float32, torch.float16; cast explicitly")
    assert _su_error(head, h, w, b[:4], 4) == "bias must be [C=5], got (4,)"
    assert _su_error(head, h, w, b, 6) == "n_vocab must be in [1, C=5], got 6"
    assert _su_error(head, h, w, b, 0) == "n_vocab must be in [1, C=5], got 0"
    assert head(h, w, b, 1).tolist() == [0, 0, 0] and head(h, w, b, 5).shape == (3,)  # both ends allowed
    assert _su_error(head, h, w, b.to("meta"), 4) == "h, weight, bias on different devices"
    assert _su_error(head, h, w.to("meta"), b, 4) == "h, weight, bias on different devices"
    strided = torch.randn(16, 3).t()
    assert _su_error(head, strided, w, b, 4) == "h, weight need unit stride along d; bias contiguous"
    assert _su_error(head, h, torch.randn(16, 5).t(), b, 4) == "h, weight need unit stride along d; bias contiguous"
    assert _su_error(head, h, w, torch.randn(10)[::2], 4) == "h, weight need unit stride along d; bias contiguous"
    assert head(h, w, torch.randn(1)[0:1].expand(5).contiguous(), 4).shape == (3,)  # a contiguous bias is fine
    logits = torch.zeros(3, 4)
    update = su.logits_sample_update
    assert _su_error(update, logits.double()) == "logits must be fp32 [N, n_vocab], got torch.float64 (3, 4)"
    assert _su_error(update, logits[0]) == "logits must be fp32 [N, n_vocab], got torch.float32 (4,)"
    assert _su_error(update, torch.zeros(4, 3).t()) == "logits need unit stride along the vocabulary"
    assert _su_error(update, torch.zeros(2, 4).t()) == "logits need unit stride along the vocabulary"  # 2 classes
    assert update(torch.zeros(3, 4).t()[:, :1]).tolist() == [0, 0, 0, 0]  # one class: any stride
    assert _su_error(update, torch.zeros(3, 0)) == "logits need at least one class"


def test_sampling_update_destination_and_noise_messages():
    logits = torch.zeros(3, 4)
    update = su.logits_sample_update
    dst, x_flat = torch.zeros(3, dtype=torch.int64), torch.zeros(10, dtype=torch.int64)
    both = "pass both dst and x_flat (to write into x) or neither"
    assert _su_error(update, logits, dst=dst) == both
    assert _su_error(update, logits, x_flat=x_flat) == both
    assert _su_error(update, logits, dst=dst.int(), x_flat=x_flat) == "dst must be int64 [N=3], got torch.int32 (3,)"
    assert _su_error(update, logits, dst=dst[:2], x_flat=x_flat) == "dst must be int64 [N=3], got torch.int64 (2,)"
    flat = "x_flat must be a contiguous 1-D int64 tensor, got"
    assert _su_error(update, logits, dst=dst, x_flat=x_flat.int()) == f"{flat} torch.int32 (10,)"
    assert _su_error(update, logits, dst=dst, x_flat=x_flat.view(2, 5)) == f"{flat} torch.int64 (2, 5)"
    assert _su_error(update, logits, dst=dst, x_flat=x_flat[::2]) == f"{flat} torch.int64 (5,)"
    devices = "dst, x_flat and the inputs must share a device"
    assert _su_error(update, logits, dst=dst.to("meta"), x_flat=x_flat) == devices
    assert _su_error(update, logits, dst=dst, x_flat=x_flat.to("meta")) == devices
    assert _su_error(update, logits, dst=torch.zeros(6, dtype=torch.int64)[::2], x_flat=x_flat) == "dst must be contiguous"
    noise = torch.zeros(3, 4)
    assert _su_error(update, logits, noise=noise[:2]) == "noise must be [N=3, n_vocab=4], got (2, 4)"
    assert _su_error(update, logits, noise=noise, fp64=True) == "noise must be torch.float64 (fp64=True), got torch.float32"
    assert _su_error(update, logits, noise=noise.double()) == "noise must be torch.float32 (fp64=False), got torch.float64"
    assert _su_error(update, logits, noise=noise.to("meta")) == "noise on meta, inputs on cpu"
    assert _su_error(update, logits, noise=torch.zeros(4, 3).t()) == "noise needs unit stride along the vocabulary"
    assert _su_error(update, torch.zeros(3, 2), noise=torch.zeros(2, 3).t()) == (
        "noise needs unit stride along the vocabulary")
    assert update(torch.zeros(3, 1), noise=torch.zeros(1, 3).t()).tolist() == [0, 0, 0]  # one class: any stride


@pytest.mark.parametrize("path", ["kernel", "fallback"])
def test_sampling_update_empty_batches(monkeypatch, path):
    take_path(monkeypatch, su, path)
    x_flat = torch.arange(6)
    for fp64 in (False, True):
        noise = su.gumbel_noise(0, 7, seed=3, device="cpu", fp64=fp64)
        assert noise.shape == (0, 7) and noise.dtype == (torch.float64 if fp64 else torch.float32)
        tokens = su.logits_sample_update(torch.zeros(0, 7), dst=torch.zeros(0, dtype=torch.int64), x_flat=x_flat,
                                         fp64=fp64)
        assert tokens.shape == (0,) and tokens.dtype == torch.int64
        tokens = su.head_sample_update(torch.zeros(0, 16), torch.randn(5, 16), torch.randn(5), 4, fp64=fp64)
        assert tokens.shape == (0,) and tokens.dtype == torch.int64
    assert torch.equal(x_flat, torch.arange(6))


def test_kernel_noise_of_one_row_is_the_first_row_of_more():
    """Philox is keyed by (seed, row * V + col): one row's noise is the first row of two rows' noise."""
    one, two = su.gumbel_noise(1, 37, seed=4, device="cpu"), su.gumbel_noise(2, 37, seed=4, device="cpu")
    assert torch.isfinite(one).all() and torch.equal(one[0], two[0]) and not torch.equal(two[0], two[1])


def test_fallback_noise_is_gumbel_ref_keyed_by_the_seed(monkeypatch):
    take_path(monkeypatch, su, "fallback")
    for fp64, dtype in ((False, torch.float32), (True, torch.float64)):
        noise = su.gumbel_noise(4, 9, seed=-5, device="cpu", fp64=fp64)
        gen = torch.Generator().manual_seed((-5) & (2**63 - 1))
        assert noise.dtype == dtype and torch.equal(noise, su.gumbel_ref((4, 9), dtype, "cpu", gen))


def test_references_add_in_fp64_when_asked():
    """1 + 1e-12 rounds to 1 in fp32 (a tie: the first class wins) but not in fp64."""
    logits = torch.ones(1, 2)
    noise = torch.tensor([[0.0, 1e-12]], dtype=torch.float64)
    assert su.logits_sample_update_ref(logits, None, None, noise.float()).tolist() == [0]
    assert su.logits_sample_update_ref(logits, None, None, noise, fp64=True).tolist() == [1]
    h, w, b = torch.ones(1, 2), torch.zeros(3, 2), torch.ones(3)  # logits [1, 1] over n_vocab = 2
    assert su.head_sample_update_ref(h, w, b, 2, None, None, noise.float()).tolist() == [0]
    assert su.head_sample_update_ref(h, w, b, 2, None, None, noise, fp64=True).tolist() == [1]
    x_flat = torch.zeros(4, dtype=torch.int64)
    su.head_sample_update_ref(h, w, b, 2, torch.tensor([2]), x_flat, noise, fp64=True)
    assert x_flat.tolist() == [0, 0, 1, 0]


def test_head_kernel_over_two_vocabulary_splits(monkeypatch):
    """With the vocabulary in two splits (as on CUDA), the best of the splits wins: a tie broken by
    1e-12 only in fp64 goes to the later split's class; in fp32 to the first class."""
    monkeypatch.setattr(su, "_head_config", lambda *args: su.HeadConfig(16, 16, 16, 2, 4))
    h, w, b = torch.ones(1, 16), torch.zeros(33, 16), torch.zeros(33)  # logits all 0 over 32 classes
    noise = torch.zeros(1, 32, dtype=torch.float64)
    noise[0, 20] = 1e-12  # class 20 lives in the second split
    assert su.head_sample_update(h, w, b, 32, noise=noise, fp64=True).tolist() == [20]
    assert su.head_sample_update(h, w, b, 32, noise=noise.float()).tolist() == [20]  # 1e-12 > 0 in fp32 too
    noise = torch.full((2, 32), -1.0, dtype=torch.float64)
    noise[:, 3], noise[0, 25], noise[1, 17] = 0.5, 0.5 + 1e-9, 0.75
    assert su.head_sample_update(torch.ones(2, 16), w, b, 32, noise=noise, fp64=True).tolist() == [25, 17]
    # each row's partial results are its own: row 0's strong second split must not leak into row 1
    noise = torch.full((3, 32), -1.0)
    noise[0, 20], noise[1, 3], noise[2, 30] = 5.0, 1.0, 2.0
    assert su.head_sample_update(torch.ones(3, 16), w, b, 32, noise=noise).tolist() == [20, 3, 30]


def test_reference_adds_in_fp32_unless_asked():
    """fp64 noise with fp64=False is rounded to fp32 first: 1 + 1e-12 is then a tie (first class)."""
    tie = torch.tensor([[0.0, 1e-12]], dtype=torch.float64)
    assert su.logits_sample_update_ref(torch.ones(1, 2), None, None, tie).tolist() == [0]
    assert su.logits_sample_update_ref(torch.ones(1, 2), None, None, tie, fp64=True).tolist() == [1]


def test_sampling_head_configs():
    cpu = torch.device("cpu")
    assert su._head_config(5, 20, 17, False, torch.float32, cpu) == su.HeadConfig(16, 32, 32, 1, 4)
    assert su._head_config(1, 8, 3, True, torch.float32, cpu) == su.HeadConfig(16, 16, 16, 1, 4)
    assert su._head_config(300, 768, 50257, False, torch.float32, cpu) == su.HeadConfig(128, 128, 64, 1, 8)
    assert su._head_config(100, 100, 100, False, torch.float32, cpu) == su.HeadConfig(128, 128, 64, 1, 8)
    assert su._head_config(40, 40, 60, False, torch.float32, cpu) == su.HeadConfig(64, 64, 64, 1, 4)
    # 8 warps from 8192 scores a tile (Philox keeps 4 words per score live)
    assert [su._head_warps(bn, bv) for bn, bv in ((64, 128), (32, 128), (16, 512), (128, 64), (63, 128))] == [8, 4, 8, 8, 4]


def test_sampling_head_config_on_a_card(monkeypatch):
    """CUDA: the card's capability, shared memory and SM count go to head_config_for (sm_90 row
    of the committed build: 128 rows at V - 1 = 50257, d = 768, 132 SMs -> 64 rows, 197 splits)."""
    class Props:
        multi_processor_count = 132

    gpu = torch.device("cuda", 0)
    card = {"capability": (9, 0), "smem": 227 * 1024}

    def card_of(device):
        assert device == gpu
        return card["capability"], card["smem"]

    def properties(device):
        assert device == gpu
        return Props()

    monkeypatch.setattr(su, "card_of", card_of)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    cfg = su._head_config(128, 768, 50257, False, torch.bfloat16, gpu)
    assert cfg == su.HeadConfig(64, 128, 64, 197, 8, 3)
    # an L4 (sm_89, 99 KB): the card's limit, the dtype and fp64 all reach head_config_for
    card.update(capability=(8, 9), smem=99 * 1024)
    for dtype, fp64 in ((torch.bfloat16, True), (torch.float32, False)):
        cfg = su._head_config(128, 768, 50257, fp64, dtype, gpu)
        assert cfg == su.head_config_for((8, 9), 99 * 1024, dtype, 128, 768, 50257, fp64, 132), (dtype, fp64)
    assert su._head_config(128, 768, 50257, True, torch.bfloat16, gpu).block_n == 32  # fp64: 32 rows a tile


def test_balanced_splits():
    """ceil(V / block_v) tiles; enough splits for 4 programs an SM over the row tiles (at least 1, at
    most every tile), then balanced: ceil(tiles / ceil(tiles / splits)). Ints: they size a grid."""
    cases = {(128, 64, 50257, 128, 132): 197, (1, 16, 50257, 128, 132): 393, (100_000, 64, 50257, 128, 132): 1,
             (1000, 64, 50257, 128, 100): 25, (1000, 64, 50257, 128, 101): 25, (3, 16, 1000, 128, 2): 8,
             (64, 64, 129, 128, 1): 2}
    got = {key: su._balanced_splits(*key) for key in cases}
    assert got == cases and all(type(v) is int for v in got.values())


def test_sampling_head_shared_memory_estimate():
    """pipeline_buffers copies of one d step's h and W tiles: 3 on sm_90 for 16-bit (wgmma), else
    num_stages - 1; (64 + 128) x 64 elements a step."""
    cfg = su.HeadConfig(64, 128, 64, 197, 8, 3)
    step = (64 + 128) * 64
    assert su.head_smem_bytes(cfg, (9, 0), torch.bfloat16) == 3 * step * 2
    assert su.head_smem_bytes(cfg, (8, 0), torch.bfloat16) == 2 * step * 2
    assert su.head_smem_bytes(cfg, (9, 0), torch.float32) == 2 * step * 4
    assert su.head_smem_bytes(su.HeadConfig(16, 128, 64, 1, 4, 2), (8, 9), torch.float16) == (16 + 128) * 64 * 2
    assert type(su.head_smem_bytes(cfg, (9, 0), torch.bfloat16)) is int


@pytest.mark.parametrize("path", ["kernel", "fallback"])
def test_sampler_noise_is_the_materialised_noise_of_its_seed(monkeypatch, path):
    """Without explicit noise the samplers draw gumbel_noise(seed) in fp32 (fp64 when asked):
    tokens = argmax(logits + gumbel_noise(N, V, seed)); the default seed is 0."""
    take_path(monkeypatch, su, path)
    g = torch.Generator().manual_seed(9)
    logits, h = torch.randn(40, 30, generator=g), torch.randn(40, 16, generator=g)
    w, b = torch.randn(31, 16, generator=g), torch.randn(31, generator=g)
    head_logits = h @ w[:30].t() + b[:30]
    for fp64, dtype in ((False, torch.float32), (True, torch.float64)):
        noise = su.gumbel_noise(40, 30, seed=5, device="cpu", fp64=fp64)
        expected = (logits.to(dtype) + noise).argmax(-1)
        assert torch.equal(su.logits_sample_update(logits, seed=5, fp64=fp64), expected), fp64
        expected = (head_logits.to(dtype) + noise).argmax(-1)
        assert (su.head_sample_update(h, w, b, 30, seed=5, fp64=fp64) == expected).float().mean() > 0.95, fp64
    # explicit noise is the noise used, added in fp64 when asked (1 + 1e-12 is 1 in fp32)
    tie = torch.tensor([[0.0, 1e-12]], dtype=torch.float64)
    assert su.logits_sample_update(torch.ones(1, 2), noise=tie, fp64=True).tolist() == [1]
    assert su.logits_sample_update(torch.ones(1, 2), noise=tie.float()).tolist() == [0]
    assert su.logits_sample_update(torch.zeros(2, 3), noise=torch.tensor([[0.0, 0.0, 5.0], [7.0, 0.0, 0.0]])).tolist() == [2, 0]
    h1, w1, b1 = torch.ones(1, 2), torch.zeros(3, 2), torch.ones(3)  # head logits [1, 1] over 2 classes
    assert su.head_sample_update(h1, w1, b1, 2, noise=tie, fp64=True).tolist() == [1]
    assert su.head_sample_update(h1, w1, b1, 2, noise=torch.tensor([[3.0, 0.0]])).tolist() == [0]
    assert torch.equal(su.head_sample_update(h, w, b, 30), su.head_sample_update(h, w, b, 30, seed=0))
    assert torch.equal(su.logits_sample_update(logits), su.logits_sample_update(logits, seed=0))
    assert not torch.equal(su.logits_sample_update(logits), su.logits_sample_update(logits, seed=1))


def test_finalize_blocks():
    """At most 8192 partials a program, at most 64 rows, both powers of two and at least 2."""
    cases = {(1, 1): (2, 2), (3, 1): (4, 2), (100, 197): (32, 256), (1000, 512): (16, 512),
             (1000, 1024): (8, 1024), (1000, 20000): (2, 32768), (1000, 2): (64, 2), (5, 3): (8, 4)}
    got = {key: su.finalize_blocks(*key) for key in cases}
    assert got == cases and all(type(a) is int and type(b) is int for a, b in got.values())
