"""The fused loss head's launchers, configuration and autograd glue, against exact expectations (issue 17).

tests/kernels/test_linear_log_softmax.py compares values and gradients with the full-logits
reference in fp32. Mutation testing found what that leaves open: the buffers' dtypes (fp32 in,
fp32 out hides a dropped dtype), which tiles a launch asks for (the interpreter's tiles do not
depend on the dtype), the backward launcher's messages and the N <= 1 stride rule, how many
programs each vocabulary chunk launches, and the tuned tiles themselves. fp16 runs through the
interpreter exactly enough for these checks (its bf16 dots do not: tests/kernels/ says why).
"""
from __future__ import annotations

import pytest
import torch

import radd_fast.kernels.linear_log_softmax as lls
from radd_fast.kernels.linear_log_softmax import TileConfig
from radd_fast.kernels.utils import HAS_TRITON, triton_runs_on

from .helpers import LaunchRecorder
from .kernels.test_linear_log_softmax import _problem

needs_triton = pytest.mark.skipif(not (HAS_TRITON and triton_runs_on(torch.empty(0))),
                                  reason="Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")


def problem(N, d, C, dtype=torch.float32, bias=True):
    """The kernel tests' random problem (x, W, b, targets), on the CPU: these run under the interpreter."""
    return _problem(N, d, C, dtype, bias, device="cpu")


# ---- tiles --------------------------------------------------------------------------------------------------
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


@needs_triton
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


# ---- buffers and outputs in the inputs' dtype -----------------------------------------------------------------
@needs_triton
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


@needs_triton
def test_an_empty_fp16_batch_keeps_every_dtype():
    x, w, b, t = problem(0, 16, 17, torch.float16)
    logp, lse = lls.linear_log_softmax_gather_forward(x, w, b, t)
    assert logp.dtype == lse.dtype == torch.float32
    dx, dw, db = lls.linear_log_softmax_gather_backward(logp, None, x, w, b, t, lse)
    assert (dx.shape, dw.shape, db.shape) == ((0, 16), (17, 16), (17,))
    assert (dx.dtype, dw.dtype, db.dtype) == (torch.float16,) * 3
    assert not dw.any() and not db.any()


# ---- how much work each chunk launches ------------------------------------------------------------------------
@needs_triton
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


# ---- the backward launcher's checks -----------------------------------------------------------------------------
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


@needs_triton
def test_one_row_may_have_any_stride_two_may_not():
    x, w, b, t = problem(1, 16, 20)
    _, lse = lls.linear_log_softmax_gather_forward(x, w, b, t)
    strided = torch.ones(2)[::2]  # one element, stride 2
    lls.linear_log_softmax_gather_backward(strided, None, x, w, b, t, lse)
    assert "must be contiguous fp32" in backward_error(g=torch.zeros(4)[::2], N=2)


# ---- the forward launcher's checks, word for word ------------------------------------------------------------------
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


@needs_triton
def test_one_target_or_bias_entry_may_have_any_stride_and_d_may_be_one():
    x, w, b, t = problem(1, 1, 1)  # one row, one feature, one class
    logp, lse = lls.linear_log_softmax_gather_forward(x, w, torch.zeros(2)[::2], torch.zeros(2, dtype=torch.int64)[::2])
    assert logp.abs().max() <= 1e-6 and torch.allclose(lse, x @ w.t())  # one class: log p = 0, lse = its logit


@needs_triton
def test_the_forward_launcher_validates_targets_by_default_even_for_one_row():
    x, w, b, t = problem(1, 16, 5)
    assert forward_error(x, w, b, torch.tensor([5])) == "targets must lie in [0, C=5); targets[0] = 5"
    logp, _ = lls.linear_log_softmax_gather_forward(x, w, b, torch.tensor([5]), validate=False)
    assert logp.isnan().all()


@needs_triton
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
