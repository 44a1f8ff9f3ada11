"""linear_log_softmax_gather (radd_fast/kernels/linear_log_softmax.py): values and gradients vs the
full-logits reference, awkward shapes, poisoned buffers, error paths (the launchers' messages word
for word), bounded temporaries, the buffers' and outputs' dtypes, which tiles a launch asks for and
how many programs each vocabulary chunk launches, the tuned tiles, the fallback with the
interpreter off, torch.compile.

On the CPU the Triton kernels run through the interpreter (tests/conftest.py); bf16 / fp16 run only
on CUDA, except where fp16 runs through the interpreter exactly enough (dtypes, loose values: its
bf16 dots do not).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import radd_fast.kernels.linear_log_softmax as lls
from radd_fast.kernels.linear_log_softmax import (
    TileConfig,
    linear_log_softmax_gather,
    linear_log_softmax_gather_backward,
    linear_log_softmax_gather_forward,
    linear_log_softmax_gather_ref,
    tile_config,
    vocab_chunk_cols,
)
from radd_fast.kernels.utils import HAS_TRITON, triton_runs_on
from tests.support.compare import assert_close, assert_within_torch_error, poison_like
from tests.support.kernel_inputs import loss_head_problem
from tests.support.kernel_paths import needs_triton_on_cpu, with_interpreter
from tests.support.launches import LaunchRecorder

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and triton_runs_on(torch.empty(0, device=DEVICE))),
    reason="Triton cannot run here (no CUDA and TRITON_INTERPRET unset)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 kernels are checked on CUDA only")


def _value_and_grads(fn, x, w, b, t, g, glse, **kw):
    """Run fn, backprop sum(g * target_logp + glse * lse); return outputs and grads."""
    leaves = [v.detach().clone().requires_grad_(True) if v is not None else None for v in (x, w, b)]
    logp, lse = fn(*leaves, t, **kw)
    loss = (logp * g).sum() + ((lse * glse).sum() if glse is not None else 0.0)
    loss.backward()
    return logp.detach(), lse.detach(), [v.grad if v is not None else None for v in leaves]


def _close32(actual, expected, name):
    # fp32: 1e-5 relative, with the absolute floor scaled to the tensor
    assert_close(actual, expected, atol=1e-5 * expected.abs().max().item() + 1e-7, rtol=1e-5, name=name)


def _check_against_ref(x, w, b, t, g, glse, **kw):
    ours = _value_and_grads(linear_log_softmax_gather, x, w, b, t, g, glse, **kw)
    ref = _value_and_grads(linear_log_softmax_gather_ref, x, w, b, t, g, glse)
    _close32(ours[0], ref[0], "target_logp")
    _close32(ours[1], ref[1], "lse")
    for name, a, e in zip(("dx", "dW", "db"), ours[2], ref[2]):
        if e is None:
            assert a is None, f"{name} should be None"
        else:
            _close32(a, e, name)


# ---------------------------------------------------------------- fp32 values and gradients
@needs_triton
@pytest.mark.parametrize("C", [1, 17, 100, 257])
@pytest.mark.parametrize("d", [16, 48, 64])
@pytest.mark.parametrize("N", [1, 7, 33])
def test_matches_reference_fp32(N, d, C):
    x, w, b, t = loss_head_problem(N, d, C)
    g, glse = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    _check_against_ref(x, w, b, t, g, glse)


@needs_triton
@pytest.mark.parametrize("N,d,C", [(1, 16, 1), (7, 48, 17), (33, 64, 257), (33, 16, 100)])
@pytest.mark.parametrize("bias", [True, False])
def test_without_lse_gradient_and_bias(N, d, C, bias):
    x, w, b, t = loss_head_problem(N, d, C, bias=bias)
    _check_against_ref(x, w, b, t, torch.randn(N, device=DEVICE), None)


@needs_triton
def test_many_vocab_chunks_match_one():
    # a budget of one block per chunk: 257 classes -> 5 chunks, the last one short
    N, d, C = 33, 48, 257
    x, w, b, t = loss_head_problem(N, d, C)
    g, glse = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    _check_against_ref(x, w, b, t, g, glse, chunk_bytes=1)


@needs_triton
def test_unused_outputs_and_expanded_grads():
    # loss = target_logp.sum(): upstream grad is an expanded view, lse gets no grad
    x, w, b, t = loss_head_problem(7, 16, 17)
    ours = _value_and_grads(linear_log_softmax_gather, x, w, b, t, torch.ones(7, device=DEVICE), None)
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, w, b)]
    linear_log_softmax_gather(*leaves, t)[0].sum().backward()
    for name, a, v in zip(("dx", "dW", "db"), ours[2], leaves):
        _close32(v.grad, a, name)
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, w, b)]
    linear_log_softmax_gather(*leaves, t)[1].sum().backward()  # only lse used
    ref = [v.detach().clone().requires_grad_(True) for v in (x, w, b)]
    linear_log_softmax_gather_ref(*ref, t)[1].sum().backward()
    for name, a, v in zip(("dx", "dW", "db"), leaves, ref):
        _close32(a.grad, v.grad, name)


@needs_triton
def test_launchers_with_other_tile_configs():
    # tiles larger than the problem and tiles with a short last k block (d=48, BLOCK_K=32)
    x, w, b, t = loss_head_problem(33, 48, 100)
    g = torch.randn(33, device=DEVICE)
    ref = _value_and_grads(linear_log_softmax_gather_ref, x, w, b, t, g, None)
    for cfg in (TileConfig(64, 128, 64), TileConfig(16, 16, 16, group_m=1), TileConfig(32, 32, 32, group_m=3)):
        logp, lse = linear_log_softmax_gather_forward(x, w, b, t, config=cfg)
        _close32(logp, ref[0], f"target_logp {cfg}")
        grads = linear_log_softmax_gather_backward(g, None, x, w, b, t, lse, chunk_bytes=1, config=cfg)
        for name, a, e in zip(("dx", "dW", "db"), grads, ref[2]):
            _close32(a, e, f"{name} {cfg}")


@needs_triton
def test_empty_batch():
    x, w, b, t = loss_head_problem(0, 16, 17)
    logp, lse = linear_log_softmax_gather_forward(x, w, b, t)
    assert logp.shape == lse.shape == (0,)
    dx, dw, db = linear_log_softmax_gather_backward(logp, None, x, w, b, t, lse)
    assert dx.shape == (0, 16) and (dw == 0).all() and (db == 0).all()


# ---------------------------------------------------------------- poisoned buffers
@needs_triton
def test_every_buffer_element_is_written(monkeypatch):
    """All launcher buffers start as NaN / int max: any unwritten element shows up."""
    monkeypatch.setattr(lls, "_new", lambda shape, dtype, device: poison_like(torch.empty(shape, dtype=dtype, device=device)))
    N, d, C = 33, 48, 257
    x, w, b, t = loss_head_problem(N, d, C)
    g, glse = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    for chunk_bytes in (lls.DEFAULT_CHUNK_BYTES, 1):
        _check_against_ref(x, w, b, t, g, glse, chunk_bytes=chunk_bytes)


# ---------------------------------------------------------------- error paths
@needs_triton
@pytest.mark.parametrize("bad", [17, 18, -1])
def test_out_of_range_target_raises(bad):
    x, w, b, t = loss_head_problem(7, 16, 17)
    t[3] = bad
    with pytest.raises(ValueError, match=r"targets\[3\]"):
        linear_log_softmax_gather(x, w, b, t)


@needs_triton
def test_out_of_range_target_without_validation_gives_nan():
    x, w, b, t = loss_head_problem(7, 16, 17)
    good = linear_log_softmax_gather_ref(x, w, b, t)[0]
    t[3] = 17
    logp, lse = linear_log_softmax_gather(x, w, b, t, validate=False)
    assert torch.isnan(logp[3]) and torch.isfinite(lse).all()
    keep = torch.arange(7, device=DEVICE) != 3
    _close32(logp[keep], good[keep], "target_logp of the valid rows")


@pytest.mark.parametrize("use_triton", [True, False])
def test_bad_inputs_raise(use_triton, monkeypatch):
    if use_triton and not triton_runs_on(torch.empty(0, device=DEVICE)):
        pytest.skip("Triton cannot run here")
    if not use_triton:  # the reference fallback validates the same way
        monkeypatch.setattr(lls, "triton_runs_on", lambda t: False)
    x, w, b, t = loss_head_problem(7, 16, 17)
    cases = {
        "disagree on d": (x, w[:, :8], b, t),
        "bias must be": (x, w, b[:5], t),
        "targets must be \\[N": (x, w, b, t[:5]),
        "targets must be int64": (x, w, b, t.int()),
        "x dtype must be": (x.double(), w.double(), b.double(), t),
        "weight dtype": (x, w.half(), b, t),
        "bias dtype": (x, w, b.half(), t),
        "x must be \\[N, d\\]": (x[0], w, b, t[:1]),
        "unit stride": (torch.randn(16, 7, device=DEVICE).t(), w, b, t),
    }
    for message, args in cases.items():
        with pytest.raises(ValueError, match=message):
            linear_log_softmax_gather(*args)


def test_bad_tile_config_raises():
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(16, 24, 16)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(8, 16, 16)


# ---------------------------------------------------------------- bounded memory
@pytest.mark.parametrize(
    "n_rows,n_classes,itemsize,budget,block,expected",
    [
        (16384, 50257, 2, 128 * 2**20, 256, 4096),  # the real head with the CUDA defaults: 13 chunks of 128 MiB
        (16384, 50257, 2, 256 * 2**20, 128, 7296),  # bf16, 256 MiB: 7 balanced chunks of 228 MiB
        (16384, 50257, 4, 256 * 2**20, 64, 3904),  # fp32: 13 chunks of 244 MB
        (33, 257, 4, 1, 64, 64),  # budget below one block: one block per chunk
        (33, 257, 4, 10**9, 64, 257),  # everything fits: one chunk, no rounding
        (0, 17, 4, 1, 16, 16),
    ],
)
def test_vocab_chunk_cols(n_rows, n_classes, itemsize, budget, block, expected):
    cols = vocab_chunk_cols(n_rows, n_classes, itemsize, budget, block)
    assert cols == expected
    assert cols == n_classes or cols % block == 0
    assert n_rows * cols * itemsize <= max(budget, n_rows * block * itemsize)
    # balanced: no more chunks than the budget forces
    max_cols = max(block, budget // (max(1, n_rows) * itemsize) // block * block)
    assert -(-n_classes // cols) == -(-n_classes // min(max_cols, n_classes))


class _AllocationRecorder(TorchDispatchMode):
    """Records the bytes of every tensor an aten op returns (views included: an upper bound)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.sizes.append((o.numel() * o.element_size(), tuple(o.shape), str(func)))
        return out


@needs_triton
def test_no_full_logits_tensor_exists():
    """Forward + backward never create a tensor as large as [N, C] (the reference does).

    The launchers run under the recorder directly: a dispatch mode sees a custom
    op as one call and not the allocations inside it.
    """
    N, d, C = 48, 16, 400
    x, w, b, t = loss_head_problem(N, d, C)
    chunk_bytes = N * 64 * x.element_size()  # one 64-class block of dlogits at a time
    g = torch.randn(N, device=DEVICE)

    with _AllocationRecorder() as rec:
        logp, _ = linear_log_softmax_gather_ref(*[v.detach().requires_grad_(True) for v in (x, w, b)], t)
        (logp * g).sum().backward()
    item = x.element_size()
    assert max(rec.sizes)[0] >= N * C * item  # the recorder does see the full logits

    with _AllocationRecorder() as rec:
        _, lse = linear_log_softmax_gather_forward(x, w, b, t)
        linear_log_softmax_gather_backward(g, g, x, w, b, t, lse, chunk_bytes=chunk_bytes)
    cfg = tile_config(x.dtype, x.device, backward=True)
    cols = vocab_chunk_cols(N, C, x.element_size(), chunk_bytes, cfg.block_n)
    assert cols == 64
    # the largest tensors are the gradient of W [C, d] and the dlogits chunk [N, cols]
    bound = max(C * d, N * cols, N * d, -(-N // cfg.block_m) * C) * item
    worst = max(rec.sizes)
    assert worst[0] <= bound < N * C * item, f"largest temporary {worst} exceeds {bound}"
    assert any(s[1] == (N, cols) for s in rec.sizes), "expected a dlogits chunk of the planned width"


# ---------------------------------------------------------------- torch.compile / custom op
@needs_triton
def test_under_torch_compile():
    x, w, b, t = loss_head_problem(33, 16, 100)
    g = torch.randn(33, device=DEVICE)

    def loss_fn(x, w, b, t):
        logp, lse = linear_log_softmax_gather(x, w, b, t, validate=False)
        return (logp * g).sum() + lse.mean()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        leaves = [v.detach().clone().requires_grad_(True) for v in (x, w, b)]
        loss = fn(*leaves, t)
        loss.backward()
        results.append([loss.detach()] + [v.grad for v in leaves])
    for name, a, e in zip(("loss", "dx", "dW", "db"), results[1], results[0]):
        _close32(a, e, name)


@needs_triton
def test_opcheck():
    x, w, b, t = loss_head_problem(7, 16, 17)
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), t, False, lls.DEFAULT_CHUNK_BYTES)
    torch.library.opcheck(torch.ops.radd_fast.linear_log_softmax_gather.default, args)


def test_reference_fallback(monkeypatch):
    monkeypatch.setattr(lls, "triton_runs_on", lambda t: False)
    x, w, b, t = loss_head_problem(7, 16, 17)
    g = torch.randn(7, device=DEVICE)
    ours = _value_and_grads(linear_log_softmax_gather, x, w, b, t, g, None)
    ref = _value_and_grads(linear_log_softmax_gather_ref, x, w, b, t, g, None)
    for a, e in zip([ours[0], ours[1], *ours[2]], [ref[0], ref[1], *ref[2]]):
        assert torch.equal(a, e)


@needs_triton
def test_probabilities_sum_to_one():
    """The t_DSE term sum_v exp(log p_v) is 1: the loss may use its closed form."""
    x, w, b, t = loss_head_problem(33, 48, 257)
    _, lse = linear_log_softmax_gather(x, w, b, t)
    logits = torch.nn.functional.linear(x, w, b)
    _close32(torch.exp(logits - lse[:, None]).sum(1), torch.ones(33, device=DEVICE), "sum_v p_v")


# ---------------------------------------------------------------- bf16 / fp16 (CUDA)
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,d,C,chunk_bytes", [(33, 64, 257, lls.DEFAULT_CHUNK_BYTES), (1000, 768, 5003, 2**20)])
def test_low_precision_within_torch_error(dtype, N, d, C, chunk_bytes):
    x, w, b, t = loss_head_problem(N, d, C, dtype=dtype)
    g, glse = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    ours = _value_and_grads(linear_log_softmax_gather, x, w, b, t, g, glse, chunk_bytes=chunk_bytes)
    same = _value_and_grads(linear_log_softmax_gather_ref, x, w, b, t, g, glse)
    ref32 = _value_and_grads(linear_log_softmax_gather_ref, x.float(), w.float(), b.float(), t, g, glse)
    names = ("target_logp", "lse", "dx", "dW", "db")
    for name, a, s, e in zip(names, [*ours[:2], *ours[2]], [*same[:2], *same[2]], [*ref32[:2], *ref32[2]]):
        assert a.dtype == s.dtype, f"{name}: dtype {a.dtype} != torch's {s.dtype}"
        assert_within_torch_error(a, e, s, factor=2.0, atol=1e-3, name=f"{name} {dtype}")


# ---------------------- tiles, buffers and launches on the CPU (the interpreter's tiles)
def problem(N, d, C, dtype=torch.float32, bias=True):
    """The kernel tests' random problem (x, W, b, targets), on the CPU: these run under the interpreter."""
    return loss_head_problem(N, d, C, dtype, bias, device="cpu")


def test_tuned_tiles_are_the_measured_ones():
    assert lls._tuned_tiles(torch.float32) == TileConfig(64, 64, 32, group_m=8, num_warps=4, num_stages=3)
    for dtype in (torch.bfloat16, torch.float16):  # the H200 sweep (module comment)
        assert lls._tuned_tiles(dtype) == TileConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3)
    assert lls.tile_config(torch.float16, torch.device("cpu")) == TileConfig(16, 64, 32, 8, 4, 3)  # interpreter


def test_tile_config_on_a_card_is_the_cards_choice(monkeypatch):
    asked = []
    monkeypatch.setattr(lls, "card_of", lambda device: ((8, 9), 101376))
    monkeypatch.setattr(lls, "tile_config_for", lambda *args: asked.append(args) or TileConfig(32, 32, 32))
    cuda = torch.device("cuda")  # a device object only: no GPU needed
    assert lls.tile_config(torch.bfloat16, cuda) == TileConfig(32, 32, 32)
    lls.tile_config(torch.float16, cuda, backward=True)
    assert asked == [((8, 9), 101376, torch.bfloat16, False), ((8, 9), 101376, torch.float16, True)]


@needs_triton_on_cpu
def test_launchers_ask_for_their_dtype_device_and_direction(monkeypatch):
    asked = []
    real = lls.tile_config

    def spy(dtype, device, backward=False):
        asked.append((dtype, device, backward))
        return real(dtype, device, backward)

    monkeypatch.setattr(lls, "tile_config", spy)
    x, w, b, t = problem(3, 16, 20, torch.float16)
    logp, lse = lls.linear_log_softmax_gather_forward(x, w, b, t)
    lls.linear_log_softmax_gather_backward(torch.ones(3), None, x, w, b, t, lse)
    lls.linear_log_softmax_gather_backward(torch.ones(0), None, x[:0], w, b, t[:0], lse[:0])  # N = 0 too
    cpu = torch.device("cpu")
    assert asked == [(torch.float16, cpu, False), (torch.float16, cpu, True), (torch.float16, cpu, True)]


@needs_triton_on_cpu
@pytest.mark.parametrize("chunk_bytes, chunks", [(lls.DEFAULT_CHUNK_BYTES, 1), (1, 2)])
def test_fp16_buffers_and_outputs(monkeypatch, chunk_bytes, chunks):
    """dlogits and dW in fp16, the db table in fp32, dx in fp16 for one chunk and fp32 across several."""
    made = []
    real = lls._new
    monkeypatch.setattr(lls, "_new", lambda shape, dtype, device: made.append((tuple(shape), dtype, device))
                        or real(shape, dtype, device))
    N, d, C = 5, 32, 70  # 70 classes: two 64-wide chunks at the smallest budget
    x, w, b, t = problem(N, d, C, torch.float16)
    logp, lse = lls.linear_log_softmax_gather_forward(x, w, b, t)
    assert logp.dtype == lse.dtype == torch.float32
    g = torch.randn(N)
    made.clear()
    dx, dw, db = lls.linear_log_softmax_gather_backward(g, None, x, w, b, t, lse, chunk_bytes=chunk_bytes)
    assert (dx.dtype, dw.dtype, db.dtype) == (torch.float16,) * 3
    cols = 64 if chunks == 2 else C
    cpu = torch.device("cpu")
    assert made == [((N, cols), torch.float16, cpu), ((1, C), torch.float32, cpu), ((C, d), torch.float16, cpu),
                    ((N, d), torch.float16 if chunks == 1 else torch.float32, cpu)]
    ref = [v.float().requires_grad_(True) for v in (x, w, b)]
    (lls.linear_log_softmax_gather_ref(*ref, t)[0] * g).sum().backward()
    for got, leaf in zip((dx, dw, db), ref):
        torch.testing.assert_close(got.float(), leaf.grad, atol=2e-2, rtol=2e-2)


@needs_triton_on_cpu
def test_an_empty_fp16_batch_keeps_every_dtype():
    x, w, b, t = problem(0, 16, 17, torch.float16)
    logp, lse = lls.linear_log_softmax_gather_forward(x, w, b, t)
    assert logp.dtype == lse.dtype == torch.float32
    dx, dw, db = lls.linear_log_softmax_gather_backward(logp, None, x, w, b, t, lse)
    assert (dx.shape, dw.shape, db.shape) == ((0, 16), (17, 16), (17,))
    assert (dx.dtype, dw.dtype, db.dtype) == (torch.float16,) * 3
    assert not dw.any() and not db.any()


@needs_triton_on_cpu
def test_each_vocabulary_chunk_launches_its_own_tiles_only(monkeypatch):
    N, d, C = 20, 16, 200  # tiles 16 x 64: 2 row tiles; chunks of 64 classes: 64, 64, 64, 8 (one tile each)
    x, w, b, t = problem(N, d, C)
    _, lse = lls.linear_log_softmax_gather_forward(x, w, b, t)
    kernel = lls._dlogits_kernel
    for chunk_bytes, expected in ((1, [(2,)] * 4), (lls.DEFAULT_CHUNK_BYTES, [(8,)])):  # one chunk: 4 tiles
        launches = []
        monkeypatch.setattr(lls, "_dlogits_kernel", LaunchRecorder(kernel, launches, expected))
        lls.linear_log_softmax_gather_backward(torch.ones(N), None, x, w, b, t, lse, chunk_bytes=chunk_bytes)
        assert launches == expected


# -------------------------------------------------- the launchers' checks, word for word
def backward_error(*, g=None, g_lse=None, lse=None, bias="ok", chunk_bytes=lls.DEFAULT_CHUNK_BYTES, N=4) -> str:
    x, w, b, t = problem(N, 16, 20)
    args = dict(g_target=torch.zeros(N) if g is None else g, g_lse=g_lse, lse=torch.zeros(N) if lse is None else lse)
    with pytest.raises(ValueError) as err:
        lls.linear_log_softmax_gather_backward(args["g_target"], args["g_lse"], x, w, b if bias == "ok" else bias,
                                               t, args["lse"], chunk_bytes=chunk_bytes)
    return str(err.value)


def test_backward_launcher_messages():
    assert backward_error(g=torch.zeros(3)) == "g_target must be [N=4], got (3,)"
    assert backward_error(g_lse=torch.zeros(5)) == "g_lse must be [N=4], got (5,)"
    assert backward_error(lse=torch.zeros(4, 1)) == "lse must be [N=4], got (4, 1)"
    assert backward_error(g=torch.zeros(4, dtype=torch.float64)) == (
        "g_target must be contiguous fp32, got torch.float64 stride (1,)")
    assert backward_error(g_lse=torch.zeros(8)[::2]) == "g_lse must be contiguous fp32, got torch.float32 stride (2,)"
    assert backward_error(lse=torch.zeros(4, device="meta")) == "lse on meta, x on cpu"
    assert backward_error(chunk_bytes=0) == "chunk_bytes must be positive, got 0"
    assert backward_error(bias=torch.zeros(19)) == "bias must be [C=20], got (19,)"  # the backward checks the bias too


@needs_triton_on_cpu
def test_one_row_may_have_any_stride_two_may_not():
    x, w, b, t = problem(1, 16, 20)
    _, lse = lls.linear_log_softmax_gather_forward(x, w, b, t)
    strided = torch.ones(2)[::2]  # one element, stride 2
    lls.linear_log_softmax_gather_backward(strided, None, x, w, b, t, lse)
    assert "must be contiguous fp32" in backward_error(g=torch.zeros(4)[::2], N=2)


def forward_error(x, w, b, t) -> str:
    with pytest.raises(ValueError) as err:
        lls.linear_log_softmax_gather_forward(x, w, b, t)
    return str(err.value)


def test_forward_launcher_messages():
    x, w, b, t = problem(7, 16, 17)  # N, d and C all different: a message naming the wrong one shows
    meta = torch.device("meta")
    expected = {
        "x must be [N, d], got shape (16,)": (x[0], w, b, t),
        "weight must be [C, d], got shape (16,)": (x, w[0], b, t),
        "x [N, d=16] and weight [C, d=8] disagree on d": (x, w[:, :8], b, t),
        "need C >= 1 and d >= 1, got weight (0, 16)": (x, w[:0], b[:0], t),
        "need C >= 1 and d >= 1, got weight (17, 0)": (x[:, :0], w[:, :0], b, t),
        f"x dtype must be one of {lls.SUPPORTED_DTYPES}, got torch.float64": (x.double(), w.double(), b.double(), t),
        "weight dtype torch.float16 != x dtype torch.float32; cast explicitly": (x, w.half(), b, t),
        "targets must be int64, got torch.int32": (x, w, b, t.int()),
        "targets must be [N=7], got (5,)": (x, w, b, t[:5]),
        "bias must be [C=17], got (5,)": (x, w, b[:5], t),
        "bias dtype torch.float16 != x dtype torch.float32; cast explicitly": (x, w, b.half(), t),
        "inputs on different devices: ['cpu', 'cpu', 'meta']": (x, w, None, t.to(meta)),
        "inputs on different devices: ['cpu', 'cpu', 'cpu', 'meta']": (x, w, b.to(meta), t),
        "x and weight need unit stride along d (call .contiguous())": (torch.randn(16, 7).t(), w, b, t),
        "targets must be contiguous": (x[:2], w, b, torch.zeros(4, dtype=torch.int64)[::2]),
        "bias must be contiguous": (x, w[:2], torch.zeros(4)[::2], t),
    }
    for message, args in expected.items():
        assert forward_error(*args) == message


@needs_triton_on_cpu
def test_one_target_or_bias_entry_may_have_any_stride_and_d_may_be_one():
    x, w, b, t = problem(1, 1, 1)  # one row, one feature, one class
    logp, lse = lls.linear_log_softmax_gather_forward(x, w, torch.zeros(2)[::2], torch.zeros(2, dtype=torch.int64)[::2])
    assert logp.abs().max() <= 1e-6 and torch.allclose(lse, x @ w.t())  # one class: log p = 0, lse = its logit


@needs_triton_on_cpu
def test_the_forward_launcher_validates_targets_by_default_even_for_one_row():
    x, w, b, t = problem(1, 16, 5)
    assert forward_error(x, w, b, torch.tensor([5])) == "targets must lie in [0, C=5); targets[0] = 5"
    logp, _ = lls.linear_log_softmax_gather_forward(x, w, b, torch.tensor([5]), validate=False)
    assert logp.isnan().all()


@needs_triton_on_cpu
def test_forward_buffers(monkeypatch):
    made = []
    real = lls._new
    monkeypatch.setattr(lls, "_new", lambda shape, dtype, device: made.append((tuple(shape), dtype)) or
                        real(shape, dtype, device))
    x, w, b, t = problem(5, 32, 70, torch.float16)
    lls.linear_log_softmax_gather_forward(x, w, b, t)
    assert made == [((5,), torch.float32), ((5, 2), torch.float32)]  # targets' logits, per-tile partial LSEs
    made.clear()
    lls.linear_log_softmax_gather_forward(x[:0], w, b, t[:0])
    assert made == [((0,), torch.float32), ((0,), torch.float32)]


def test_dot_precision_is_ieee_for_fp32_only():
    assert lls._dot_precision(torch.float32) == "ieee"  # no TF32 in the fp32 path
    assert lls._dot_precision(torch.float16) == lls._dot_precision(torch.bfloat16) == "tf32"


def test_tile_config_checks_group_m():
    with pytest.raises(ValueError) as err:
        TileConfig(16, 16, 16, group_m=0)
    assert str(err.value) == "TileConfig.group_m must be >= 1, got 0"


def test_vocab_chunk_cols_edges():
    for bad in ((4, 0, 4, 100, 16), (4, 10, 0, 100, 16), (4, 10, 4, 100, 0)):
        with pytest.raises(ValueError) as err:
            lls.vocab_chunk_cols(bad[0], bad[1], bad[2], bad[3], bad[4])
        assert str(err.value) == "vocab_chunk_cols: sizes must be positive"
    assert lls.vocab_chunk_cols(4, 10, 1, 1, 1) == 1  # one-byte items and one-class blocks are accepted
    # one row: 4 bytes a class, 400 bytes -> 96 classes at most, 11 balanced chunks of 91 -> 96
    assert lls.vocab_chunk_cols(1, 1000, 4, 400, 16) == 96
    assert lls.vocab_chunk_cols(0, 1000, 4, 400, 16) == 96  # no rows counts as one
    cols = lls.vocab_chunk_cols(3, 1000, 4, 1000, 16)  # 83 classes fit: 80 a chunk, a whole number
    assert cols == 80 and type(cols) is int


# -------- the fallback where Triton cannot run (the interpreter off), against the kernel
def test_loss_head_fallback_matches_the_kernel_and_validates(no_triton):
    x, w, b = torch.randn(9, 32), torch.randn(11, 32), torch.randn(11)
    t = torch.randint(0, 11, (9,))
    logp, lse = linear_log_softmax_gather(x, w, b, t)
    ref_logp, ref_lse = linear_log_softmax_gather_ref(x, w, b, t)
    assert_close(logp, ref_logp, atol=0, rtol=0)
    assert_close(lse, ref_lse, atol=0, rtol=0)
    k_logp, k_lse = with_interpreter(no_triton, lambda: linear_log_softmax_gather(x, w, b, t))
    assert_close(logp, k_logp, atol=1e-4, name="logp")
    assert_close(lse, k_lse, atol=1e-4, name="lse")
    with pytest.raises(ValueError):
        linear_log_softmax_gather(x, w, b, torch.full((9,), 11))
