"""The end-to-end benchmark suite in quick mode (CPU, tiny model): it runs, writes its JSON, table and
plots, and the cached samplers' E-NFE matches the theory N (1 - (1 - 1/N)^L) within 5%."""
from __future__ import annotations

import json
import math
import sys

import pytest

from benchmarks import bench_e2e
from benchmarks.plots import make_plots


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    assert bench_e2e.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    return out, json.loads((out / "e2e.json").read_text())


def test_quick_run_writes_every_section(quick_run):
    out, res = quick_run
    rows = res["rows"]
    assert {r["section"] for r in rows} == set(bench_e2e.SECTIONS)
    assert res["env"]["torch"] and res["settings"]["quick"] is True
    for r in rows:
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0, r
    train = [r for r in rows if r["section"] == "train"]
    assert {r["provider"] for r in train} == {"reference", "fast"} and all(r["tokens/s"] > 0 for r in train)
    evals = {r["provider"] for r in rows if r["section"] == "eval"}
    assert evals == {"published loop", "reference engine", "fast engine"}
    md = (out / "e2e.md").read_text()
    assert "## sampling" in md and "E-NFE" in md and "seq*timesteps/s" in md


def test_enfe_matches_theory(quick_run):
    _, res = quick_run
    sampling = [r for r in res["rows"] if r["section"] == "sampling"]
    assert {r["steps"] for r in sampling} == set(bench_e2e.PLANS["quick"].sampling_steps)
    for r in sampling:
        theory = r["steps"] * (1 - (1 - 1 / r["steps"]) ** r["L"])
        assert r["E-NFE theory"] == pytest.approx(theory)
        if r["cache"]:
            assert abs(r["E-NFE"] - theory) <= 0.05 * theory, r
        else:
            assert r["E-NFE"] == r["steps"]


def test_plots(quick_run):
    pytest.importorskip("matplotlib")
    out, _ = quick_run
    for name in ("enfe_vs_steps.png", "sampling_speedup.png", "tokens_per_s_vs_batch.png"):
        assert (out / name).stat().st_size > 1000


def test_plots_skip_without_matplotlib(quick_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert make_plots(quick_run[1]["rows"], tmp_path) == []
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))
