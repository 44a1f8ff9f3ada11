"""benchmarks/bench_decoders.py: its quality measures, its verdict against the exact curve, and a tiny run."""
import json
import math

import pytest
import torch

bench = pytest.importorskip("benchmarks.bench_decoders")


def test_repeated_ngrams_is_one_minus_distinct_over_all():
    samples = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 7, 7, 7, 7, 7], [1, 2, 1, 2, 1, 2]])
    rep = bench.repeated_ngrams(samples, 2).tolist()
    assert rep == [0.0, 1 - 1 / 5, 1 - 2 / 5]
    assert bench.repeated_ngrams(samples, 7).tolist() == [0.0, 0.0, 0.0]  # no n-gram at all


def row(family, nfe, nll, entropy=4.0, rep=0.0, se=0.01):
    return dict(family=family, knob=1, refresh=None, nfe=nfe, nll=nll, nll_se=se, entropy=entropy, entropy_se=se,
                rep=rep, rep_se=se)


EXACT = [row("exact", 8, 3.0), row("exact", 32, 2.5), row("exact", 128, 2.3)]


def test_the_exact_curve_is_interpolated_in_log_nfe():
    assert bench.exact_at(EXACT, 16, "nll") == pytest.approx(2.75)
    assert bench.exact_at(EXACT, 4, "nll") == 3.0 and bench.exact_at(EXACT, 1000, "nll") == 2.3  # held beyond


@pytest.mark.parametrize("candidate,words", [
    (row("confidence", 16, 2.4), "beats exact at equal NFE"),
    (row("confidence", 16, 2.4, entropy=2.0), "trades diversity for likelihood"),
    (row("entropy_bound", 16, 2.4, rep=0.3), "trades diversity for likelihood"),
    (row("low_confidence", 16, 3.2), "worse than exact at equal NFE"),
    (row("low_confidence", 16, 2.75), "as exact at equal NFE"),
    (row("confidence", 4, 2.0), "outside the exact sweep's NFE, beats exact at equal NFE"),
    (row("exact", 16, 2.75), "baseline"),
])
def test_the_verdict_compares_at_equal_nfe_and_counts_diversity(candidate, words):
    assert bench.verdict(candidate, EXACT) == words


def test_every_decoder_is_swept_alone_and_with_the_cache():
    ns = type("Args", (), dict(rows_in_flight=4, steps_sweep="8,16", low_steps="8,16", taus="0.9,0.5", gammas="1",
                               refresh=4))
    rows = bench.samplers(ns)
    names = [bench.label(r) for r in rows]
    assert names[:2] == ["exact steps=8", "exact steps=16"]
    assert "confidence tau=0.5, refresh 4" in names and "low_confidence steps=16, refresh 4" in names
    assert len(rows) == 2 + 2 * (2 + 1 + 2)
    assert all(r["cfg"].approximate == (r["family"] != "exact") for r in rows)


def test_a_tiny_run_writes_its_table_json_and_plot(tmp_path):
    stem = bench.main(["--quick", "--train_seconds", "0", "--length", "12", "--samples", "3", "--nll_draws", "1",
                       "--steps_sweep", "2,6", "--low_steps", "2,6", "--taus", "0.5", "--gammas", "2", "--refresh", "2",
                       "--rows_in_flight", "2", "--out", str(tmp_path)])
    assert stem.name.startswith("decoders_cpu-quick_")
    data = json.loads(stem.with_suffix(".json").read_text())
    assert len(data["rows"]) == 2 + 2 * (1 + 1 + 2) and stem.with_suffix(".png").stat().st_size > 0
    table = stem.with_suffix(".md").read_text()
    assert "(--quick)" in table and "| confidence tau=0.5, refresh 2 |" in table
    for r in data["rows"]:
        assert r["nfe"] >= 1 and math.isfinite(r["nll"]) and 0 <= r["rep"] <= 1
        assert r["body_per_eval"] <= 12 and (r["family"] == "exact") == (r["verdict"] == "baseline")
        assert ("approximate" in r["sampler"]) == (r["family"] != "exact")
