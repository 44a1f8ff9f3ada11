"""Paths the CPU suite never takes, and the comparison helper itself (issue 17).

Under ``TRITON_INTERPRET=1`` every kernel runs through the interpreter, so the fallbacks used
where Triton cannot run (a CPU box without the interpreter) are never exercised. Here the
interpreter is switched off for the duration of a test (``kernels.utils.interpreter_on`` reads
the environment at every call) and each fallback is compared with the kernel path on the same
inputs, and with its reference.
"""
from __future__ import annotations

import math

import pytest
import torch

from radd_fast import RADD, LogLinearNoise, ModelConfig, RADDConfig
from radd_fast.kernels import sampling_update as su
from radd_fast.kernels.layer_norm import add_layer_norm, layer_norm, layer_norm_ref
from radd_fast.kernels.linear_log_softmax import linear_log_softmax_gather, linear_log_softmax_gather_ref
from radd_fast.kernels.rotary import apply_rotary_qkv, apply_rotary_qkv_ref, rotary_inv_freq, rotary_tables
from radd_fast.kernels.utils import triton_runs_on
from radd_fast.sampling import generate

from .helpers import assert_close
from .test_blind_spots_sampling import ks_critical, ks_gumbel


@pytest.fixture
def no_triton(monkeypatch):
    """Triton cannot run on CPU tensors inside the test (the interpreter is off)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_runs_on(torch.zeros(1))
    return monkeypatch


def with_interpreter(monkeypatch, fn):
    """fn() with the interpreter on (the kernel path), back off afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        return fn()
    finally:
        monkeypatch.setenv("TRITON_INTERPRET", "0")


# ------------------------------------------------------------------ kernels' fallbacks
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


@pytest.mark.parametrize("fp64", [False, True])
def test_sampling_update_fallbacks_match_the_kernels_on_given_noise(no_triton, fp64):
    """Given noise, the fallback and the kernel draw the same tokens and write the same cells."""
    N, d, C = 12, 32, 10
    h, w, bias = torch.randn(N, d), torch.randn(C, d), torch.randn(C)
    noise = su.gumbel_ref((N, C - 1), torch.float64 if fp64 else torch.float32, "cpu", torch.Generator().manual_seed(0))
    dst = torch.randperm(40)[:N]

    def run_head():
        x = torch.zeros(40, dtype=torch.int64)
        return su.head_sample_update(h, w, bias, C - 1, dst, x, noise=noise, fp64=fp64), x

    tok, x = run_head()
    k_tok, k_x = with_interpreter(no_triton, run_head)
    assert torch.equal(tok, k_tok) and torch.equal(x, k_x) and torch.equal(x[dst], tok)
    assert torch.equal(tok, su.head_sample_update_ref(h, w, bias, C - 1, None, None, noise, fp64))
    logits = torch.randn(N, C - 1)
    logits[:, 0] = float("-inf")  # a removed token never wins

    def run_logits():
        x = torch.zeros(40, dtype=torch.int64)
        return su.logits_sample_update(logits, dst, x, noise=noise, fp64=fp64), x

    tok, x = run_logits()
    k_tok, k_x = with_interpreter(no_triton, run_logits)
    assert torch.equal(tok, k_tok) and torch.equal(x, k_x) and bool((tok != 0).all())
    assert torch.equal(tok, su.logits_sample_update_ref(logits, None, None, noise, fp64))


def test_sampling_update_fallback_noise_is_seeded_fresh_gumbel(no_triton):
    a = su.gumbel_noise(200, 100, seed=3, device="cpu")
    assert a.shape == (200, 100) and a.dtype == torch.float32
    assert torch.equal(a, su.gumbel_noise(200, 100, seed=3, device="cpu"))
    assert ks_gumbel(a) < ks_critical(a.numel())
    b = su.gumbel_noise(200, 100, seed=4, device="cpu", fp64=True)
    assert b.dtype == torch.float64
    assert abs(float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten()]))[0, 1])) < 0.03
    # seeded draws without explicit noise: the tokens of the fallback's own noise
    logits = torch.zeros(5000, 4)
    tok = su.logits_sample_update(logits, seed=9)
    assert torch.equal(tok, su.logits_sample_update(logits, seed=9))
    counts = torch.bincount(tok, minlength=4).double()
    assert bool(((counts - 1250).abs() < 5 * math.sqrt(1250 * 0.75)).all()), counts.tolist()
    assert not torch.equal(tok, su.logits_sample_update(logits, seed=10))


# ------------------------------------------------------------------ the model and the engine without Triton
def tiny(backend: str) -> RADD:
    torch.manual_seed(0)
    model = RADD(RADDConfig(tokens=10, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=8,
                                                          dropout=0.0, name="fallback")), backend=backend)
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.5)
    return model.eval()


def test_fast_backend_without_triton_equals_the_reference(no_triton):
    x = torch.randint(0, 10, (2, 8))
    fast, ref = tiny("fast"), tiny("reference")
    assert_close(fast(x), ref(x), atol=1e-5, name="forward")
    with_kernels = with_interpreter(no_triton, lambda: fast(x))
    assert_close(fast(x), with_kernels, atol=1e-4, name="fallback vs kernels")


def test_engine_without_triton_runs_the_torch_head_and_refuses_kernels(no_triton):
    model = tiny("fast")
    x, _ = generate(model, LogLinearNoise(), 6, 8, 4, seed=1, progress=False)
    y, _ = generate(tiny("reference"), LogLinearNoise(), 6, 8, 4, seed=1, progress=False)
    assert torch.equal(x, y)  # the fast backend's head fell back to the same seeded torch draw
    with pytest.raises(ValueError, match="use_kernels=True needs CUDA tensors or TRITON_INTERPRET=1"):
        generate(model, LogLinearNoise(), 2, 8, 4, use_kernels=True, seed=1, progress=False)


# ------------------------------------------------------------------ tests.helpers.assert_close itself
INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("actual,expected", [
    ([1.0, INF], [1.0, INF]),
    ([NAN, -INF, 2.0], [NAN, -INF, 2.0 + 1e-7]),
    ([0.0], [0.0]),
])
def test_assert_close_accepts_matching_non_finite_entries(actual, expected):
    assert_close(torch.tensor(actual), torch.tensor(expected))


@pytest.mark.parametrize("actual,expected,message", [
    ([5.0, INF], [1.0, INF], "elements off"),  # a finite mismatch next to an inf is still caught
    ([1.0, 2.0], [1.0, NAN], "NaN positions differ"),  # NaN expected, a number given
    ([NAN, 2.0], [1.0, NAN], "NaN positions differ"),
    ([1.0, -INF], [1.0, INF], r"\+inf positions differ"),  # the sign of inf
    ([1.0, INF], [1.0, 3.0], r"\+inf positions differ"),
    ([NAN, 0.0], [0.0, 0.0], "NaN positions differ"),  # unwritten (poisoned) output
    ([1.0, 2.0], [1.0, 2.5], "1/2 elements off"),
])
def test_assert_close_rejects_mismatches(actual, expected, message):
    with pytest.raises(AssertionError, match=message):
        assert_close(torch.tensor(actual), torch.tensor(expected), name="t")


def test_assert_close_checks_shape_and_tolerances():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3))
    assert_close(torch.tensor([1.05]), torch.tensor([1.0]), atol=0.051, rtol=0)
    assert_close(torch.tensor([1.05]), torch.tensor([1.0]), atol=0, rtol=0.051)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.05]), torch.tensor([1.0]), atol=0.04, rtol=0.0)
