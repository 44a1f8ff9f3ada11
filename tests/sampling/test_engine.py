"""The fast sampling engine (radd_fast/sampling/engine.py).

Against the published-API samplers: the same sample distribution, the same E-NFE, the head run on
exactly the revealed rows. Against exact expectations: the stats it reports (the summary line, the
dict a benchmark writes, the rates), the work counts summed over waves, the theory E-NFE over mixed
free lengths, the messages of its argument checks, whether it prints, the model's modes after a
run, and a wave's shapes and noise keys. On a uniform head (a fresh model) the tokens must be
i.i.d. uniform: noise shared between rows, evaluations, seeds or waves shows up in known rates, and
consecutive waves and splits (first_index) of few-step runs are independent pairs. Every token's
(key, noise id) and every schedule row is drawn once in a run and over its splits, head and schedule keys
apart. Its host syncs: a fixed few per wave and one at the end, none per evaluation.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from radd_fast import GeometricNoise, LogLinearNoise
from radd_fast.sampling import DiffusionSampler, OrderedSampler, SamplerConfig, engine, generate
from radd_fast.sampling.conditioning import initial_state, projection
from radd_fast.sampling.engine import Counters, SamplingStats
from radd_fast.sampling.schedule import expected_enfe_exact, update_rates
from radd_fast.sync_counter import SyncCounter
from tests.support.models import fallback_model, random_head_model
from tests.support.noise_streams import assert_fresh_noise, record_noise
from tests.support.stats import assert_same_counts, assert_same_distribution
from tests.support.sync_budgets import ENGINE_SYNCS_AT_END, ENGINE_SYNCS_PER_WAVE
from tests.support.uniform_head import LENGTH as UNIFORM_LENGTH
from tests.support.uniform_head import (
    N_REAL,
    SAMPLES,
    assert_iid_uniform,
    assert_independent_pairs,
    assert_rate,
    uniform_model,
)

N_SAMPLES, LENGTH, STEPS = 3000, 5, 6
ORDER = torch.tensor([2, 4, 0, 3, 1])


@pytest.fixture(scope="module")
def model():
    return random_head_model(tokens=8, length=16)


CASES = {  # name: (method, strategy, para, noise, conditioning, kernels, sampling dtype)
    "tweedie-direct": ("tweedie", "direct", None, LogLinearNoise(), None, False, "float32"),
    "tweedie-direct-cond-kernel": ("tweedie", "direct", None, LogLinearNoise(), {1: 3, 4: 6}, True, "float32"),
    "euler-top_p-cond": ("euler", "top_p", 0.8, GeometricNoise(1e-3, 8.0), {0: 5}, False, "float32"),
    "tweedie-top_k-kernel-fp64": ("tweedie", "top_k", 3, GeometricNoise(1e-2, 4.0), None, True, "float64"),
    "ordered-direct": ("ordered", "direct", None, None, None, False, "float32"),
    "ordered-top_k-cond": ("ordered", "top_k", 2, None, {3: 1}, False, "float32"),
    # away from the default step count (STEPS > LENGTH): one step, fewer steps than positions
    "tweedie-top_p-1-step-kernel": ("tweedie", "top_p", 0.8, LogLinearNoise(0.1), None, True, "float32"),
    "euler-direct-2-steps-cond-fp64": ("euler", "direct", None, GeometricNoise(1e-2, 4.0), {1: 3}, False, "float64"),
    "ordered-top_p-2-steps": ("ordered", "top_p", 0.8, None, None, False, "float32"),
}
CASE_STEPS = {"tweedie-top_p-1-step-kernel": 1, "euler-direct-2-steps-cond-fp64": 2, "ordered-top_p-2-steps": 2}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_the_published_api_distribution(model, case):
    method, strategy, para, noise, cond, kernels, sdtype = CASES[case]
    shape = (N_SAMPLES, LENGTH)
    init = initial_state(cond, N_SAMPLES, LENGTH, model.mask_id, "cpu")
    if method == "ordered":
        ref = OrderedSampler(model, shape, model.vocab_size, strategy, para, order=ORDER, seed=11)
    else:
        ref = DiffusionSampler(method, model, noise, shape, model.vocab_size, strategy, para, seed=11)
    steps = CASE_STEPS.get(case, STEPS)
    x_ref = ref.sample(steps, projection(init, model.mask_id))
    x_fast, stats = generate(model, noise, N_SAMPLES, LENGTH, steps, method=method, strategy=strategy,
                             strategy_para=para, conditioning=cond, batch_size=1024, seed=12, sampling_dtype=sdtype,
                             progress=False, use_kernels=kernels, order=ORDER)
    assert x_fast.shape == shape and x_fast.dtype == torch.int64
    assert not bool((x_fast == model.mask_id).any())
    fixed = init[0] != model.mask_id
    assert torch.equal(x_fast[:, fixed], init.expand(shape)[:, fixed])
    assert_same_distribution(x_ref, x_fast, model.vocab_size - 1, case)
    assert_same_counts(ref.last_row_nfe, stats.enfe, case + " E-NFE")
    n_free = int((~fixed).sum())
    assert stats.head_rows == N_SAMPLES * n_free and stats.head_rows_padded >= stats.head_rows
    assert stats.eval_rows == int(stats.enfe.sum())
    if stats.enfe_theory is not None:
        assert abs(stats.enfe_mean - stats.enfe_theory) <= 4 * stats.enfe.double().std().item() / N_SAMPLES**0.5 + 1e-9


class _Counter:
    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.rows += args[0].reshape(-1, args[0].shape[-1]).shape[0]


@pytest.mark.parametrize("strategy,kernels", [("direct", False), ("top_k", False), ("direct", True)])
def test_head_runs_on_exactly_the_revealed_rows(model, monkeypatch, strategy, kernels):
    n, L = 300, 7
    norm, linear = _Counter(model.output_layer.norm_final), _Counter(model.output_layer.linear)
    shapes = []
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda x, **kw: shapes.append(tuple(x.shape)) or hidden(x, **kw))
    try:
        tokens, stats = generate(model, LogLinearNoise(), n, L, 9, strategy=strategy, strategy_para=2,
                                 conditioning={3: 1}, batch_size=64, seed=0, progress=False, use_kernels=kernels,
                                 buckets=False)
    finally:
        norm.handle.remove()
        linear.handle.remove()
    assert stats.head_rows == stats.head_rows_padded == n * (L - 1)
    assert norm.rows == n * (L - 1)  # the final norm (the head's first op) saw the revealed rows only
    assert linear.rows == (0 if kernels and strategy == "direct" else n * (L - 1))  # fused kernel: no [N, V] logits
    assert sum(b for b, _ in shapes) == stats.eval_rows == int(stats.enfe.sum())
    assert all(t == L for _, t in shapes) and max(b for b, _ in shapes) == 64
    # with buckets, the evaluation batches take a few power-of-two sizes only
    shapes.clear()
    _, stats = generate(model, LogLinearNoise(), n, L, 9, strategy=strategy, strategy_para=2, batch_size=64, seed=0,
                        progress=False, use_kernels=False)
    assert {b for b, _ in shapes} <= {64, 32, 16, 8, 4, 2, 1} and stats.eval_rows_padded == sum(b for b, _ in shapes)


@pytest.mark.parametrize("kernels", [False, True])
def test_seeded_runs_are_deterministic(model, kernels):
    kw = dict(num_samples=40, length=6, steps=5, batch_size=8, progress=False, use_kernels=kernels, wave_size=16)
    a, sa = generate(model, LogLinearNoise(), seed=5, **kw)
    b, sb = generate(model, LogLinearNoise(), seed=5, **kw)
    c, _ = generate(model, LogLinearNoise(), seed=6, **kw)
    assert torch.equal(a, b) and torch.equal(sa.enfe, sb.enfe) and not torch.equal(a, c)
    assert sa.enfe.shape == (40,) and not bool((a == model.mask_id).any())


def test_per_row_conditioning_and_fully_fixed_rows(model):
    init = torch.full((3, 5), -1)
    init[0] = torch.tensor([1, 2, 3, 4, 5])  # nothing to sample: no evaluation
    init[1, 0] = 7
    tokens, stats = generate(model, LogLinearNoise(), 3, 5, 4, conditioning=init, progress=False, seed=0)
    assert tokens[0].tolist() == [1, 2, 3, 4, 5] and int(tokens[1, 0]) == 7
    assert int(stats.enfe[0]) == 0 and stats.head_rows == 9
    tokens, stats = generate(model, LogLinearNoise(), 2, 5, 4, conditioning=init[0], progress=False)
    assert stats.evaluations == 0 and tokens.tolist() == [[1, 2, 3, 4, 5]] * 2


def test_errors(model):
    with pytest.raises(ValueError, match="length must be"):
        generate(model, LogLinearNoise(), 2, 17, 4, progress=False)
    with pytest.raises(ValueError, match="needs the noise"):
        generate(model, None, 2, 4, 4, progress=False)
    with pytest.raises(ValueError, match="unknown sampling method"):
        generate(model, LogLinearNoise(), 2, 4, 4, method="ddim", progress=False)
    with pytest.raises(ValueError, match="top_k needs"):
        generate(model, LogLinearNoise(), 2, 4, 4, strategy="top_k", strategy_para=0, progress=False)
    with pytest.raises(ValueError, match="sampling_dtype"):
        generate(model, LogLinearNoise(), 2, 4, 4, sampling_dtype="float16", progress=False)
    with pytest.raises(ValueError, match="outside the sequence"):
        generate(model, LogLinearNoise(), 2, 4, 4, conditioning={4: 1}, progress=False)
    with pytest.raises(TypeError, match="radd_fast.RADD"):
        generate(torch.nn.Linear(2, 2), LogLinearNoise(), 2, 4, 4, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (kernels, CUDA graphs, on-device RNG)")
@pytest.mark.parametrize("strategy,para,sdtype", [("direct", None, "float32"), ("top_p", 0.8, "float64")])
def test_engine_on_cuda_matches_the_published_api(strategy, para, sdtype):
    model = random_head_model(tokens=8, length=16).cuda()
    cond = {0: 2}
    init = initial_state(cond, N_SAMPLES, LENGTH, model.mask_id, "cuda")
    ref = DiffusionSampler("tweedie", model, LogLinearNoise(), (N_SAMPLES, LENGTH), model.vocab_size, strategy, para,
                           seed=1)
    x_ref = ref.sample(STEPS, projection(init, model.mask_id))
    kw = dict(strategy=strategy, strategy_para=para, conditioning=cond, batch_size=256, sampling_dtype=sdtype,
              progress=False)
    x_fast, stats = generate(model, LogLinearNoise(), N_SAMPLES, LENGTH, STEPS, seed=2, **kw)
    assert stats.cuda_graphs >= 1 and x_fast.is_cuda
    assert bool((x_fast[:, 0] == 2).all()) and not bool((x_fast == model.mask_id).any())
    assert_same_distribution(x_ref, x_fast, model.vocab_size - 1, f"cuda {strategy}")
    assert_same_counts(ref.last_row_nfe, stats.enfe, "cuda E-NFE")
    again, _ = generate(model, LogLinearNoise(), N_SAMPLES, LENGTH, STEPS, seed=2, **kw)
    assert torch.equal(x_fast, again)  # deterministic with a seed on one device


# ---- the reported figures ----------------------------------------------------------------------------------------
def stats_of(**fields) -> SamplingStats:
    base = dict(enfe=torch.tensor([2, 4], dtype=torch.int64), enfe_theory=2.5, head_rows=30, head_rows_padded=32,
                eval_rows=6, eval_rows_padded=8, evaluations=4, wall_time=2.0, num_samples=2, length=16, steps=8,
                cuda_graphs=0, sampler="tweedie, 8 steps", body_token_rows=60, body_token_rows_exact=96,
                tokens_revealed=30)
    return SamplingStats(**(base | fields))


def test_stats_rates_and_fraction():
    s = stats_of()
    assert s.enfe_mean == 3.0 and s.samples_per_s == 1.0 and s.tokens_per_s == 15.0
    assert s.body_fraction == 60 / 96 and s.head_rows_per_evaluation == 5.0
    assert stats_of(head_rows=90, decoder="approximate (confidence tau=0.9)").tokens_per_s == 15.0  # tokens, not head rows
    assert stats_of(enfe=torch.zeros(0, dtype=torch.int64)).enfe_mean == 0.0
    zero = stats_of(wall_time=0.0, body_token_rows=0, body_token_rows_exact=0)
    assert zero.samples_per_s == 2 / 1e-12 and zero.tokens_per_s == 30 / 1e-12 and zero.body_fraction == 0.0
    assert stats_of(enfe=torch.tensor([1, 2], dtype=torch.int64)).enfe_mean == 1.5  # a mean in floating point


def test_summary_line_exact_and_approximate():
    assert stats_of(wall_time=0.5, tokens_revealed=12345).summary() == (
        "tweedie, 8 steps | E-NFE 3.0 per sample | 24,690 tokens/s | 4.00 samples/s | 0.50 s")
    assert stats_of(head_rows=60, decoder="approximate (entropy_bound gamma=2)").summary() == (
        "tweedie, 8 steps | E-NFE 3.0 per sample | head rows 10.0 per evaluation | 15 tokens/s | 1.00 samples/s | 2.00 s")
    assert stats_of(refresh_every=4).summary() == (
        "tweedie, 8 steps | E-NFE 3.0 per sample | body token-rows 62% of exact | 15 tokens/s | 1.00 samples/s | 2.00 s")


def test_as_dict_has_every_field_but_enfe_and_the_derived_rates():
    s = stats_of(refresh_every=2, acceleration="eager")
    d = s.as_dict()
    assert "enfe" not in d
    assert d["enfe_mean"] == 3.0 and d["samples_per_s"] == 1.0 and d["tokens_per_s"] == 15.0
    assert d["body_fraction"] == 60 / 96 and d["refresh_every"] == 2 and d["acceleration"] == "eager"
    assert d["head_rows_padded"] == 32 and d["steps"] == 8 and d["capture_time"] == 0.0


# ---- work counts -------------------------------------------------------------------------------------------------
def test_counters_sum_every_count_over_waves():
    class FakeWave:
        def __init__(self, k):
            self.ticks = k
            for i, name in enumerate(("eval_rows", "eval_rows_padded", "head_rows", "head_rows_padded", "tokens_revealed",
                                      "body_token_rows", "body_token_rows_padded", "body_token_rows_exact")):
                setattr(self, name, 10 * k + i)

    c = Counters()
    c.add(FakeWave(1))
    c.add(FakeWave(3))
    assert c.evaluations == 4
    assert c.as_dict() == {"evaluations": 4, "eval_rows": 40, "eval_rows_padded": 42, "head_rows": 44,
                           "head_rows_padded": 46, "tokens_revealed": 48, "body_token_rows": 50,
                           "body_token_rows_padded": 52, "body_token_rows_exact": 54}
    assert all(type(v) is int for v in c.as_dict().values())


def test_a_run_reports_its_sizes_and_counts_over_several_waves(model):
    tokens, s = generate(model, LogLinearNoise(), 10, 6, 5, rows_in_flight=4, wave_size=4, seed=1, progress=False)
    assert (s.num_samples, s.length, s.steps, s.rows_in_flight) == (10, 6, 5, 4)
    assert s.enfe.shape == (10,) and s.eval_rows == int(s.enfe.sum())
    assert s.head_rows == s.tokens_revealed == 60 and s.body_token_rows == s.eval_rows * 6 == s.body_token_rows_exact
    assert s.eval_rows_padded * 6 == s.body_token_rows_padded and s.refresh_every is None
    assert s.cuda_graphs == 0 and s.capture_time == 0.0 and s.acceleration == "eager"
    assert s.sampler == "tweedie, 5 steps, direct, fp64 Gumbel"  # the default noise dtype
    assert s.wall_time > 0


def test_theory_averages_over_the_rows_free_lengths(model):
    noise = LogLinearNoise()
    init = torch.full((4, 6), -1)
    init[0, :2] = init[3, :2] = 1  # 4 free, twice
    init[1, :5] = 1  # 1 free
    _, s = generate(model, noise, 4, 6, 5, conditioning=init, seed=0, progress=False)
    rates = update_rates(noise, 5, "tweedie", 1e-5, torch.device("cpu"))
    expected = (2 * expected_enfe_exact(rates, np.array([4])) + expected_enfe_exact(rates, np.array([1]))
                + expected_enfe_exact(rates, np.array([6]))) / 4  # weighted by how many rows have each
    assert s.enfe_theory == pytest.approx(float(expected[0]), rel=1e-12)
    _, ordered = generate(model, None, 2, 6, 3, method="ordered", seed=0, progress=False)
    assert ordered.enfe_theory is None


# ---- arguments, printing, modes -----------------------------------------------------------------------------------
def test_argument_messages(model):
    with pytest.raises(ValueError) as err:
        generate(model, LogLinearNoise(), 2, 0, 4, progress=False)
    assert str(err.value) == "length must be in [1, 16] (the model's length), got 0"
    generate(model, LogLinearNoise(), 1, 16, 2, progress=False)  # the model's full length is allowed
    with pytest.raises(ValueError) as err:
        generate(model, LogLinearNoise(), -1, 4, 4, progress=False)
    assert str(err.value) == "need num_samples >= 0, got -1"
    tokens, s = generate(model, LogLinearNoise(), 0, 4, 4, progress=False)
    assert tokens.shape == (0, 4) and s.evaluations == 0 and s.enfe.shape == (0,)
    with pytest.raises(ValueError) as err:
        generate(model, None, 2, 4, 4, method="euler", progress=False)
    assert str(err.value) == "method 'euler' needs the noise schedule (noise=...)"
    for missing in ("hidden", "output_head", "mask_id", "vocab_size", "length", "device"):
        class Partial:
            pass

        fake = Partial()
        for name in ("hidden", "output_head", "mask_id", "vocab_size", "length", "device"):
            if name != missing:
                setattr(fake, name, None)
        with pytest.raises(TypeError) as err:
            generate(fake, LogLinearNoise(), 1, 4, 4, progress=False)
        assert str(err.value) == (f"the fast engine needs a radd_fast.RADD model (missing {missing!r}); "
                                  "use the published-API samplers (DiffusionSampler / OrderedSampler) for other models")


def test_the_default_length_is_the_models(model):
    tokens, s = generate(model, LogLinearNoise(), 2, steps=3, seed=0, progress=False)
    assert tokens.shape == (2, 16) and s.length == 16


def test_summary_printing_follows_progress_unless_told(model, capsys):
    kw = dict(num_samples=2, length=4, steps=3, seed=0)
    generate(model, LogLinearNoise(), progress=False, **kw)
    assert capsys.readouterr().out == ""
    _, s = generate(model, LogLinearNoise(), progress=False, summary=True, **kw)
    assert capsys.readouterr().out == s.summary() + "\n"
    _, s = generate(model, LogLinearNoise(), progress=True, **kw)
    captured = capsys.readouterr()
    assert captured.out == s.summary() + "\n" and "sampling" in captured.err  # the bar, on stderr
    generate(model, LogLinearNoise(), progress=True, summary=False, **kw)
    assert capsys.readouterr().out == ""


def test_the_progress_bar_counts_every_wave(model, monkeypatch):
    made = []

    class Bar:
        def __init__(self, total):
            self.total, self.n, self.refreshed = total, 0, 0

        def update(self, n):
            self.n += n

        def refresh(self):
            self.refreshed += 1

        def close(self):
            made.append(self)

    def fake_bar(enabled, total=None, desc="", unit="it"):
        assert (enabled, desc, unit) == (True, "sampling", "eval")
        return Bar(total)

    monkeypatch.setattr(engine, "progress_bar", fake_bar)
    _, s = generate(model, LogLinearNoise(), 12, 5, 4, rows_in_flight=2, wave_size=4, seed=0, summary=False)
    (bar,) = made
    assert bar.total == bar.n == s.evaluations and bar.refreshed == 2  # three waves: made once, grown twice


def test_a_run_leaves_the_models_modes_as_they_were(model):
    model.train()
    model.validate_inputs = True
    try:
        generate(model, LogLinearNoise(), 2, 4, 3, seed=0, progress=False)
        assert model.training and model.validate_inputs
    finally:
        model.eval()
        model.validate_inputs = False
    generate(model, LogLinearNoise(), 2, 4, 3, seed=0, progress=False)
    assert not model.training and not model.validate_inputs


def test_an_unseeded_run_draws_its_seed_from_torch(model):
    torch.manual_seed(3)
    a, _ = generate(model, LogLinearNoise(), 4, 6, 4, progress=False)
    torch.manual_seed(3)
    b, _ = generate(model, LogLinearNoise(), 4, 6, 4, progress=False)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, ()))  # what generate draws when no seed is given
    c, _ = generate(model, LogLinearNoise(), 4, 6, 4, seed=seed, progress=False)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("method", ["tweedie", "ordered"])
def test_a_seeded_run_does_not_depend_on_the_global_generator(model, method):
    """Every draw (the reveal schedule, the random orders, the noise) comes from the run's own generator."""
    noise = None if method == "ordered" else LogLinearNoise()
    runs = []
    for prior in (0, 99):
        torch.manual_seed(prior)
        runs.append(generate(model, noise, 6, 8, 4, method=method, seed=5, progress=False)[0])
    assert torch.equal(*runs)


def test_a_wave_of_fixed_rows_pads_nothing(model):
    init = torch.tensor([[1, 2, 3, 4]])
    _, s = generate(model, LogLinearNoise(), 3, 4, 4, conditioning=init, progress=False)
    assert (s.evaluations, s.head_rows, s.head_rows_padded, s.eval_rows_padded) == (0, 0, 0, 0)


def hand_wave(buckets: bool) -> engine.Wave:
    """Two rows of 4 free tokens: row 0 reveals 3 then 1, row 1 reveals 2 then 2 (both in flight)."""
    x0 = torch.full((2, 4), 7)
    group = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]])
    return engine.Wave(x0, group, torch.tensor([2, 2]), rows_in_flight=2, buckets=buckets)


def test_head_rows_are_padded_to_powers_of_two_only_with_buckets():
    bucketed, exact = hand_wave(True), hand_wave(False)
    assert bucketed.head_n.tolist() == exact.head_n.tolist() == [5, 3]
    assert bucketed.head_p.tolist() == [8, 4] and exact.head_p.tolist() == [5, 3]
    assert bucketed.body_shapes(True) == {(2, 4, 8): 1, (2, 4, 4): 1}
    assert bucketed.body_shapes(False) == {(2, 4): 2}


class RecordingBody:
    """Stands for BodyRunner in Wave.run: records the shapes prepared and each call's arguments."""

    def __init__(self, model):
        self.model, self.prepared, self.calls = model, [], []

    def prepare(self, shapes):
        self.prepared.append(dict(shapes))

    def __call__(self, x, rows=None):
        self.calls.append(rows is not None)
        h = self.model.hidden(x) if rows is None else self.model.hidden(x, rows)
        return h


class RecordingHead:
    def __init__(self):
        self.keys, self.ids = [], []

    def sample_at(self, h_rows, dst, x_flat, strategy, key, noise_ids):
        self.keys.append(key)
        self.ids.append(noise_ids[dst < x_flat.numel() - 1].sort().values.tolist())  # padded rows: the trash cell
        x_flat[dst] = 0  # any valid token


@pytest.mark.parametrize("prune", [True, False])
def test_a_wave_prepares_its_shapes_prunes_as_asked_and_keys_each_token_by_its_place_in_the_run(model, prune,
                                                                                              monkeypatch):
    """One key for the run; a revealed token's noise id is its sample's index x L + its position
    (first_id: the wave's first token's), whatever the evaluation that reveals it."""
    wave, body, head = hand_wave(True), RecordingBody(model), RecordingHead()
    monkeypatch.setattr(model, "hidden", lambda x, rows=None: torch.zeros(
        (x.shape[0] * x.shape[1] if rows is None else rows.numel(), 4)))
    after = []
    out = wave.run(body, head, None, key=9, first_id=12, bar=engine.progress_bar(False), prune=prune,
                   after=after.append)
    assert body.prepared == [wave.body_shapes(prune)]
    assert body.calls == [prune, prune]  # the pruned body is given the revealed rows
    assert head.keys == [9, 9] and after == [0, 1]
    # row 0 (ids 12..15) reveals positions 0-2 then 3; row 1 (ids 16..19) positions 0-1 then 2-3
    assert head.ids == [[12, 13, 14, 16, 17], [15, 18, 19]]
    assert out.shape == (2, 4) and not (out == 7).any()


# ---- fresh noise on a uniform head --------------------------------------------------------------------------------
ENGINE_CASES = {  # name: (method, steps, use_kernels, sampling dtype)
    "tweedie-1-step-torch": ("tweedie", 1, False, "float64"),
    "tweedie-16-steps-torch": ("tweedie", 16, False, "float32"),
    "tweedie-1-step-kernel": ("tweedie", 1, True, "float32"),
    "euler-6-steps-kernel": ("euler", 6, True, "float64"),
    "ordered-torch": ("ordered", UNIFORM_LENGTH, False, "float64"),
    "ordered-3-chunks-kernel": ("ordered", 3, True, "float32"),
}


def engine_samples(model, case: str, seed: int) -> torch.Tensor:
    method, steps, kernels, sdtype = ENGINE_CASES[case]
    x, _ = generate(model, LogLinearNoise(), SAMPLES, UNIFORM_LENGTH, steps, method=method, use_kernels=kernels,
                    sampling_dtype=sdtype, rows_in_flight=16, seed=seed, progress=False)
    return x


class TestFreshNoiseOnAUniformHead:
    """A fresh model's head is uniform: the engine's tokens must be i.i.d. uniform (tests.support.uniform_head)."""

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls):
        return uniform_model()

    @pytest.mark.parametrize("case", list(ENGINE_CASES))
    def test_engine_uniform_head_gives_iid_uniform_tokens(self, model, case):
        """One evaluation reveals many positions of many rows (1 step) or few at a time (16 steps):
        noise shared by rows of an evaluation, or by evaluations, shows up in one of the rates."""
        assert_iid_uniform(engine_samples(model, case, seed=3), case)

    @pytest.mark.parametrize("kernels", [False, True])
    def test_engine_different_seeds_and_waves_are_independent(self, model, kernels):
        def run(seed, n=SAMPLES, **kw):
            return generate(model, LogLinearNoise(), n, UNIFORM_LENGTH, 3, use_kernels=kernels, rows_in_flight=16,
                            seed=seed, progress=False, **kw)[0]

        a, b = run(5), run(6)
        assert_rate(a == b, 1 / N_REAL, f"kernels={kernels}: seeds 5 and 6 agree")
        assert torch.equal(a, run(5)), f"kernels={kernels}: seed 5 twice differs"
        x = run(7, 2 * SAMPLES, wave_size=SAMPLES)  # the second wave's noise is not the first's
        assert_rate(x[:SAMPLES] == x[SAMPLES:], 1 / N_REAL, f"kernels={kernels}: two waves agree")

    @pytest.mark.parametrize("method, steps", [("tweedie", 1), ("tweedie", 2), ("ordered", 3)])
    @pytest.mark.parametrize("kernels", [False, True])
    def test_consecutive_waves_and_splits_are_independent_where_a_repeat_would_show(self, model, method, steps,
                                                                                  kernels):
        """With one to three evaluations per sample and all of a wave's rows in flight, a wave's tokens come
        from a head call or three: noise repeated in the next wave, or in the samples of the next rank
        (first_index), would pair sample i of one with sample i of the other position by position, which
        the chi-square of the pairs against the uniform product (and the no-equal-samples check) shows."""
        if kernels:
            pytest.importorskip("triton")
        kw = dict(method=method, rows_in_flight=SAMPLES, use_kernels=kernels, progress=False)
        name = f"{method}, {steps} steps, kernels={kernels}"
        x, _ = generate(model, LogLinearNoise(), 2 * SAMPLES, UNIFORM_LENGTH, steps, seed=8, wave_size=SAMPLES, **kw)
        assert_iid_uniform(x, name)
        assert_independent_pairs(x[:SAMPLES], x[SAMPLES:], f"{name}: waves 1 and 2")
        rank_0, _ = generate(model, LogLinearNoise(), SAMPLES, UNIFORM_LENGTH, steps, seed=9, **kw)
        rank_1, _ = generate(model, LogLinearNoise(), SAMPLES, UNIFORM_LENGTH, steps, seed=9, first_index=SAMPLES, **kw)
        assert_independent_pairs(rank_0, rank_1, f"{name}: first_index 0 and {SAMPLES}")


# ---- every token's noise and every schedule row drawn once --------------------------------------------------------
KEY_CASES = {  # name: generate options (the keys a head is given do not depend on its backend)
    "tweedie-direct": dict(),
    "euler-top_k-geometric": dict(method="euler", strategy="top_k", strategy_para=3, noise=GeometricNoise(1e-2, 4.0)),
    "ordered-random-top_p": dict(method="ordered", strategy="top_p", strategy_para=0.8),
    "ordered-left_to_right": dict(method="ordered", order=torch.arange(8)),
    "no-buckets-no-pruning": dict(buckets=False, prune_last_block=False),
}


@pytest.mark.parametrize("case", list(KEY_CASES))
def test_no_two_tokens_of_a_run_draw_the_same_noise(monkeypatch, case):
    """Every (key, noise id) the head reveals a token with and every schedule row is drawn once over a run of
    four waves with rows finishing at different evaluations, and over the same samples split in two calls
    (first_index, as ranks split them), which draw exactly the whole run's pairs; the head's and the
    schedule's keys differ, and another seed shares no head noise."""
    options = dict(KEY_CASES[case])
    noise = options.pop("noise", LogLinearNoise())
    model = random_head_model(tokens=8, length=8)
    log = record_noise(monkeypatch, model.mask_id)
    kw = dict(steps=3, rows_in_flight=3, wave_size=4, use_kernels=False, conditioning={5: 2}, progress=False, **options)
    whole, _ = generate(model, noise, 14, 8, seed=6, **kw)
    assert_fresh_noise(log, tokens=14 * 7, samples=14, name=f"{case}: one run of four waves")
    pairs = set(log.head)
    log.clear()
    head, _ = generate(model, noise, 9, 8, seed=6, **kw)
    tail, _ = generate(model, noise, 5, 8, seed=6, first_index=9, **kw)
    assert_fresh_noise(log, tokens=14 * 7, samples=14, name=f"{case}: samples 0-8 and 9-13 (two ranks)")
    assert set(log.head) == pairs and torch.equal(torch.cat([head, tail]), whole)
    log.clear()
    generate(model, noise, 14, 8, seed=7, **kw)
    assert not pairs & set(log.head), f"{case}: seeds 6 and 7 share head noise"


# ---- host syncs --------------------------------------------------------------------------------------------------
def _syncs(model, steps: int, num_samples: int, wave_size: int, **options) -> tuple[int, dict, int]:
    cfg = SamplerConfig(steps=steps, rows_in_flight=4, wave_size=wave_size, **options)
    with SyncCounter() as syncs:
        _, stats = generate(model, LogLinearNoise(), num_samples, config=cfg, seed=3, progress=False)
    return syncs.total, dict(syncs.by_op), stats.evaluations


class TestHostSyncs:
    """A fixed few syncs per wave and one at the end, none per evaluation (on a length-12 model)."""

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls):
        return random_head_model(tokens=8, length=12)

    @pytest.mark.parametrize("options", [dict(use_kernels=False),
                                         dict(use_kernels=False, strategy="top_k", strategy_para=3),
                                         dict(use_kernels=False, method="ordered")])
    def test_syncs_do_not_grow_with_evaluations(self, model, options):
        few, ops_few, evals_few = _syncs(model, steps=2, num_samples=8, wave_size=8, **options)
        many, ops_many, evals_many = _syncs(model, steps=12, num_samples=8, wave_size=8, **options)
        assert evals_many > 2 * evals_few  # more evaluations ...
        at_end = 1 if options.get("method") == "ordered" else ENGINE_SYNCS_AT_END  # ordered: no E-NFE theory
        assert few == many == ENGINE_SYNCS_PER_WAVE + at_end, (ops_few, ops_many)  # ... the same syncs

    def test_syncs_per_wave(self, model):
        one, _, _ = _syncs(model, steps=6, num_samples=12, wave_size=12, use_kernels=False)
        three, ops, _ = _syncs(model, steps=6, num_samples=12, wave_size=4, use_kernels=False)
        assert one == ENGINE_SYNCS_PER_WAVE + ENGINE_SYNCS_AT_END
        assert three == 3 * ENGINE_SYNCS_PER_WAVE + ENGINE_SYNCS_AT_END, ops

    def test_kernel_path_adds_no_sync(self, model):
        if not torch.cuda.is_available():
            pytest.importorskip("triton")
        total, ops, _ = _syncs(model, steps=6, num_samples=8, wave_size=8, use_kernels=True)
        assert total == ENGINE_SYNCS_PER_WAVE + ENGINE_SYNCS_AT_END, ops


# ---- without Triton, and last-block pruning -----------------------------------------------------------------------
def test_engine_without_triton_runs_the_torch_head_and_refuses_kernels(no_triton):
    model = fallback_model("fast")
    x, _ = generate(model, LogLinearNoise(), 6, 8, 4, seed=1, progress=False)
    y, _ = generate(fallback_model("reference"), LogLinearNoise(), 6, 8, 4, seed=1, progress=False)
    assert torch.equal(x, y)  # the fast backend's head fell back to the same seeded torch draw
    with pytest.raises(ValueError, match="use_kernels=True needs CUDA tensors or TRITON_INTERPRET=1"):
        generate(model, LogLinearNoise(), 2, 8, 4, use_kernels=True, seed=1, progress=False)


@pytest.mark.parametrize("strategy,para", [("direct", None), ("top_k", 3)])
def test_engine_samples_do_not_change_with_pruning(strategy, para):
    model = random_head_model(tokens=8, length=10)
    cfg = SamplerConfig(steps=6, strategy=strategy, strategy_para=para, use_kernels=False, rows_in_flight=4)
    a, sa = generate(model, LogLinearNoise(), 24, config=cfg, seed=2, progress=False)
    b, sb = generate(model, LogLinearNoise(), 24, config=cfg.replace(prune_last_block=False), seed=2, progress=False)
    assert torch.equal(a, b) and torch.equal(sa.enfe, sb.enfe)


# ---- each sample keyed by (seed, index): the same samples however the work is split -------------------------------
SPLIT_CASES = {  # name: generate options
    "tweedie-direct-torch": dict(use_kernels=False),
    "tweedie-direct-kernel-fp64": dict(use_kernels=True, sampling_dtype="float64"),
    "euler-top_k-kernel": dict(method="euler", strategy="top_k", strategy_para=3, use_kernels=True),
    "ordered-random-top_p-torch": dict(method="ordered", strategy="top_p", strategy_para=0.8, use_kernels=False),
    "approximate-refresh-2": dict(refresh_every=2, use_kernels=False),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_a_sample_is_the_same_whatever_the_rows_in_flight_the_wave_size_or_the_split(model, case):
    """Sample i's schedule and noise are keyed by (seed, i): one call of 11 equals calls of 4 and 7 with
    first_index, other rows in flight and waves, and conditioning shared or per row."""
    opts = dict(SPLIT_CASES[case], conditioning={2: 5}, seed=21, progress=False)
    whole, s_whole = generate(model, LogLinearNoise(), 11, 10, 7, rows_in_flight=4, **opts)
    head, s_head = generate(model, LogLinearNoise(), 4, 10, 7, rows_in_flight=1, **opts)
    tail, s_tail = generate(model, LogLinearNoise(), 7, 10, 7, rows_in_flight=8, wave_size=3, first_index=4, **opts)
    assert torch.equal(whole, torch.cat([head, tail])), case
    assert torch.equal(s_whole.enfe, torch.cat([s_head.enfe, s_tail.enfe]))
    assert not torch.equal(whole[:4], tail[:4])  # other indices, other samples


def test_the_kernel_and_torch_heads_draw_the_same_samples(model):
    """Both heads key the noise the same way (radd_fast.philox): on an fp32 model, the same tokens."""
    kw = dict(seed=4, rows_in_flight=5, progress=False, sampling_dtype="float64")
    torch_head, _ = generate(model, LogLinearNoise(), 20, 12, 8, use_kernels=False, **kw)
    kernel_head, _ = generate(model, LogLinearNoise(), 20, 12, 8, use_kernels=True, **kw)
    assert torch.equal(torch_head, kernel_head)


def test_on_rows_hands_over_every_row_once_in_sample_order(model):
    """Finished rows stream out in sample order while the waves run (every time here: on_rows_every=0),
    each once, with the tokens and E-NFE generate returns; first_index numbers them."""
    got = []
    tokens, stats = generate(model, LogLinearNoise(), 13, 9, 6, rows_in_flight=3, wave_size=5, first_index=100,
                             seed=2, progress=False, on_rows=lambda i, t, e: got.append((i, t, e)), on_rows_every=0)
    starts = [i for i, _, _ in got]
    assert starts[0] == 100 and len(got) > 3  # more hand-overs than waves: rows left before their wave ended
    assert all(i + len(t) == j for (i, t, _), j in zip(got, starts[1:] + [113]))
    assert all(t.device.type == "cpu" for _, t, _ in got)
    assert torch.equal(torch.cat([t for _, t, _ in got]), tokens.cpu())
    assert torch.equal(torch.cat([e for _, _, e in got]), stats.enfe)
    few = []
    generate(model, LogLinearNoise(), 13, 9, 6, rows_in_flight=3, wave_size=5, seed=2, progress=False,
             on_rows=lambda i, t, e: few.append(i), on_rows_every=3600)
    assert few == [0, 5, 10]  # a long interval: each wave's rows at its end


def test_first_index_must_not_be_negative(model):
    with pytest.raises(ValueError, match="need first_index >= 0, got -1"):
        generate(model, LogLinearNoise(), 2, 5, 3, first_index=-1, progress=False)
