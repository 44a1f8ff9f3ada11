"""The adaptive decoders' wave (radd_fast/sampling/adaptive.py): rows in flight, static shapes, host syncs.

Rows finish after evaluations nobody planned: the host reads which ones did every
``decoder_check_every`` evaluations (one sync), seats the next rows in their slots and fixes the next
chunk's shapes. Pinned here: the sync count, exactly (a fixed few per wave, one per chunk, none per
evaluation); samples that do not depend on the rows in flight, the waves, the cadence or the split;
the batch shapes (static, power-of-two buckets, full until the queue runs dry); the work counts;
the key/value cache with a decoder (exact where caching is exact, less body work elsewhere); the
streaming of finished rows; the emulated CUDA graphs against the eager run.
"""
from __future__ import annotations

import pytest
import torch

from radd_fast import LogLinearNoise
from radd_fast.acceleration import Acceleration
from radd_fast.sampling import SamplerConfig, engine, evaluator, generate
from radd_fast.sampling.adaptive import DecoderWave
from radd_fast.sampling.decoders import make_decoder
from radd_fast.sync_counter import SyncCounter
from tests.support.graphs import EmulatedGraph
from tests.support.models import normal_head_model, random_head_model
from tests.support.sync_budgets import DECODER_SYNCS_PER_WAVE, ENGINE_SYNCS_AT_END

LENGTH = 12


@pytest.fixture(scope="module")
def model():
    return random_head_model(tokens=8, length=LENGTH)


def run(model, n: int, **options):
    opts = dict(steps=6, decoder="confidence", decoder_para=0.5, rows_in_flight=4, use_kernels=False) | options
    return generate(model, LogLinearNoise(), n, LENGTH, config=SamplerConfig(**opts), seed=5, progress=False)


# ---- host syncs --------------------------------------------------------------------------------------------------
class TestHostSyncs:
    """Per wave: the free counts, then one read per chunk of check_every evaluations, then the counts at the
    end; at the end of the run the no-MASK check (and, with a schedule, the E-NFE theory)."""

    @pytest.mark.parametrize("options", [dict(decoder_para=2.0), dict(decoder_para=0.3),
                                         dict(decoder="entropy_bound", decoder_para=1.0),
                                         dict(decoder="low_confidence", decoder_para=None),
                                         dict(decoder_para=0.3, refresh_every=2),
                                         dict(decoder_para=0.3, strategy="top_k", strategy_para=3)])
    @pytest.mark.parametrize("check_every", [1, 3])
    def test_syncs_are_a_few_per_wave_and_one_per_chunk(self, model, options, check_every):
        with SyncCounter() as syncs:
            _, stats = run(model, 16, wave_size=8, decoder_check_every=check_every, **options)
        chunks, rest = divmod(stats.evaluations, check_every)
        at_end = ENGINE_SYNCS_AT_END if options.get("decoder") == "low_confidence" else 1  # no schedule: no theory
        assert rest == 0 and syncs.total == 2 * DECODER_SYNCS_PER_WAVE + chunks + at_end, dict(syncs.by_op)

    def test_syncs_do_not_grow_with_the_rows_evaluations(self, model):
        """Every position at once (a tiny tau) against one position per evaluation (tau > 1): 12 times the
        row evaluations, the same two chunks of 12, the same syncs."""
        with SyncCounter() as few:
            _, quick = run(model, 8, decoder_para=1e-30, decoder_check_every=LENGTH)
        with SyncCounter() as many:
            _, slow = run(model, 8, decoder_para=2.0, decoder_check_every=LENGTH)
        assert (quick.eval_rows, slow.eval_rows) == (8, 8 * LENGTH) and quick.evaluations == slow.evaluations == 24
        assert few.total == many.total == DECODER_SYNCS_PER_WAVE + 2 + 1


# ---- the same samples however the work is split -------------------------------------------------------------------
SPLIT_CASES = {
    "confidence": dict(),
    "entropy_bound-top_p": dict(decoder="entropy_bound", decoder_para=1.5, strategy="top_p", strategy_para=0.9),
    "low_confidence": dict(decoder="low_confidence", decoder_para=None),
    "confidence-refresh-2": dict(refresh_every=2),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_a_sample_is_the_same_whatever_the_rows_in_flight_waves_cadence_or_split(case):
    """Sample i's candidates are keyed by (seed, i, position, its evaluation): one call of 11 equals calls of
    4 and 7 with other rows in flight, waves, cadences and buckets (a 2-block model: the cache approximates)."""
    model2 = normal_head_model(2, LENGTH)
    opts = dict(steps=5, decoder="confidence", decoder_para=0.4, use_kernels=False) | SPLIT_CASES[case]
    kw = dict(conditioning={3: 2}, seed=8, progress=False)
    whole, s_whole = generate(model2, LogLinearNoise(), 11, LENGTH, config=SamplerConfig(rows_in_flight=4, **opts), **kw)
    head, s_head = generate(model2, LogLinearNoise(), 4, LENGTH,
                            config=SamplerConfig(rows_in_flight=1, decoder_check_every=1, **opts), **kw)
    tail, s_tail = generate(model2, LogLinearNoise(), 7, LENGTH, first_index=4, config=SamplerConfig(
        rows_in_flight=8, wave_size=3, decoder_check_every=5, buckets=False, **opts), **kw)
    assert torch.equal(whole, torch.cat([head, tail])), case
    assert torch.equal(s_whole.enfe, torch.cat([s_head.enfe, s_tail.enfe]))


def test_pruning_the_last_block_changes_no_sample(model):
    a, sa = run(model, 9)
    b, sb = run(model, 9, prune_last_block=False)
    assert torch.equal(a, b) and torch.equal(sa.enfe, sb.enfe)


# ---- shapes and work ----------------------------------------------------------------------------------------------
def test_finished_rows_leave_and_the_batch_keeps_its_static_bucketed_shape(model, monkeypatch):
    """Every body call has a power-of-two batch of at most the rows in flight, full (4) until the queue runs
    dry; the calls are the evaluations; the work counts add up."""
    shapes = []
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda x, **kw: shapes.append(tuple(x.shape)) or hidden(x, **kw))
    tokens, stats = run(model, 30, decoder_check_every=2)
    batches = [b for b, _ in shapes]
    assert len(shapes) == stats.evaluations and set(batches) <= {4, 2, 1} and all(t == LENGTH for _, t in shapes)
    assert batches[:len(batches) // 2] == [4] * (len(batches) // 2)  # refilled: full while rows wait
    assert stats.eval_rows == int(stats.enfe.sum()) and stats.eval_rows_padded == sum(batches) >= stats.eval_rows
    assert stats.body_token_rows == stats.body_token_rows_exact == LENGTH * stats.eval_rows
    assert stats.body_token_rows_padded == LENGTH * stats.eval_rows_padded
    assert stats.tokens_revealed == 30 * LENGTH <= stats.head_rows <= stats.head_rows_padded
    assert stats.head_rows_per_evaluation == stats.head_rows / stats.eval_rows > 1  # every masked position


def test_a_wave_of_fixed_rows_needs_no_evaluation(model):
    init = torch.tensor([[1] * LENGTH, [-1] + [2] * (LENGTH - 1)])
    tokens, stats = generate(model, None, 2, LENGTH, decoder="confidence", conditioning=init, progress=False, seed=0)
    assert stats.enfe.tolist() == [0, 1] and torch.equal(tokens[0], init[0])
    empty = DecoderWave(torch.full((2, 3), 4), None, 2, True, make_decoder("confidence"), 4, mask_id=8)
    assert empty.run(None, None, None, 0, 0, engine.progress_bar(False), True).tolist() == [[4] * 3] * 2
    assert empty.ticks == empty.eval_rows == 0 and empty.K_host.tolist() == [0, 0]


def test_every_evaluation_advances_the_bar_and_calls_after(model):
    class Bar:
        total = n = 0

        def update(self, k):
            self.n += k

        def refresh(self):
            pass

    x0 = torch.full((5, 4), model.mask_id)
    wave = DecoderWave(x0, None, 2, True, make_decoder("confidence", 2.0), 3, model.mask_id)
    body = evaluator.BodyRunner(model, Acceleration(False, False))
    head = model.output_head().sampler(torch.float64, False)
    bar, after = Bar(), []
    out = wave.run(body, head, SamplerConfig().strategy_fn, 1, 0, bar, True, after.append)
    assert bar.n == bar.total == wave.ticks == len(after) and after == list(range(wave.ticks))
    # one position per evaluation: rows 0-1 finish inside chunk 2 and idle to its end, rows 2-3 fill chunks 3-4,
    # row 4 chunks 5-6
    assert wave.ticks == 18 and wave.K_host.tolist() == [4] * 5 and wave.eval_rows == 20
    assert not bool((out == model.mask_id).any()) and wave.leading_rows_done(wave.ticks) == 5


def test_on_rows_hands_over_finished_rows_in_sample_order(model):
    got = []
    tokens, stats = generate(model, None, 13, LENGTH, rows_in_flight=3, wave_size=5, first_index=100, seed=2,
                             decoder="confidence", decoder_para=0.5, decoder_check_every=2, use_kernels=False,
                             progress=False, on_rows=lambda i, t, e: got.append((i, t, e)), on_rows_every=0)
    starts = [i for i, _, _ in got]
    assert starts[0] == 100 and len(got) > 3  # more hand-overs than waves: rows left before their wave ended
    assert all(i + len(t) == j for (i, t, _), j in zip(got, starts[1:] + [113]))
    assert torch.equal(torch.cat([t for _, t, _ in got]), tokens.cpu())
    assert torch.equal(torch.cat([e for _, _, e in got]), stats.enfe)


# ---- with the key/value cache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder,para", [("confidence", 0.3), ("low_confidence", None)])
def test_refresh_every_one_is_the_uncached_decoder_bit_for_bit(decoder, para):
    model2 = normal_head_model(2, LENGTH)
    a, sa = run(model2, 9, decoder=decoder, decoder_para=para)
    b, sb = run(model2, 9, decoder=decoder, decoder_para=para, refresh_every=1)
    assert torch.equal(a, b) and torch.equal(sa.enfe, sb.enfe) and sb.body_fraction == 1.0


def test_the_cached_decoder_is_exact_where_caching_is_and_pushes_what_was_masked_at_the_fill():
    """One block: the unpushed positions' keys and values depend on their own tokens only, so the cached
    decoder draws the uncached one's samples. Work, in closed form: one position per evaluation (tau > 1),
    12 evaluations a row, refresh every 3: full at k = 0, 3, 6, 9 (12 positions each), and the cached ones
    push what was masked at their fill: 12, 12, 9, 9, 6, 6, 3, 3 (108 of 144 token-rows a row)."""
    one = normal_head_model(1, LENGTH)
    a, _ = run(one, 9, decoder_para=0.3)
    b, sb = run(one, 9, decoder_para=0.3, refresh_every=3)
    assert torch.equal(a, b) and sb.body_fraction < 1
    _, sd = run(normal_head_model(2, LENGTH), 9, decoder_para=2.0, refresh_every=3)
    assert sd.enfe.tolist() == [LENGTH] * 9 and sd.body_token_rows_exact == 9 * 144
    assert sd.body_token_rows == 9 * (4 * 12 + 2 * (12 + 9 + 6 + 3)) and sd.body_fraction == 0.75
    assert "approximate (refresh every 3)" in sd.sampler and "approximate (confidence tau=2)" in sd.sampler


def test_a_cache_too_small_for_the_rows_in_flight_is_refused():
    from radd_fast.model.kv_cache import KVCache

    model2 = normal_head_model(2, LENGTH)
    with pytest.raises(ValueError, match="the cache holds 1 rows of 12 positions; this wave needs 3 of 12"):
        DecoderWave(torch.full((3, LENGTH), model2.mask_id), None, 3, True, make_decoder("confidence"), 2,
                    model2.mask_id, KVCache.allocate(model2, 1, LENGTH), 2)


@pytest.mark.parametrize("refresh", [None, 2])
@pytest.mark.parametrize("prune", [True, False])
def test_emulated_graphs_replay_every_shape_and_give_the_eager_samples(monkeypatch, refresh, prune):
    model2 = normal_head_model(2, LENGTH)
    kw = dict(rows_in_flight=4, decoder="confidence", decoder_para=0.4, use_kernels=False, refresh_every=refresh,
              prune_last_block=prune, seed=2, progress=False)
    eager, _ = generate(model2, None, 10, LENGTH, **kw)
    monkeypatch.setattr(engine, "resolve_acceleration", lambda device, compile, graphs: Acceleration(False, True))
    monkeypatch.setattr(evaluator, "CapturedGraph", EmulatedGraph)
    monkeypatch.setattr(evaluator, "MIN_TICKS_FOR_GRAPH", 1)
    runners = []
    init = evaluator.BodyRunner.__init__
    monkeypatch.setattr(evaluator.BodyRunner, "__init__", lambda self, *a, **k: runners.append(self) or init(self, *a, **k))
    graphed, stats = generate(model2, None, 10, LENGTH, **kw)
    assert torch.equal(graphed, eager) and stats.cuda_graphs > 0
    replays = {key: g.replays for s in runners[0].graph_sets for key, g in s.graphs.items()}
    assert min(replays.values()) >= 1, replays
    if refresh:
        assert {key[0] for key in replays} == {"fill", "cached"}


def test_filtered_strategies_go_through_the_head_in_slices_with_the_same_samples(model, monkeypatch):
    """top_k / top_p make [rows, V-1] logits: a decoder's masked positions go in slices of rows, same samples."""
    from radd_fast.sampling import adaptive

    whole, _ = run(model, 6, strategy="top_k", strategy_para=3)
    monkeypatch.setattr(adaptive, "FILTERED_ROWS_PER_CALL", 5)
    calls = []
    real = adaptive._token_stats
    monkeypatch.setattr(adaptive, "_token_stats", lambda head, h, *a: calls.append(h.shape[0]) or real(head, h, *a))
    sliced, _ = run(model, 6, strategy="top_k", strategy_para=3)
    assert torch.equal(whole, sliced) and max(calls) > 5
