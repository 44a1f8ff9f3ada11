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

needs_triton = pytest.mark.skipif(not (HAS_TRITON and triton_runs_on(torch.empty(0))),
                                  reason="Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")


def problem(N, d, C, dtype=torch.float32, bias=True):
    x = torch.randn(N, d).to(dtype)
    w = (torch.randn(C, d) / d**0.5).to(dtype)
    b = torch.randn(C).to(dtype) if bias else None
    return x, w, b, torch.randint(0, C, (N,))


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
class LaunchRecorder:
    """Stands for a @triton.jit kernel: records each launch's grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@needs_triton
def test_each_vocabulary_chunk_launches_its_own_tiles_only(monkeypatch):
    recorder = LaunchRecorder(lls._dlogits_kernel)
    monkeypatch.setattr(lls, "_dlogits_kernel", recorder)
    N, d, C = 20, 16, 200  # tiles 16 x 64: 2 row tiles; chunks of 64 classes: 64, 64, 64, 8
    x, w, b, t = problem(N, d, C)
    _, lse = lls.linear_log_softmax_gather_forward(x, w, b, t)
    lls.linear_log_softmax_gather_backward(torch.ones(N), None, x, w, b, t, lse, chunk_bytes=1)
    assert recorder.grids == [(2,), (2,), (2,), (2,)]
    recorder.grids.clear()
    lls.linear_log_softmax_gather_backward(torch.ones(N), None, x, w, b, t, lse)  # one chunk of 200: 4 tiles
    assert recorder.grids == [(8,)]


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
