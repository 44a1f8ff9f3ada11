"""The fused sampling update kernels against their PyTorch references (interpreter on CPU, or CUDA)."""
import math

import pytest
import torch

from radd_fast.kernels.sampling_update import (
    gumbel_noise,
    gumbel_ref,
    head_sample_update,
    head_sample_update_ref,
    logits_sample_update,
    logits_sample_update_ref,
    row_chunks,
)
from radd_fast.kernels.utils import triton_runs_on
from tests.support.compare import poison_like
from tests.support.stats import ALPHA, ks_critical, ks_gumbel, two_sample_chi2


@pytest.fixture(autouse=True)
def _needs_triton(device):
    if not triton_runs_on(torch.empty(0, device=device)):
        pytest.skip("Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")


def _near_tie(scores: torch.Tensor, tol: float) -> torch.Tensor:
    top2 = scores.double().topk(2, dim=-1).values if scores.shape[-1] > 1 else None
    if top2 is None:
        return torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    return (top2[:, 0] - top2[:, 1]) < tol


SHAPES = [(1, 32, 9), (17, 48, 130), (70, 64, 257), (33, 20, 17)]  # (N, d, C): odd N, d not a multiple of 16


@pytest.mark.parametrize("N,d,C", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("fp64", [False, True])
def test_head_sample_update_matches_reference(device, N, d, C, dtype, tol, fp64):
    """Same noise -> the same tokens (up to rounding at near-ties); x written exactly at dst, nowhere else."""
    if dtype != torch.float32 and device.type != "cuda":
        pytest.skip("the Triton interpreter mis-reads bf16 tiles in tl.dot: 16-bit kernels are checked on CUDA only")
    torch.manual_seed(N + d + C)
    h = torch.randn(N, d, device=device).to(dtype)
    w = (torch.randn(C, d, device=device) / math.sqrt(d)).to(dtype)
    b = torch.randn(C, device=device).to(dtype)
    n_vocab = C - 1  # the last class plays MASK: never sampled
    noise = gumbel_noise(N, n_vocab, seed=C, device=device, fp64=fp64)
    x = poison_like(torch.empty(3 * N + 5, dtype=torch.int64, device=device))
    dst = torch.randperm(3 * N + 5, device=device)[:N]
    tokens = head_sample_update(h, w, b, n_vocab, dst, x, noise=noise, fp64=fp64)
    ref = head_sample_update_ref(h, w, b, n_vocab, None, None, noise, fp64)
    scores = (h.float() @ w[:n_vocab].float().t() + b[:n_vocab].float()).double() + noise.double()
    ok = (tokens == ref) | _near_tie(scores, tol)
    assert bool(ok.all()), f"{int((~ok).sum())} of {N} tokens differ away from ties"
    assert int(tokens.max()) < n_vocab and torch.equal(x[dst], tokens)
    untouched = torch.ones_like(x, dtype=torch.bool)
    untouched[dst] = False
    assert bool((x[untouched] == torch.iinfo(torch.int64).max).all())
    # seeded noise drawn inside the kernel = the materialised noise of that seed
    seeded = head_sample_update(h, w, b, n_vocab, seed=C, fp64=fp64)
    assert bool(((seeded == tokens) | _near_tie(scores, tol)).all())


@pytest.mark.parametrize("N,V", [(1, 5), (37, 130), (129, 16)])
@pytest.mark.parametrize("fp64", [False, True])
def test_logits_sample_update_is_exact(device, N, V, fp64):
    torch.manual_seed(N * V)
    logits = torch.randn(N, V, device=device) * 3
    logits[:, ::3] = float("-inf")  # filtered (top-k / top-p) tokens never win
    logits[:, 1] = logits[:, 1].clamp(min=-1e30)  # every row keeps one candidate
    noise = gumbel_noise(N, V, seed=7, device=device, fp64=fp64)
    x = poison_like(torch.empty(N + 2, dtype=torch.int64, device=device))
    dst = torch.arange(N, device=device) + 1
    tokens = logits_sample_update(logits, dst, x, noise=noise, fp64=fp64)
    ref = logits_sample_update_ref(logits, None, None, noise, fp64)
    assert torch.equal(tokens, ref) and torch.equal(x[1:-1], tokens)
    assert int(x[0]) == int(x[-1]) == torch.iinfo(torch.int64).max
    assert not bool((tokens % 3 == 0).any())
    assert torch.equal(logits_sample_update(logits, seed=7, fp64=fp64), ref)  # in-kernel noise = materialised


def test_ties_resolve_to_the_lowest_class(device):
    logits = torch.zeros(4, 300, device=device)
    zero = torch.zeros(4, 300, device=device)
    assert logits_sample_update(logits, noise=zero).tolist() == [0] * 4
    h, w, b = torch.zeros(4, 16, device=device), torch.zeros(301, 16, device=device), torch.zeros(301, device=device)
    assert head_sample_update(h, w, b, 300, noise=zero).tolist() == [0] * 4


@pytest.mark.parametrize("fp64", [False, True])
def test_gumbel_noise_statistics_and_seeding(device, fp64):
    g = gumbel_noise(256, 512, seed=1, device=device, fp64=fp64).double()
    assert bool(torch.isfinite(g).all())
    assert abs(g.mean().item() - 0.5772156649) < 0.01  # Euler-Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03
    assert torch.equal(gumbel_noise(256, 512, seed=1, device=device, fp64=fp64).double(), g)
    assert not torch.equal(gumbel_noise(256, 512, seed=2, device=device, fp64=fp64).double(), g)


@pytest.mark.parametrize("fp64", [False, True])
def test_kernel_gumbel_noise_is_standard_gumbel_and_fresh(fp64):
    """The Philox noise of the sampling kernels (interpreter on CPU): distribution, rows, keys."""
    x = gumbel_noise(64, 300, seed=11, device="cpu", fp64=fp64)
    assert x.dtype == (torch.float64 if fp64 else torch.float32) and bool(torch.isfinite(x).all())
    assert ks_gumbel(x) < ks_critical(x.numel())
    rows = torch.corrcoef(torch.stack([x[1:].flatten(), x[:-1].flatten()]).double())[0, 1]
    assert abs(float(rows)) < 0.03
    other = gumbel_noise(64, 300, seed=12, device="cpu", fp64=fp64)
    assert abs(float(torch.corrcoef(torch.stack([x.flatten(), other.flatten()]).double())[0, 1])) < 0.03
    assert torch.equal(x, gumbel_noise(64, 300, seed=11, device="cpu", fp64=fp64))


def test_gumbel_max_samples_the_softmax(device):
    n, V = 8192, 6
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5], device=device).expand(n, V).contiguous()
    draws = logits_sample_update(logits, seed=3)
    expected = (torch.softmax(logits[0], -1) * n).round().long()
    _, _, p = two_sample_chi2(torch.bincount(draws, minlength=V).cpu(), expected.cpu())
    assert p > ALPHA


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gumbel_ref_is_minus_log_minus_log_of_clamped_uniforms(dtype):
    u = torch.rand(64, 33, dtype=dtype, generator=torch.Generator().manual_seed(3))
    expected = -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))
    g = gumbel_ref((64, 33), dtype, "cpu", torch.Generator().manual_seed(3))
    assert g.dtype == dtype and torch.equal(g, expected)


def test_row_chunks_keep_offsets_in_int32():
    chunks = row_chunks(100_000, 50_257, seed=9)
    assert chunks[0][0] == 0 and chunks[-1][1] == 100_000
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all((r1 - r0 + 256) * 50_257 < 2**31 for r0, r1, _ in chunks)
    assert len({k for _, _, k in chunks}) == len(chunks)
    assert row_chunks(10, 50_257, seed=9) == [(0, 10, 9)]


def test_launcher_errors(device):
    h, w, b = torch.randn(3, 16, device=device), torch.randn(5, 16, device=device), torch.randn(5, device=device)
    with pytest.raises(ValueError, match="share one of"):
        head_sample_update(h.half(), w, b, 4)
    with pytest.raises(ValueError, match="disagree on d"):
        head_sample_update(h[:, :8], w, b, 4)
    with pytest.raises(ValueError, match="n_vocab"):
        head_sample_update(h, w, b, 6)
    with pytest.raises(ValueError, match="both dst and x_flat"):
        head_sample_update(h, w, b, 4, dst=torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="noise must be"):
        head_sample_update(h, w, b, 4, noise=torch.zeros(3, 5, device=device))
    with pytest.raises(ValueError, match="fp32"):
        logits_sample_update(torch.zeros(3, 4, dtype=torch.float64, device=device))
