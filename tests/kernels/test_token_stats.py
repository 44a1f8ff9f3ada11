"""The one-pass token statistics kernel (radd_fast/kernels/token_stats.py) against its PyTorch reference:
awkward shapes, exact tokens for the same key (row offsets or noise ids), poisoned outputs and partial
tables, the entropy against float64 closed forms, the draw's frequencies against the softmax, vocabulary
splits (one of them empty), row chunks, the launcher's one-line refusals and the fallback without Triton."""
import math

import pytest
import torch

from radd_fast.kernels import sampling_update as su
from radd_fast.kernels import token_stats as ts
from radd_fast.kernels.sampling_update import HeadConfig, gumbel_noise, head_sample_update
from radd_fast.kernels.token_stats import TokenStats, logits_token_stats_ref, token_stats, token_stats_ref
from radd_fast.kernels.utils import triton_runs_on
from tests.support.compare import assert_close, poison_like
from tests.support.kernel_paths import with_interpreter
from tests.support.messages import error_of
from tests.support.stats import ALPHA, two_sample_chi2


@pytest.fixture
def _needs_triton(device):
    if not triton_runs_on(torch.empty(0, device=device)):
        pytest.skip("Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")


def _head(N, d, V, device, seed=0, scale=1.0):
    """fp32 rows h [N, d], classes W [V, d], b [V] (V real tokens: the MASK row already left out)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) * (scale / math.sqrt(d))
    b = torch.randn(V, generator=g) * 0.5
    return h.to(device), w.to(device), b.to(device)


def _integer_head(N, d, V, device, seed=0):
    """Small integers: every logit is exact in fp32 whatever the summation order, so the kernel's
    scores are the reference's bit for bit and the tokens must be equal, not merely close."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-2, 3, (N, d), generator=g).float()
    w = torch.randint(-1, 2, (V, d), generator=g).float()
    b = torch.randint(-3, 4, (V,), generator=g).float()
    return h.to(device), w.to(device), b.to(device)


def _near_tie(logits: torch.Tensor, noise: torch.Tensor, tol: float) -> torch.Tensor:
    top2 = (logits.double() + noise.double()).topk(min(2, logits.shape[1]), dim=-1).values
    return (top2[:, 0] - top2[:, -1]) < tol if top2.shape[1] == 2 else torch.zeros_like(top2[:, 0], dtype=torch.bool)


def _assert_matches(got: TokenStats, ref: TokenStats, name: str = "") -> None:
    assert got.tokens.dtype == torch.int64 and got.log_prob.dtype == got.entropy.dtype == torch.float32, name
    assert torch.equal(got.tokens, ref.tokens), f"{name}: {int((got.tokens != ref.tokens).sum())} tokens differ"
    assert_close(got.log_prob, ref.log_prob, atol=1e-5, rtol=1e-5, name=f"{name} log_prob")
    assert_close(got.entropy, ref.entropy, atol=1e-5, rtol=1e-5, name=f"{name} entropy")


# (N, d, V-1): one row, primes, d not a power of two, V-1 not a multiple of any tile
SHAPES = [(1, 32, 9), (17, 48, 131), (70, 20, 257), (33, 100, 17), (129, 37, 300)]


@pytest.mark.usefixtures("_needs_triton")
@pytest.mark.parametrize("N,d,V", SHAPES)
@pytest.mark.parametrize("fp64", [False, True])
def test_token_stats_equal_the_reference_for_the_same_key(device, N, d, V, fp64):
    """Exact logits (small integers): the same tokens exactly, log-prob and entropy to 1e-5."""
    h, w, b = _integer_head(N, d, V, device, seed=N + d + V)
    got = token_stats(h, w, b, key=V, fp64=fp64)
    _assert_matches(got, token_stats_ref(h, w, b, key=V, fp64=fp64), f"{(N, d, V)} fp64={fp64}")


@pytest.mark.usefixtures("_needs_triton")
@pytest.mark.parametrize("N,d,V", SHAPES)
def test_token_stats_on_random_fp32_rows_match_the_float64_reference(device, N, d, V):
    """Random fp32 rows: log-prob and entropy to 1e-5 relative; tokens equal away from near-ties of the scores."""
    h, w, b = _head(N, d, V, device, seed=N * V, scale=3.0)
    got = token_stats(h, w, b, key=11)
    ref = token_stats_ref(h, w, b, key=11)
    logits = h.double() @ w.double().t() + b.double()
    noise = gumbel_noise(N, V, 11, device)
    ok = (got.tokens == ref.tokens) | _near_tie(logits, noise, 1e-4)
    assert bool(ok.all()), f"{int((~ok).sum())} of {N} tokens differ away from ties"
    exact = logits.log_softmax(-1)
    assert_close(got.log_prob, exact.gather(-1, got.tokens[:, None])[:, 0], atol=1e-5, rtol=1e-5, name="log_prob")
    assert_close(got.entropy, -(exact.exp() * exact).sum(-1), atol=1e-5, rtol=1e-5, name="entropy")


@pytest.mark.usefixtures("_needs_triton")
@pytest.mark.parametrize("fp64", [False, True])
def test_tokens_are_the_sampling_heads_for_the_same_key(device, fp64):
    """The same Philox noise and the same Gumbel-max as head_sample_update (which takes the [V, d] head)."""
    N, d, V = 45, 24, 203
    h, w, b = _integer_head(N, d, V, device, seed=3)
    w_head, b_head = torch.cat([w, w[:1]]), torch.cat([b, b[:1]])  # a MASK row the head never draws
    drawn = head_sample_update(h, w_head, b_head, V, seed=12345, fp64=fp64)
    assert torch.equal(token_stats(h, w, b, key=12345, fp64=fp64).tokens, drawn)
    assert not torch.equal(token_stats(h, w, b, key=12346, fp64=fp64).tokens, drawn)


@pytest.mark.usefixtures("_needs_triton")
@pytest.mark.parametrize("config", [HeadConfig(16, 16, 16, 2, 4), HeadConfig(16, 16, 16, 4, 4),
                                    HeadConfig(32, 32, 16, 9, 4)], ids=["2-splits", "empty-split", "clipped"])
def test_vocabulary_splits_merge_to_the_reference(device, config):
    """V-1 = 70 in 16-class tiles: 5 tiles. 2 splits of 3 tiles; 4 splits of 2 tiles, the last one past
    the vocabulary (it sees no class: its partials must not count); 9 splits clipped to 3 tiles."""
    h, w, b = _integer_head(23, 40, 70, device, seed=5)
    for fp64 in (False, True):
        got = token_stats(h, w, b, key=8, fp64=fp64, config=config)
        _assert_matches(got, token_stats_ref(h, w, b, key=8, fp64=fp64), f"{config} fp64={fp64}")


@pytest.mark.usefixtures("_needs_triton")
@pytest.mark.parametrize("config", [None, HeadConfig(16, 16, 16, 2, 4), HeadConfig(16, 16, 16, 5, 4)],
                         ids=["one-split", "2-splits", "5-splits"])
def test_ties_resolve_to_the_lowest_class(device, config):
    """Logits that cancel the key's noise exactly (h one-hot, W's column = -noise): every score is 0,
    and the token is class 0 as torch.argmax's, across tiles and across splits."""
    N, d, V = 3, 16, 70
    noise = gumbel_noise(N, V, 31, device)
    w = torch.zeros(V, d, device=device)
    w[:, :N] = -noise.t()
    h = torch.eye(N, d, device=device)
    got = token_stats(h, w, torch.zeros(V, device=device), key=31, config=config)
    assert got.tokens.tolist() == [0] * N
    assert_close(got.log_prob, (-noise.double()).log_softmax(-1)[:, 0], name="log_prob")


@pytest.mark.usefixtures("_needs_triton")
def test_every_output_and_partial_is_written(device, monkeypatch):
    """Every buffer the launcher allocates starts poisoned (NaN, int max): an unwritten row or partial fails."""
    made = []

    def poisoned(shape, dtype, device_):
        t = poison_like(torch.empty(shape, dtype=dtype, device=device_))
        made.append(t)
        return t

    monkeypatch.setattr(ts, "_new", poisoned)
    h, w, b = _integer_head(37, 33, 61, device, seed=9)
    got = token_stats(h, w, b, key=2, config=HeadConfig(16, 16, 16, 3, 4))
    _assert_matches(got, token_stats_ref(h, w, b, key=2), "poisoned")
    assert len(made) == 9  # 3 outputs, 6 partial tables (V-1 = 61: 4 tiles, the third split sees none)
    floats, ints = [t for t in made[3:] if t.is_floating_point()], [t for t in made[3:] if not t.is_floating_point()]
    assert len(floats) == 5 and not any(bool(t.isnan().any()) for t in floats)
    assert len(ints) == 1 and bool((ints[0] != torch.iinfo(torch.int32).max).all())


@pytest.mark.usefixtures("_needs_triton")
def test_row_chunks_slice_the_rows_and_their_keys(device, monkeypatch):
    """Launches of more than 2^31 noise offsets split the rows with derived keys (row_chunks); the
    reference's materialised noise follows the same chunks, so the draws agree chunk by chunk."""
    def chunks(n_rows, n_vocab, seed):
        return [(0, 5, su.mix64(seed)), (5, 21, su.mix64(seed + 1)), (21, n_rows, su.mix64(seed + 2))]

    monkeypatch.setattr(su, "row_chunks", chunks)
    monkeypatch.setattr(ts, "row_chunks", chunks)
    h, w, b = _integer_head(40, 16, 29, device, seed=4)
    got = token_stats(h, w, b, key=77)
    _assert_matches(got, token_stats_ref(h, w, b, key=77), "chunked")
    whole = token_stats_ref(h, w, b, key=77, noise=gumbel_noise(40, 29, 77, device))
    monkeypatch.undo()
    assert torch.equal(whole.tokens, got.tokens)
    assert not torch.equal(token_stats(h, w, b, key=77).tokens, got.tokens)  # one launch, other keys


# ---------------------------------------------------------------- noise keyed by row ids
@pytest.mark.usefixtures("_needs_triton")
@pytest.mark.parametrize("fp64", [False, True])
def test_keyed_rows_equal_the_reference_and_the_sampling_head(device, fp64):
    """noise_ids: row i's noise keyed by (key, ids[i]); the same tokens as the reference and as
    head_sample_update with the same ids, other tokens than the row-offset noise."""
    N, d, V = 37, 24, 131
    h, w, b = _integer_head(N, d, V, device, seed=6)
    ids = torch.randint(0, 2**40, (N,), generator=torch.Generator().manual_seed(1)).to(device)
    for config in (None, HeadConfig(16, 16, 16, 3, 4)):
        got = token_stats(h, w, b, key=99, fp64=fp64, noise_ids=ids, config=config)
        _assert_matches(got, token_stats_ref(h, w, b, key=99, fp64=fp64, noise_ids=ids), f"keyed {config}")
    w_head, b_head = torch.cat([w, w[:1]]), torch.cat([b, b[:1]])
    assert torch.equal(got.tokens, head_sample_update(h, w_head, b_head, V, seed=99, fp64=fp64, noise_ids=ids))
    assert not torch.equal(got.tokens, token_stats(h, w, b, key=99, fp64=fp64).tokens)


@pytest.mark.usefixtures("_needs_triton")
def test_a_keyed_rows_draw_does_not_depend_on_its_batch(device):
    """Shuffle the rows with their ids, drop some: every row keeps its token, log-prob and entropy."""
    N, d, V = 50, 16, 97
    h, w, b = _integer_head(N, d, V, device, seed=8)
    ids = (torch.arange(N) * 1024 + 7).to(device)
    whole = token_stats(h, w, b, key=5, noise_ids=ids)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(2))[:29].to(device)
    part = token_stats(h[order], w, b, key=5, noise_ids=ids[order])
    assert torch.equal(part.tokens, whole.tokens[order])
    assert torch.equal(part.log_prob, whole.log_prob[order]) and torch.equal(part.entropy, whole.entropy[order])


def test_keyed_fallback_draws_the_kernels_tokens(no_triton):
    """Without Triton the keyed noise is radd_fast.philox's, the kernel's bits: the same tokens, the
    statistics to fp32 rounding."""
    h, w, b = _head(21, 12, 40, "cpu", seed=4, scale=2.0)
    ids = torch.arange(21) * 3 + 2**33
    for fp64 in (False, True):
        fallback = token_stats(h, w, b, key=17, fp64=fp64, noise_ids=ids)
        kernel = with_interpreter(no_triton, lambda: token_stats(h, w, b, key=17, fp64=fp64, noise_ids=ids))
        assert torch.equal(fallback.tokens, kernel.tokens), fp64
        assert_close(kernel.log_prob, fallback.log_prob, atol=1e-5, rtol=1e-5, name="log_prob")
        assert_close(kernel.entropy, fallback.entropy, atol=1e-5, rtol=1e-5, name="entropy")


# ---------------------------------------------------------------- entropy against closed forms
def _entropy_f64(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.double().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.usefixtures("_needs_triton")
@pytest.mark.parametrize("V", [1, 2, 97, 300])
def test_uniform_logits_have_entropy_log_v(device, V):
    """h = 0: every logit is the bias; a constant bias is uniform: H = log(V-1), log p = -log(V-1)."""
    h, w = torch.zeros(5, 24, device=device), torch.randn(V, 24, device=device)
    got = token_stats(h, w, torch.full((V,), 1.5, device=device), key=1)
    assert_close(got.entropy, torch.full((5,), math.log(V)), atol=1e-6, rtol=1e-6, name="entropy")
    assert_close(got.log_prob, torch.full((5,), -math.log(V)), atol=1e-6, rtol=1e-6, name="log_prob")


@pytest.mark.usefixtures("_needs_triton")
@pytest.mark.parametrize("margin", [20.0, 60.0, 200.0])
def test_one_hot_ish_logits_have_entropy_near_zero(device, margin):
    """One class ``margin`` above 299 others (in the middle of a tile): H ~ 299 e^-margin (margin + 1),
    never negative, and that class drawn with log p ~ 0."""
    V = 300
    b = torch.zeros(V)
    b[150] = margin
    h, w = torch.zeros(4, 16, device=device), torch.zeros(V, 16, device=device)
    got = token_stats(h, w, b.to(device), key=3)
    expected = _entropy_f64(b[None].expand(4, V))
    assert bool((got.entropy >= 0).all()) and got.tokens.tolist() == [150] * 4
    assert_close(got.entropy, expected, atol=1e-7, rtol=1e-2, name="entropy")
    assert bool((got.log_prob <= 0).all()) and float(got.log_prob.min()) > -1e-6


@pytest.mark.usefixtures("_needs_triton")
def test_entropy_of_two_level_logits(device):
    """k classes at logit a, V-1-k at 0: H = log Z - k a e^a / Z with Z = k e^a + (V-1-k), in float64;
    rows of several (k, a), the high classes scattered over the tiles."""
    V, cases = 257, [(1, 3.0), (5, 2.0), (40, -1.5), (256, 0.7), (128, 9.0)]
    logits = torch.zeros(len(cases), V, dtype=torch.float64)
    expected = []
    for row, (k, a) in enumerate(cases):
        logits[row, torch.randperm(V, generator=torch.Generator().manual_seed(row))[:k]] = a
        Z = k * math.exp(a) + (V - k)
        expected.append(math.log(Z) - k * a * math.exp(a) / Z)
    # logits = h W^T + b with h = one-hot row ids, W^T = the logits table
    h = torch.eye(len(cases), 8, device=device)
    w = torch.zeros(V, 8, dtype=torch.float64)
    w[:, :len(cases)] = logits.t()
    got = token_stats(h, w.float().to(device), torch.zeros(V, device=device), key=4)
    assert_close(got.entropy, torch.tensor(expected), atol=1e-6, rtol=1e-5, name="entropy")
    assert_close(got.entropy, _entropy_f64(logits), atol=1e-6, rtol=1e-5, name="entropy vs log_softmax")


# ---------------------------------------------------------------- the draw is the softmax's
@pytest.mark.usefixtures("_needs_triton")
def test_gumbel_max_token_frequencies_follow_the_softmax(device):
    """8192 identical rows (each its own noise): token counts against softmax x n (chi-square), and
    every row's log-prob is the log-softmax of its token."""
    n, table = 8192, torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 1.5])
    h = torch.ones(n, 16, device=device)
    w, b = torch.zeros(len(table), 16, device=device), table.to(device)
    got = token_stats(h, w, b, key=21)
    probs = torch.softmax(table.double(), -1)
    _, _, p = two_sample_chi2(torch.bincount(got.tokens.cpu(), minlength=len(table)), (probs * n).round().long())
    assert p > ALPHA
    assert_close(got.log_prob, probs.log()[got.tokens.cpu()].float(), atol=1e-6, rtol=1e-6, name="log_prob")
    assert_close(got.entropy, _entropy_f64(table[None]).expand(n).float(), atol=1e-6, rtol=1e-6, name="entropy")


# ---------------------------------------------------------------- references
def test_logits_reference_handles_filtered_logits():
    """-inf logits (a top-k / top-p filter) are never drawn and count 0 log 0 = 0 in the entropy."""
    logits = torch.tensor([[1.0, float("-inf"), 1.0, float("-inf")], [0.0, 5.0, float("-inf"), 2.0]])
    noise = torch.tensor([[0.0, 9.0, 0.5, 9.0], [0.0, 0.0, 99.0, 0.0]])
    got = logits_token_stats_ref(logits, noise)
    assert got.tokens.tolist() == [2, 1]
    assert_close(got.entropy, torch.tensor([math.log(2), float(_entropy_f64(torch.tensor([[0.0, 5.0, 2.0]]))[0])]))
    assert_close(got.log_prob, torch.tensor([-math.log(2), float(torch.tensor([0.0, 5.0, 2.0]).log_softmax(-1)[1])]))


def test_reference_adds_the_noise_in_fp64_when_asked():
    """1 + 1e-12 rounds to 1 in fp32 (a tie: the first class wins) but not in fp64."""
    tie = torch.tensor([[0.0, 1e-12]], dtype=torch.float64)
    assert logits_token_stats_ref(torch.ones(1, 2), tie).tokens.tolist() == [0]
    assert logits_token_stats_ref(torch.ones(1, 2), tie, fp64=True).tokens.tolist() == [1]


def test_reference_noise_is_the_materialised_noise_of_the_key(device):
    h, w, b = _head(6, 8, 19, device, seed=1)
    for fp64 in (False, True):
        noise = gumbel_noise(6, 19, 42, device, fp64)
        assert torch.equal(token_stats_ref(h, w, b, key=42, fp64=fp64).tokens,
                           token_stats_ref(h, w, b, fp64=fp64, noise=noise).tokens)


# ---------------------------------------------------------------- launcher
def test_launcher_refuses_with_one_line_each():
    h, w, b = torch.randn(3, 16), torch.randn(5, 16), torch.randn(5)
    dtypes = ts.SUPPORTED_DTYPES
    assert error_of(token_stats, h, w, b, strategy="top_k") == (
        "token_stats: strategy 'top_k' cannot be applied in one pass (its kept set needs the whole sorted "
        "distribution; only ('direct',) can): draw from its filtered logits with logits_token_stats_ref")
    assert "'top_p' cannot be applied in one pass" in error_of(token_stats, h, w, b, strategy="top_p")
    assert error_of(token_stats, h[0], w, b) == "token_stats: h must be [N, d] and weight [V-1, d], got (16,), (5, 16)"
    assert error_of(token_stats, h[:, :8], w, b) == "token_stats: h [N, d=8] and weight [V-1, d=16] disagree on d"
    assert error_of(token_stats, h[:, :0], w[:, :0], b) == "token_stats: weight needs a class and d >= 1, got (5, 0)"
    assert error_of(token_stats, h, w[:0], b[:0]) == "token_stats: weight needs a class and d >= 1, got (0, 16)"
    assert error_of(token_stats, h, w, b[:4]) == "token_stats: bias must be [V-1=5], got (4,)"
    assert error_of(token_stats, h.half(), w, b) == (
        f"token_stats: h, weight, bias must share one of {dtypes}, got torch.float16, torch.float32, torch.float32; "
        "cast explicitly")
    assert error_of(token_stats, h.double(), w.double(), b.double()).startswith(
        f"token_stats: h, weight, bias must share one of {dtypes}, got torch.float64")
    assert error_of(token_stats, h, w.to("meta"), b) == "token_stats: h, weight, bias on different devices"
    stride = "token_stats: h and weight need unit stride along d, bias unit stride"
    assert error_of(token_stats, torch.randn(16, 3).t(), w, b) == stride
    assert error_of(token_stats, h, torch.randn(16, 5).t(), b) == stride
    assert error_of(token_stats, h, w, torch.randn(10)[::2]) == stride
    ids = torch.arange(3)
    assert error_of(token_stats, h, w, b, noise_ids=ids.int()) == (
        "token_stats: noise_ids must be a contiguous int64 [N=3], got torch.int32 (3,)")
    assert error_of(token_stats, h, w, b, noise_ids=ids[:2]) == (
        "token_stats: noise_ids must be a contiguous int64 [N=3], got torch.int64 (2,)")
    assert error_of(token_stats, h, w, b, noise_ids=torch.arange(6)[::2]) == (
        "token_stats: noise_ids must be a contiguous int64 [N=3], got torch.int64 (3,)")
    assert error_of(token_stats, h, w, b, noise_ids=ids.to("meta")) == "token_stats: noise_ids on meta, h on cpu"
    assert error_of(token_stats, h, w, b, config=HeadConfig(16, 24, 16, 1, 4)) == (
        "token_stats: config tiles must be powers of two >= 16 (tl.dot), got "
        "HeadConfig(block_n=16, block_v=24, block_d=16, splits=1, num_warps=4, num_stages=3)")
    assert error_of(token_stats, h, w, b, config=HeadConfig(16, 16, 16, 0, 4)) == (
        "token_stats: config.splits must be >= 1, got 0")


@pytest.mark.usefixtures("_needs_triton")
def test_empty_batches_give_empty_outputs(device):
    got = token_stats(torch.zeros(0, 16, device=device), torch.randn(5, 16, device=device),
                      torch.randn(5, device=device))
    assert [tuple(t.shape) for t in got] == [(0,), (0,), (0,)]
    assert [t.dtype for t in got] == [torch.int64, torch.float32, torch.float32]


def test_finalize_blocks():
    """At most 2048 partials a program (six tables), at most 64 rows, both powers of two and at least 2."""
    cases = {(1, 1): (2, 2), (3, 1): (4, 2), (100, 197): (8, 256), (128, 99): (16, 128), (1000, 512): (4, 512),
             (1000, 4096): (2, 4096), (1000, 2): (64, 2), (5, 3): (8, 4)}
    assert {key: ts.finalize_blocks(*key) for key in cases} == cases


def test_interpreter_tiles():
    cpu = torch.device("cpu")
    assert ts._config(5, 20, 17, False, torch.float32, cpu) == HeadConfig(16, 32, 32, 1, 4)
    assert ts._config(300, 768, 50257, True, torch.float32, cpu) == HeadConfig(128, 128, 64, 1, 4)


# ---------------------------------------------------------------- without Triton
def test_fallback_is_the_reference_with_the_keys_fallback_noise(no_triton):
    """The interpreter off: the reference, its noise ``gumbel_noise``'s fallback (a torch generator keyed by the key)."""
    h, w, b = _head(30, 12, 23, "cpu", seed=2)
    for fp64 in (False, True):
        got = token_stats(h, w, b, key=9, fp64=fp64)
        noise = su.gumbel_ref((30, 23), torch.float64 if fp64 else torch.float32, "cpu",
                              torch.Generator().manual_seed(9))
        ref = token_stats_ref(h, w, b, fp64=fp64, noise=noise)
        assert all(torch.equal(a, e) for a, e in zip(got, ref)), fp64
    empty = token_stats(torch.zeros(0, 12), w, b)
    assert [tuple(t.shape) for t in empty] == [(0,), (0,), (0,)]
    assert "cannot be applied in one pass" in error_of(token_stats, h, w, b, strategy="top_p")
