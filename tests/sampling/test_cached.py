"""The approximate sampler (refresh_every): exact where it must be, counts in closed form, labelled; fresh
noise for every token across waves, splits and cached evaluations (the recorded keys, and the tokens
of consecutive waves on a uniform head)."""

import numpy as np
import pytest
import torch

from radd_fast import GeometricNoise, LogLinearNoise
from radd_fast.acceleration import Acceleration
from radd_fast.model.head import RevealSampler
from radd_fast.model.kv_cache import KVCache
from radd_fast.sampling import SamplerConfig, engine, evaluator, generate
from radd_fast.sampling.batching import plan_ticks
from radd_fast.sampling.cached import CachedWave, _sub_batch, assign_slots
from radd_fast.sync_counter import SyncCounter
from tests.support.compare import assert_close
from tests.support.graphs import EmulatedGraph
from tests.support.models import normal_head_model, random_head_model
from tests.support.noise_streams import assert_fresh_noise, record_noise
from tests.support.sync_budgets import ENGINE_SYNCS_AT_END, ENGINE_SYNCS_PER_WAVE
from tests.support.uniform_head import LENGTH as UNIFORM_LENGTH
from tests.support.uniform_head import SAMPLES, assert_iid_uniform, assert_independent_pairs, uniform_model

# -- R = 1 is the exact engine ------------------------------------------------------------------------
EXACT_CASES = {
    "direct": dict(use_kernels=False),
    "top_k": dict(use_kernels=False, strategy="top_k", strategy_para=3),
    "no-pruning": dict(use_kernels=False, prune_last_block=False),
    "no-buckets-waves": dict(use_kernels=False, buckets=False, wave_size=7),
    "ordered": dict(use_kernels=False, method="ordered"),
    "kernel": dict(use_kernels=True),
    # away from the defaults: another method, noise and strategy, one step, few ordered steps
    "euler-geometric-top_p": dict(use_kernels=False, method="euler", strategy="top_p", strategy_para=0.8,
                                  noise=GeometricNoise(1e-2, 4.0)),
    "tweedie-1-step-kernel": dict(use_kernels=True, steps=1, noise=LogLinearNoise(0.1)),
    "ordered-3-steps-top_k": dict(use_kernels=False, method="ordered", steps=3, strategy="top_k", strategy_para=2),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_refresh_every_one_is_the_exact_engine_bit_for_bit(case):
    options = dict(EXACT_CASES[case])
    noise = options.pop("noise", LogLinearNoise())
    if options.get("use_kernels"):
        pytest.importorskip("triton")
    model = normal_head_model(n_blocks=2, length=10)
    cfg = SamplerConfig(**{"steps": 7, "rows_in_flight": 4, **options})
    n = 6 if options.get("use_kernels") else 18  # the kernels run in the Triton interpreter on CPU
    exact, s_exact = generate(model, noise, n, config=cfg, conditioning={2: 5}, seed=5, progress=False)
    one, s_one = generate(model, noise, n, config=cfg.replace(refresh_every=1), conditioning={2: 5},
                          seed=5, progress=False)
    assert torch.equal(exact, one) and torch.equal(s_exact.enfe, s_one.enfe)
    assert (s_one.head_rows, s_one.head_rows_padded, s_one.eval_rows, s_one.eval_rows_padded) == \
        (s_exact.head_rows, s_exact.head_rows_padded, s_exact.eval_rows, s_exact.eval_rows_padded)
    assert s_one.body_token_rows == s_one.body_token_rows_exact == s_exact.body_token_rows == s_exact.eval_rows * 10


# -- the cached evaluation in the engine -------------------------------------------------------------
ONE_BLOCK_CASES = {  # name: (noise, generate options)
    "tweedie-R3": (LogLinearNoise(), dict(steps=9, refresh_every=3, conditioning={4: 2})),
    "euler-geometric-top_k-R2": (GeometricNoise(1e-2, 4.0), dict(steps=5, refresh_every=2, method="euler",
                                                                 strategy="top_k", strategy_para=3,
                                                                 conditioning={0: 1, 10: 3})),
    "ordered-R4": (None, dict(steps=11, refresh_every=4, method="ordered", conditioning={4: 2})),
}


@pytest.mark.parametrize("case", list(ONE_BLOCK_CASES))
def test_engine_cached_evaluations_see_the_exact_rows_on_a_one_block_model(monkeypatch, case):
    """End to end (slots, pushed groups, padding, waves): every hidden row the head gets equals
    model.hidden of the current tokens, since one-block caching is exact; at the defaults and at another
    method, noise, strategy, refresh period and conditioning."""
    noise, options = ONE_BLOCK_CASES[case]
    model = random_head_model(tokens=8, length=11)
    original = RevealSampler.sample_at
    checked = []

    def checking(self, h_rows, dst, x_flat, strategy, key, noise_ids):
        real = dst < x_flat.numel() - 1  # padded head rows write to the trash cell
        want = model.hidden(x_flat[:-1].view(-1, 11)).reshape(-1, h_rows.shape[1]).index_select(0, dst[real])
        assert_close(h_rows[real], want, atol=1e-5, rtol=1e-5, name="head rows")
        checked.append(int(real.sum()))
        return original(self, h_rows, dst, x_flat, strategy, key, noise_ids)

    monkeypatch.setattr(RevealSampler, "sample_at", checking)
    _, stats = generate(model, noise, 13, rows_in_flight=4, wave_size=6, use_kernels=False, seed=1, progress=False,
                        **options)
    assert sum(checked) == stats.head_rows == 13 * (11 - len(options["conditioning"]))
    assert stats.body_token_rows < stats.body_token_rows_exact


# -- counts ---------------------------------------------------------------------------------------------------
def _closed_form(group: np.ndarray, K: np.ndarray, R: int, L: int) -> int:
    """Sum over rows and evaluations k: L when k % R == 0, else the positions in groups k0 .. k."""
    total = 0
    for g, n_eval in zip(group, K):
        for k in range(n_eval):
            k0 = k - k % R
            total += L if k % R == 0 else int(((g >= k0) & (g <= k)).sum())
    return total


@pytest.mark.parametrize("R,rows_in_flight", [(2, 1), (3, 2), (4, 3), (1, 2)])
def test_body_token_rows_closed_form_on_a_hand_made_plan(R, rows_in_flight):
    group = np.array([[0, 1, 1, 2, 3, 3, -1, 4],
                      [0, 0, 0, 0, 0, 0, -1, 0],
                      [2, 1, 0, 3, 4, 5, -1, 6],
                      [1, 0, 1, 0, 1, 0, -1, 1]], dtype=np.int32)
    K = group.max(axis=1) + 1  # [5, 1, 7, 2]
    L = group.shape[1]
    x0 = torch.where(torch.from_numpy(group) >= 0, 7, 3)  # 7 = MASK where free, a fixed token elsewhere
    model = random_head_model(tokens=7, length=L)
    cache = KVCache.allocate(model, rows_in_flight, L)
    wave = CachedWave(x0, torch.from_numpy(group), torch.from_numpy(K), rows_in_flight, True, R, cache)
    assert wave.body_token_rows == _closed_form(group, K, R, L)
    assert wave.body_token_rows_exact == L * int(K.sum()) and wave.eval_rows == int(K.sum())
    assert wave.body_token_rows_padded >= wave.body_token_rows
    assert int(wave.head_n.sum()) == int((group >= 0).sum())
    evals_full = sum(-(-int(k) // R) for k in K)  # evaluations with k % R == 0
    assert int((wave.full_b > 0).sum()) <= wave.ticks and wave.body_token_rows >= L * evals_full


def test_slots_never_shared_by_two_live_rows():
    rows = np.array([[0, 1], [0, 2], [3, 2], [3, 4]])
    k = np.array([[0, 0], [1, 0], [0, 1], [1, 0]])
    K = np.array([2, 1, 2, 2, 1])
    slot = assign_slots(rows, k, K, n_slots=2, dump=7)
    assert slot[-1] == 7  # the padding row: the dump slot
    for t in range(rows.shape[0]):
        assert len(set(slot[rows[t]].tolist())) == 2


# -- API, labels, syncs ---------------------------------------------------------------------------------------
def test_the_approximate_label_and_stats():
    cfg = SamplerConfig(steps=8, refresh_every=4)
    assert cfg.approximate and "approximate (refresh every 4)" in cfg.describe()
    assert not SamplerConfig().approximate and "approximate" not in SamplerConfig().describe()
    model = random_head_model(tokens=8, length=12)
    _, stats = generate(model, LogLinearNoise(), 6, config=cfg, use_kernels=False, seed=0, progress=False)
    assert stats.refresh_every == 4 and "approximate (refresh every 4)" in stats.summary()
    assert "body token-rows" in stats.summary() and 0 < stats.body_fraction < 1
    record = stats.as_dict()
    assert record["sampler"] == cfg.describe() and record["refresh_every"] == 4
    assert record["body_token_rows_exact"] == stats.eval_rows * 12 == int(stats.enfe.sum()) * 12


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, float("nan"), float("inf"), "4"])
def test_refresh_every_must_be_a_whole_number(bad):
    with pytest.raises(ValueError, match="refresh_every"):
        SamplerConfig(refresh_every=bad)


@pytest.mark.parametrize("R", [3])
def test_syncs_per_wave_stay_fixed(R):
    model = random_head_model(tokens=8, length=12)
    totals = []
    for steps, wave_size in [(2, 8), (12, 8), (12, 4)]:
        cfg = SamplerConfig(steps=steps, rows_in_flight=4, wave_size=wave_size, use_kernels=False, refresh_every=R)
        with SyncCounter() as syncs:
            generate(model, LogLinearNoise(), 8, config=cfg, seed=3, progress=False)
        totals.append(syncs.total)
    assert totals == [ENGINE_SYNCS_PER_WAVE + ENGINE_SYNCS_AT_END, ENGINE_SYNCS_PER_WAVE + ENGINE_SYNCS_AT_END, 2 * ENGINE_SYNCS_PER_WAVE + ENGINE_SYNCS_AT_END]


# -- the wave's plan in detail --------------------------------------------------------------------------------
HAND_GROUP = np.array([[0, 1, 1, 2, 3, 3, -1, 4],
                       [0, 0, 0, 0, 0, 0, -1, 0],
                       [2, 1, 0, 3, 4, 5, -1, 6],
                       [1, 0, 1, 0, 1, 0, -1, 1]], dtype=np.int32)


def _hand_wave(R: int, rows_in_flight: int, buckets: bool = True, cache_length: int | None = None) -> CachedWave:
    group = torch.from_numpy(HAND_GROUP)
    K = group.max(dim=1).values + 1
    L = group.shape[1]
    x0 = torch.where(group >= 0, 7, 3)
    model = random_head_model(tokens=7, length=L)
    cache = KVCache.allocate(model, rows_in_flight, cache_length or L)
    return CachedWave(x0, group, K, rows_in_flight, buckets, R, cache)


def _is_pow2_or_zero(a) -> bool:
    a = np.asarray(a)
    return bool(((a == 0) | ((a & (a - 1)) == 0)).all())


def test_shapes_used_counts_every_tick_exactly():
    wave = _hand_wave(R=2, rows_in_flight=2)
    fills, cached = wave.shapes_used(prune=True)
    expected_fills, expected_cached = {}, {}
    for t in range(wave.ticks):
        if wave.full_b[t]:
            key = (int(wave.full_b[t]), 8, int(wave.full_P[t]))
            expected_fills[key] = expected_fills.get(key, 0) + 1
        if wave.cached_b[t]:
            key = (int(wave.cached_b[t]), int(wave.cached_S[t]))
            expected_cached[key] = expected_cached.get(key, 0) + 1
    assert fills == expected_fills and cached == expected_cached
    assert sum(fills.values()) == int((wave.full_b > 0).sum()) and sum(cached.values()) == int((wave.cached_b > 0).sum())
    unpruned, _ = wave.shapes_used(prune=False)
    assert sum(unpruned.values()) == sum(fills.values()) and all(len(key) == 2 for key in unpruned)


@pytest.mark.parametrize("buckets", [True, False])
def test_padded_shapes_and_counts_add_up(buckets):
    wave = _hand_wave(R=3, rows_in_flight=3, buckets=buckets)
    B = wave.plan.rows.shape[1]
    n_full, n_cached = (wave.full_k >= 0).sum(axis=1), (wave.cached_k >= 0).sum(axis=1)
    assert bool(((wave.full_b > 0) == (n_full > 0)).all()) and bool((wave.full_b >= n_full).all())
    assert bool((wave.cached_b == np.where(n_cached > 0, B, 0)).all())
    assert int(wave.eval_rows_padded) == int(wave.full_b.sum() + wave.cached_b.sum())
    assert bool((wave.head_n == wave.full_N + wave.cached_N).all())
    assert bool((wave.head_p == wave.full_P + wave.cached_P).all())
    assert bool((wave.full_P >= wave.full_N).all()) and bool((wave.cached_P >= wave.cached_N).all())
    if buckets:
        assert _is_pow2_or_zero(wave.full_P) and _is_pow2_or_zero(wave.cached_P)
        assert all(_is_pow2_or_zero(s) or s == 8 for s in wave.cached_S)  # a power of two, at most L
    else:
        assert bool((wave.full_P == wave.full_N).all()) and bool((wave.cached_P == wave.cached_N).all())


def test_ticks_without_full_rows_evaluate_no_full_batch():
    wave = _hand_wave(R=4, rows_in_flight=1)  # one row at a time: most ticks are cached only
    no_full = [t for t in range(wave.ticks) if not (wave.full_k[t] >= 0).any()]
    assert no_full and all(wave.full_b[t] == 0 and wave.full_N[t] == 0 for t in no_full)


@pytest.mark.parametrize("buckets", [True, False])
def test_the_plan_is_the_exact_engines(buckets):
    # 4 rows in flight: the tail has 3 active rows, which buckets pad to 4
    wave = _hand_wave(R=2, rows_in_flight=4, buckets=buckets)
    K = HAND_GROUP.max(axis=1) + 1
    exact = plan_ticks(K, 4, pad_row=4, buckets=buckets)
    assert np.array_equal(wave.plan.batch, exact.batch) and np.array_equal(wave.plan.rows, exact.rows)
    assert (3 in wave.plan.batch.tolist()) is not buckets


def test_a_cache_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError) as err:
        _hand_wave(R=2, rows_in_flight=2, cache_length=9)
    assert str(err.value) == "the cache holds 2 rows of 9 positions; this wave needs 2 of 8"


def test_a_wave_with_nothing_to_reveal():
    x0 = torch.full((2, 5), 3)
    group = torch.full((2, 5), -1, dtype=torch.int32)
    model = random_head_model(tokens=7, length=5)
    wave = CachedWave(x0, group, torch.zeros(2, dtype=torch.int64), 2, True, 2, KVCache.allocate(model, 2, 5))
    assert wave.ticks == 0 and wave.body_token_rows == wave.eval_rows == wave.eval_rows_padded == 0
    assert wave.cached_S.shape == (0,) and wave.shapes_used(True) == ({}, {})


def test_assign_slots_on_a_hand_plan():
    # ticks x places; k = -2 is padding. Row 0 lives at ticks 0-1, row 1 at tick 0, row 2 at ticks 1-2.
    rows = np.array([[0, 1], [0, 2], [5, 2]])
    k = np.array([[0, 0], [1, 0], [-2, 1]])
    K = np.array([2, 1, 2, 0, 0])
    slot = assign_slots(rows, k, K, n_slots=2, dump=9)
    assert slot.tolist() == [0, 1, 1, 9, 9, 9]  # row 2 takes the slot row 1 freed; R + 1 entries, the last the dump


def test_every_evaluation_advances_the_bar_once_and_calls_after():
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    class Body:
        def prepare_cached(self, fills, cached):
            pass

    wave = _hand_wave(R=2, rows_in_flight=2)
    calls = []
    wave.evaluate = lambda t, body, head, strategy, key, first_id, prune: calls.append((t, key, first_id, prune))
    bar, after = Bar(), []
    wave.run(Body(), None, None, key=3, first_id=10, bar=bar, prune=True, after=after.append)
    assert bar.n == wave.ticks == len(calls) and after == list(range(wave.ticks))
    assert [call[1:] for call in calls] == [(3, 10, True)] * wave.ticks  # one key, one first id per wave


def test_emulated_graphs_of_the_cached_sampler_are_all_replayed(monkeypatch):
    monkeypatch.setattr(engine, "resolve_acceleration", lambda device, compile, graphs: Acceleration(False, True))
    monkeypatch.setattr(evaluator, "CapturedGraph", EmulatedGraph)
    monkeypatch.setattr(evaluator, "MIN_TICKS_FOR_GRAPH", 1)
    runners = []
    original = evaluator.BodyRunner.prepare_cached
    monkeypatch.setattr(evaluator.BodyRunner, "prepare_cached",
                        lambda self, fills, cached: runners.append(self) or original(self, fills, cached))
    for prune in (True, False):
        runners.clear()
        generate(normal_head_model(2, 12), LogLinearNoise(), 8, steps=9, rows_in_flight=4, refresh_every=3, use_kernels=False,
                 prune_last_block=prune, seed=2, progress=False)
        replays = {key: g.replays for s in runners[0].graph_sets for key, g in s.graphs.items()}
        assert {key[0] for key in replays} >= {"fill", "cached"} and min(replays.values()) >= 1, replays
        assert all(len(key) == (4 if prune else 3) for key in replays if key[0] == "fill")


def test_sub_batches_keep_plan_order_at_any_width():
    """The full rows of a tick keep their plan order (a stable sort): with many rows in flight an
    unstable sort would reorder them, and with them the head rows and their noise."""
    rng = np.random.default_rng(0)
    take = rng.random((3, 64)) < 0.5
    rows = np.tile(np.arange(64), (3, 1))
    k = np.zeros((3, 64), dtype=np.int64)
    sub_rows, sub_k = _sub_batch(rows, k, take, pad_row=99)
    for t in range(3):
        n = int(take[t].sum())
        assert sub_rows[t, :n].tolist() == np.nonzero(take[t])[0].tolist()
        assert bool((sub_rows[t, n:] == 99).all()) and bool((sub_k[t, n:] == -2).all()) and sub_k.dtype == np.int32


# -- fresh noise across waves, splits and cached evaluations --------------------------------------------------------
NOISE_CASES = {  # name: generate options of the approximate sampler (the keys a head is given do not depend
    "direct": dict(),  # on its backend; the kernels' use of them is the uniform-head test's below)
    "top_k": dict(strategy="top_k", strategy_para=3),
}


@pytest.mark.parametrize("case", list(NOISE_CASES))
def test_no_two_tokens_draw_the_same_noise_across_waves_splits_and_cached_evaluations(monkeypatch, case):
    """Every (key, noise id) the head draws a revealed token with, and every schedule row, is drawn once in a
    run of several waves with cached evaluations, and once over two calls that split the samples as ranks do
    (first_index); the head and the schedule never share a key, and another seed shares none of them."""
    options = dict(NOISE_CASES[case], use_kernels=False)
    model = random_head_model(tokens=8, length=8)
    log = record_noise(monkeypatch, model.mask_id)
    kw = dict(steps=4, refresh_every=2, rows_in_flight=3, wave_size=4, progress=False, **options)
    whole, _ = generate(model, LogLinearNoise(), 10, 8, seed=6, **kw)
    assert_fresh_noise(log, tokens=10 * 8, samples=10, name=f"{case}: one run of three waves")
    pairs = set(log.head)
    log.clear()
    head, _ = generate(model, LogLinearNoise(), 6, 8, seed=6, **kw)
    tail, _ = generate(model, LogLinearNoise(), 4, 8, seed=6, first_index=6, **kw)
    assert_fresh_noise(log, tokens=10 * 8, samples=10, name=f"{case}: samples 0-5 and 6-9 (two ranks)")
    assert set(log.head) == pairs and torch.equal(torch.cat([head, tail]), whole)
    log.clear()
    generate(model, LogLinearNoise(), 10, 8, seed=7, **kw)
    assert not pairs & set(log.head), f"{case}: seeds 6 and 7 share head noise"


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("kernels", [False, True])
def test_consecutive_waves_and_splits_of_the_cached_sampler_are_independent(steps, kernels):
    """On a uniform head the tokens are the noise's argmax: with one or two steps a wave's tokens come from
    one or two head calls, so noise repeated in the next wave (or in the next rank's samples) would pair
    sample i of one with sample i of the other (equal tokens at every position), which the chi-square of
    the pairs against the uniform product, and the no-equal-samples check, would show."""
    if kernels:
        pytest.importorskip("triton")
    model = uniform_model()
    kw = dict(refresh_every=2, rows_in_flight=SAMPLES, use_kernels=kernels, progress=False)  # few head calls
    x, _ = generate(model, LogLinearNoise(), 2 * SAMPLES, UNIFORM_LENGTH, steps, seed=8, wave_size=SAMPLES, **kw)
    assert_iid_uniform(x, f"{steps} steps, kernels={kernels}")
    assert_independent_pairs(x[:SAMPLES], x[SAMPLES:], f"{steps} steps, kernels={kernels}: waves 1 and 2")
    rank_1, _ = generate(model, LogLinearNoise(), SAMPLES, UNIFORM_LENGTH, steps, seed=8, first_index=SAMPLES, **kw)
    rank_0, _ = generate(model, LogLinearNoise(), SAMPLES, UNIFORM_LENGTH, steps, seed=8, **kw)
    assert_independent_pairs(rank_0, rank_1, f"{steps} steps, kernels={kernels}: first_index 0 and {SAMPLES}")
