"""The sampling engine's bookkeeping, against exact expectations (issue 17).

tests/test_sampling_engine.py checks the samples (distribution, E-NFE, head rows) against the
reference samplers. What a wrong engine could still get past it: the stats it reports (the
summary line, the dict a benchmark writes, the rates), the work counts summed over waves, the
theory E-NFE over mixed free lengths, the messages of its argument checks, whether it prints,
and the model's modes after a run. Each is pinned here on a tiny model, with small exact cases.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from radd_fast import LogLinearNoise
from radd_fast.model.head import noise_key
from radd_fast.sampling import engine
from radd_fast.sampling.engine import Counters, SamplingStats, generate
from radd_fast.sampling.schedule import expected_enfe_exact, update_rates

from .test_sampling_utils import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(tokens=8, length=16)


def stats_of(**fields) -> SamplingStats:
    base = dict(enfe=torch.tensor([2, 4], dtype=torch.int64), enfe_theory=2.5, head_rows=30, head_rows_padded=32,
                eval_rows=6, eval_rows_padded=8, evaluations=4, wall_time=2.0, num_samples=2, length=16, steps=8,
                cuda_graphs=0, sampler="tweedie, 8 steps", body_token_rows=60, body_token_rows_exact=96)
    return SamplingStats(**(base | fields))


# ---- the reported figures ----------------------------------------------------------------------------------------
def test_stats_rates_and_fraction():
    s = stats_of()
    assert s.enfe_mean == 3.0 and s.samples_per_s == 1.0 and s.tokens_per_s == 15.0
    assert s.body_fraction == 60 / 96
    assert stats_of(enfe=torch.zeros(0, dtype=torch.int64)).enfe_mean == 0.0
    zero = stats_of(wall_time=0.0, body_token_rows=0, body_token_rows_exact=0)
    assert zero.samples_per_s == 2 / 1e-12 and zero.tokens_per_s == 30 / 1e-12 and zero.body_fraction == 0.0
    assert stats_of(enfe=torch.tensor([1, 2], dtype=torch.int64)).enfe_mean == 1.5  # a mean in floating point


def test_summary_line_exact_and_approximate():
    assert stats_of(wall_time=0.5, head_rows=12345).summary() == (
        "tweedie, 8 steps | E-NFE 3.0 per sample | 24,690 tokens/s | 4.00 samples/s | 0.50 s")
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
            self.head_n, self.head_p = np.array([k, 1]), np.array([k + 1, 2])
            for i, name in enumerate(("eval_rows", "eval_rows_padded", "body_token_rows", "body_token_rows_padded",
                                      "body_token_rows_exact")):
                setattr(self, name, 10 * k + i)

    c = Counters()
    c.add(FakeWave(1))
    c.add(FakeWave(3))
    assert c.evaluations == 4
    assert c.as_dict() == {"evaluations": 4, "eval_rows": 40, "eval_rows_padded": 42, "head_rows": 6,
                           "head_rows_padded": 10, "body_token_rows": 44, "body_token_rows_padded": 46,
                           "body_token_rows_exact": 48}
    assert all(type(v) is int for v in c.as_dict().values())


def test_a_run_reports_its_sizes_and_counts_over_several_waves(model):
    tokens, s = generate(model, LogLinearNoise(), 10, 6, 5, rows_in_flight=4, wave_size=4, seed=1, progress=False)
    assert (s.num_samples, s.length, s.steps, s.rows_in_flight) == (10, 6, 5, 4)
    assert s.enfe.shape == (10,) and s.eval_rows == int(s.enfe.sum())
    assert s.head_rows == 60 and s.body_token_rows == s.eval_rows * 6 == s.body_token_rows_exact
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


# ---- arguments, printing, modes ------------------------------------------------------------------------------------
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
                                  "use the reference samplers for other models")


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
        self.keys = []

    def sample_at(self, h_rows, dst, x_flat, strategy, key):
        self.keys.append(key)
        x_flat[dst] = 0  # any valid token


@pytest.mark.parametrize("prune", [True, False])
def test_a_wave_prepares_its_shapes_prunes_as_asked_and_keys_each_evaluation(model, prune, monkeypatch):
    wave, body, head = hand_wave(True), RecordingBody(model), RecordingHead()
    monkeypatch.setattr(model, "hidden", lambda x, rows=None: torch.zeros(
        (x.shape[0] * x.shape[1] if rows is None else rows.numel(), 4)))
    out = wave.run(body, head, None, seed=9, first_evaluation=3, bar=engine.progress_bar(False), prune=prune)
    assert body.prepared == [wave.body_shapes(prune)]
    assert body.calls == [prune, prune]  # the pruned body is given the revealed rows
    assert head.keys == [noise_key(9, 3), noise_key(9, 4)]  # evaluation numbers continue across waves
    assert out.shape == (2, 4) and not (out == 7).any()
