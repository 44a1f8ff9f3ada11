"""The fused sampling update kernels against their PyTorch references (interpreter on CPU, or CUDA)."""
import math

import pytest
import torch

from radd_fast.kernels import sampling_update as su
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
from tests.support.kernel_paths import take_path, with_interpreter
from tests.support.messages import error_of
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


# -------- splitmix64, row chunks, messages, splits and configurations
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


def test_sampling_update_launcher_messages():
    h, w, b = torch.randn(3, 16), torch.randn(5, 16), torch.randn(5)
    head = su.head_sample_update
    assert error_of(head, h[0], w, b, 4) == "h must be [N, d] and weight [C, d], got (16,), (5, 16)"
    assert error_of(head, h, w[0], b, 4) == "h must be [N, d] and weight [C, d], got (3, 16), (16,)"
    assert error_of(head, h[:, :8], w, b, 4) == "h [N, d=8] and weight [C, d=16] disagree on d"
    dtypes = su.SUPPORTED_DTYPES
    assert error_of(head, h.half(), w, b, 4) == (
        f"h, weight, bias must share one of {dtypes}, got torch.float16, torch.float32, torch.float32; cast explicitly")
    assert error_of(head, h.double(), w.double(), b.double(), 4).startswith(
        f"h, weight, bias must share one of {dtypes}, got torch.float64")
    assert error_of(head, h, w, b.half(), 4).endswith("got torch.float32, torch.float32, torch.float16; cast explicitly")
    assert error_of(head, h, w, b[:4], 4) == "bias must be [C=5], got (4,)"
    assert error_of(head, h, w, b, 6) == "n_vocab must be in [1, C=5], got 6"
    assert error_of(head, h, w, b, 0) == "n_vocab must be in [1, C=5], got 0"
    assert head(h, w, b, 1).tolist() == [0, 0, 0] and head(h, w, b, 5).shape == (3,)  # both ends allowed
    assert error_of(head, h, w, b.to("meta"), 4) == "h, weight, bias on different devices"
    assert error_of(head, h, w.to("meta"), b, 4) == "h, weight, bias on different devices"
    strided = torch.randn(16, 3).t()
    assert error_of(head, strided, w, b, 4) == "h, weight need unit stride along d; bias contiguous"
    assert error_of(head, h, torch.randn(16, 5).t(), b, 4) == "h, weight need unit stride along d; bias contiguous"
    assert error_of(head, h, w, torch.randn(10)[::2], 4) == "h, weight need unit stride along d; bias contiguous"
    assert head(h, w, torch.randn(1)[0:1].expand(5).contiguous(), 4).shape == (3,)  # a contiguous bias is fine
    logits = torch.zeros(3, 4)
    update = su.logits_sample_update
    assert error_of(update, logits.double()) == "logits must be fp32 [N, n_vocab], got torch.float64 (3, 4)"
    assert error_of(update, logits[0]) == "logits must be fp32 [N, n_vocab], got torch.float32 (4,)"
    assert error_of(update, torch.zeros(4, 3).t()) == "logits need unit stride along the vocabulary"
    assert error_of(update, torch.zeros(2, 4).t()) == "logits need unit stride along the vocabulary"  # 2 classes
    assert update(torch.zeros(3, 4).t()[:, :1]).tolist() == [0, 0, 0, 0]  # one class: any stride
    assert error_of(update, torch.zeros(3, 0)) == "logits need at least one class"


def test_sampling_update_destination_and_noise_messages():
    logits = torch.zeros(3, 4)
    update = su.logits_sample_update
    dst, x_flat = torch.zeros(3, dtype=torch.int64), torch.zeros(10, dtype=torch.int64)
    both = "pass both dst and x_flat (to write into x) or neither"
    assert error_of(update, logits, dst=dst) == both
    assert error_of(update, logits, x_flat=x_flat) == both
    assert error_of(update, logits, dst=dst.int(), x_flat=x_flat) == "dst must be int64 [N=3], got torch.int32 (3,)"
    assert error_of(update, logits, dst=dst[:2], x_flat=x_flat) == "dst must be int64 [N=3], got torch.int64 (2,)"
    flat = "x_flat must be a contiguous 1-D int64 tensor, got"
    assert error_of(update, logits, dst=dst, x_flat=x_flat.int()) == f"{flat} torch.int32 (10,)"
    assert error_of(update, logits, dst=dst, x_flat=x_flat.view(2, 5)) == f"{flat} torch.int64 (2, 5)"
    assert error_of(update, logits, dst=dst, x_flat=x_flat[::2]) == f"{flat} torch.int64 (5,)"
    devices = "dst, x_flat and the inputs must share a device"
    assert error_of(update, logits, dst=dst.to("meta"), x_flat=x_flat) == devices
    assert error_of(update, logits, dst=dst, x_flat=x_flat.to("meta")) == devices
    assert error_of(update, logits, dst=torch.zeros(6, dtype=torch.int64)[::2], x_flat=x_flat) == "dst must be contiguous"
    noise = torch.zeros(3, 4)
    assert error_of(update, logits, noise=noise[:2]) == "noise must be [N=3, n_vocab=4], got (2, 4)"
    assert error_of(update, logits, noise=noise, fp64=True) == "noise must be torch.float64 (fp64=True), got torch.float32"
    assert error_of(update, logits, noise=noise.double()) == "noise must be torch.float32 (fp64=False), got torch.float64"
    assert error_of(update, logits, noise=noise.to("meta")) == "noise on meta, inputs on cpu"
    assert error_of(update, logits, noise=torch.zeros(4, 3).t()) == "noise needs unit stride along the vocabulary"
    assert error_of(update, torch.zeros(3, 2), noise=torch.zeros(2, 3).t()) == (
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


# -------- the fallbacks where Triton cannot run (the interpreter off), against the kernels
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


# -------- noise keyed per row (noise_ids): the sampler's, independent of a row's place in the launch
@pytest.mark.parametrize("path", ["kernel", "fallback"])
@pytest.mark.parametrize("fp64", [False, True])
def test_keyed_noise_is_philox_keyed_gumbel_of_each_rows_id(monkeypatch, path, fp64):
    """gumbel_noise(noise_ids=...) is radd_fast.philox.keyed_gumbel (the kernel's Philox bits; the log
    rounds in its own library, within an ulp), ids past 2^32 included."""
    from radd_fast.philox import keyed_gumbel

    take_path(monkeypatch, su, path)
    ids = torch.tensor([0, 5, 2**33 + 7, 12345678901, 5], dtype=torch.int64)
    dtype = torch.float64 if fp64 else torch.float32
    noise = su.gumbel_noise(5, 300, seed=2**40 + 3, device="cpu", fp64=fp64, noise_ids=ids)
    want = keyed_gumbel(2**40 + 3, ids, 300, dtype)
    assert noise.dtype == dtype and torch.allclose(noise, want, rtol=0, atol=4 * torch.finfo(dtype).eps * 20)
    assert torch.equal(noise[1], noise[4]) and not torch.equal(noise[0], noise[1])  # the same id, the same row
    assert ks_gumbel(su.gumbel_noise(64, 300, seed=1, device="cpu", fp64=fp64, noise_ids=torch.arange(64))) \
        < ks_critical(64 * 300)


@pytest.mark.parametrize("path", ["kernel", "fallback"])
@pytest.mark.parametrize("fp64", [False, True])
def test_keyed_rows_draw_the_same_token_wherever_they_sit(monkeypatch, path, fp64):
    """With noise_ids, shuffling the rows of a launch shuffles the tokens and nothing else (both samplers),
    and the tokens are argmax(logits + the keyed noise)."""
    take_path(monkeypatch, su, path)
    g = torch.Generator().manual_seed(4)
    N, d, V = 37, 16, 40
    h, w, b = torch.randn(N, d, generator=g), torch.randn(V + 1, d, generator=g), torch.randn(V + 1, generator=g)
    logits = h @ w[:V].t() + b[:V]
    ids = torch.randint(0, 2**40, (N,), generator=g)
    perm = torch.randperm(N, generator=g)
    noise = su.gumbel_noise(N, V, seed=9, device="cpu", fp64=fp64, noise_ids=ids)
    expected = (logits.to(noise.dtype) + noise).argmax(-1)
    tok = su.logits_sample_update(logits, seed=9, fp64=fp64, noise_ids=ids)
    assert torch.equal(tok, expected)
    assert torch.equal(su.logits_sample_update(logits[perm], seed=9, fp64=fp64, noise_ids=ids[perm]), tok[perm])
    head = su.head_sample_update(h, w, b, V, seed=9, fp64=fp64, noise_ids=ids)
    assert (head == expected).float().mean() > 0.95  # the head's fp32 logits round apart at near-ties only
    assert torch.equal(su.head_sample_update(h[perm], w, b, V, seed=9, fp64=fp64, noise_ids=ids[perm]), head[perm])
    x = torch.zeros(2 * N, dtype=torch.int64)
    dst = torch.arange(N) * 2
    su.head_sample_update(h, w, b, V, dst, x, seed=9, fp64=fp64, noise_ids=ids)
    assert torch.equal(x[dst], head)


def test_keyed_noise_messages():
    ids = torch.arange(3)
    logits = torch.zeros(3, 5)
    assert "noise_ids must be a contiguous int64 [N=3]" in error_of(su.logits_sample_update, logits,
                                                                     noise_ids=ids.int())
    assert "pass explicit noise or noise_ids, not both" in error_of(su.logits_sample_update, logits,
                                                                    noise=torch.zeros(3, 5), noise_ids=ids)
