"""linear_log_softmax_gather: values and gradients vs the full-logits reference,
awkward shapes, poisoned buffers, error paths, bounded temporaries, torch.compile.

On the CPU the Triton kernels run through the interpreter (tests/conftest.py);
bf16 / fp16 run only on CUDA.
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
from tests.helpers import assert_close, assert_within_torch_error, poison_like

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and triton_runs_on(torch.empty(0, device=DEVICE))),
    reason="Triton cannot run here (no CUDA and TRITON_INTERPRET unset)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 kernels are checked on CUDA only")


def _problem(N, d, C, dtype=torch.float32, bias=True, device=DEVICE):
    x = torch.randn(N, d, device=device).to(dtype)
    w = (torch.randn(C, d, device=device) / d**0.5).mul(2.0).to(dtype)
    b = torch.randn(C, device=device).to(dtype) if bias else None
    t = torch.randint(0, C, (N,), device=device)
    return x, w, b, t


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
    x, w, b, t = _problem(N, d, C)
    g, glse = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    _check_against_ref(x, w, b, t, g, glse)


@needs_triton
@pytest.mark.parametrize("N,d,C", [(1, 16, 1), (7, 48, 17), (33, 64, 257), (33, 16, 100)])
@pytest.mark.parametrize("bias", [True, False])
def test_without_lse_gradient_and_bias(N, d, C, bias):
    x, w, b, t = _problem(N, d, C, bias=bias)
    _check_against_ref(x, w, b, t, torch.randn(N, device=DEVICE), None)


@needs_triton
def test_many_vocab_chunks_match_one():
    # a budget of one block per chunk: 257 classes -> 5 chunks, the last one short
    N, d, C = 33, 48, 257
    x, w, b, t = _problem(N, d, C)
    g, glse = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    _check_against_ref(x, w, b, t, g, glse, chunk_bytes=1)


@needs_triton
def test_unused_outputs_and_expanded_grads():
    # loss = target_logp.sum(): upstream grad is an expanded view, lse gets no grad
    x, w, b, t = _problem(7, 16, 17)
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
    x, w, b, t = _problem(33, 48, 100)
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
    x, w, b, t = _problem(0, 16, 17)
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
    x, w, b, t = _problem(N, d, C)
    g, glse = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    for chunk_bytes in (lls.DEFAULT_CHUNK_BYTES, 1):
        _check_against_ref(x, w, b, t, g, glse, chunk_bytes=chunk_bytes)


# ---------------------------------------------------------------- error paths
@needs_triton
@pytest.mark.parametrize("bad", [17, 18, -1])
def test_out_of_range_target_raises(bad):
    x, w, b, t = _problem(7, 16, 17)
    t[3] = bad
    with pytest.raises(ValueError, match=r"targets\[3\]"):
        linear_log_softmax_gather(x, w, b, t)


@needs_triton
def test_out_of_range_target_without_validation_gives_nan():
    x, w, b, t = _problem(7, 16, 17)
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
    x, w, b, t = _problem(7, 16, 17)
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
    x, w, b, t = _problem(N, d, C)
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
    x, w, b, t = _problem(33, 16, 100)
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
    x, w, b, t = _problem(7, 16, 17)
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), t, False, lls.DEFAULT_CHUNK_BYTES)
    torch.library.opcheck(torch.ops.radd_fast.linear_log_softmax_gather.default, args)


def test_reference_fallback(monkeypatch):
    monkeypatch.setattr(lls, "triton_runs_on", lambda t: False)
    x, w, b, t = _problem(7, 16, 17)
    g = torch.randn(7, device=DEVICE)
    ours = _value_and_grads(linear_log_softmax_gather, x, w, b, t, g, None)
    ref = _value_and_grads(linear_log_softmax_gather_ref, x, w, b, t, g, None)
    for a, e in zip([ours[0], ours[1], *ours[2]], [ref[0], ref[1], *ref[2]]):
        assert torch.equal(a, e)


@needs_triton
def test_probabilities_sum_to_one():
    """The t_DSE term sum_v exp(log p_v) is 1: the loss may use its closed form."""
    x, w, b, t = _problem(33, 48, 257)
    _, lse = linear_log_softmax_gather(x, w, b, t)
    logits = torch.nn.functional.linear(x, w, b)
    _close32(torch.exp(logits - lse[:, None]).sum(1), torch.ones(33, device=DEVICE), "sum_v p_v")


# ---------------------------------------------------------------- bf16 / fp16 (CUDA)
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,d,C,chunk_bytes", [(33, 64, 257, lls.DEFAULT_CHUNK_BYTES), (1000, 768, 5003, 2**20)])
def test_low_precision_within_torch_error(dtype, N, d, C, chunk_bytes):
    x, w, b, t = _problem(N, d, C, dtype=dtype)
    g, glse = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    ours = _value_and_grads(linear_log_softmax_gather, x, w, b, t, g, glse, chunk_bytes=chunk_bytes)
    same = _value_and_grads(linear_log_softmax_gather_ref, x, w, b, t, g, glse)
    ref32 = _value_and_grads(linear_log_softmax_gather_ref, x.float(), w.float(), b.float(), t, g, glse)
    names = ("target_logp", "lse", "dx", "dW", "db")
    for name, a, s, e in zip(names, [*ours[:2], *ours[2]], [*same[:2], *same[2]], [*ref32[:2], *ref32[2]]):
        assert a.dtype == s.dtype, f"{name}: dtype {a.dtype} != torch's {s.dtype}"
        assert_within_torch_error(a, e, s, factor=2.0, atol=1e-3, name=f"{name} {dtype}")
