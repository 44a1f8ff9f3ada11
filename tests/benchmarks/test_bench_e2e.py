"""The end-to-end benchmark suite in quick mode (CPU, tiny model): it runs every section with the
published code beside ours (when the published checkout is there), writes its JSON, tables and
plots, and every cached sampler's E-NFE matches the theory N (1 - (1 - 1/N)^L) within 5%."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from benchmarks import bench_e2e, e2e_setup
from benchmarks.plots import make_plots
from tests.support.published_code import published_checkout

OURS = ("reference", "fast")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run; with the published code when present (None: without, and its tests skip)."""
    try:
        published = published_checkout()
    except pytest.skip.Exception:
        published = None
    out = tmp_path_factory.mktemp("e2e")
    argv = ["--quick", "--device", "cpu", "--out", str(out)] + (["--published", str(published)] if published else [])
    assert bench_e2e.main(argv) == 0
    return out, json.loads((out / "e2e.json").read_text()), published


def test_quick_run_writes_every_section(quick_run):
    out, res, published = quick_run
    rows = res["rows"]
    assert [r["section"] for r in rows][0] == "forward"
    assert {r["section"] for r in rows} == set(bench_e2e.SECTIONS) | {"best batch"}
    assert res["env"]["torch"] and res["settings"]["quick"] is True
    for section in ("forward", "train", "eval"):
        providers = [r["provider"] for r in rows if r["section"] == section]
        assert set(providers) == set(OURS) | ({"published"} if published else set()), section
    for r in rows:
        if r["section"] not in ("batch", "best batch"):  # the batch sweep has no reference provider
            assert math.isfinite(r["vs reference"]) and r["vs reference"] > 0, r
    assert all(r["tokens/s"] > 0 for r in rows if r["section"] == "train")
    batch = [r for r in rows if r["section"] == "batch"]
    assert {r["rows_in_flight"] for r in batch} == set(e2e_setup.PLANS["quick"].batch_rows)
    best = {r["provider"]: r for r in rows if r["section"] == "best batch"}
    assert set(best) == {"fast"} | ({"published"} if published else set())
    for provider, r in best.items():
        assert r["samples/s"] == max(b["samples/s"] for b in batch if b["provider"] == provider)
    md = (out / "e2e.md").read_text()
    assert e2e_setup.CPU_LABEL in md and "## sampling" in md and "E-NFE" in md and "seq*timesteps/s" in md


def test_published_rows_are_the_baseline(quick_run):
    _, res, published = quick_run
    if not published:
        published_checkout()  # skips with the reason
    rows = res["rows"]
    assert res["env"]["published"]["label"] == "published" and len(res["env"]["published"]["sha256"]) == 64
    for r in rows:
        if r["section"] == "batch":  # the sweep's rows; their best ones carry the ratio
            continue
        assert math.isfinite(r["vs published"]) and r["vs published"] > 0, r
        if r["provider"] == "published":
            assert r["vs published"] == 1.0
    sampling = {r["provider"] for r in rows if r["section"] == "sampling"}
    assert sampling == {"published", "published no-cache", "reference", "fast", bench_e2e.approx_label(4)}
    approx = [r for r in rows if r["provider"] == bench_e2e.approx_label(4)]
    assert approx and all(0 < r["body/exact"] < 1 for r in approx)  # labelled, and computing less than exact
    assert all("fp16" in r["note"] for r in rows if r["section"] == "sampling" and r["provider"] == "published")


def test_enfe_matches_theory(quick_run):
    _, res, _ = quick_run
    sampling = [r for r in res["rows"] if r["section"] == "sampling"]
    assert {r["steps"] for r in sampling} == set(e2e_setup.PLANS["quick"].sampling_steps)
    for r in sampling:
        theory = r["steps"] * (1 - (1 - 1 / r["steps"]) ** r["L"])
        assert r["E-NFE theory"] == pytest.approx(theory)
        if r["cache"]:
            assert abs(r["E-NFE"] - theory) <= 0.05 * theory, r
        else:
            assert r["E-NFE"] == r["steps"]
        assert r["ms/eval"] == pytest.approx(r["wall_s"] * 1e3 * r["rows/eval"] / (r["E-NFE"] * r["samples"]))
        assert r["roofline ms/eval"] is None  # no peak FLOP rate on CPU


def test_plots(quick_run):
    pytest.importorskip("matplotlib")
    out, _, _ = quick_run
    for name in ("enfe_vs_steps.png", "sampling_speedup.png", "tokens_per_s_vs_batch.png"):
        assert (out / name).stat().st_size > 1000


def test_plots_skip_without_matplotlib(quick_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert make_plots(quick_run[1]["rows"], tmp_path) == []
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))


def test_out_of_memory_at_a_large_batch_is_the_limit_not_a_failure(monkeypatch):
    def runs(P, device, batch, L, steps):
        def call():
            if batch > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 60 GiB")
            return bench_e2e.SampleRun(torch.zeros(batch, L), 8.0, 0.01 * batch)
        return [("published", call)]

    monkeypatch.setattr(bench_e2e, "_batch_runs", runs)
    plan = e2e_setup.PLANS["quick"]
    rows = bench_e2e.bench_batch(None, torch.device("cpu"), "quick", plan, 32)
    sweep = [r for r in rows if r["section"] == "batch"]
    assert [r.get("limit") for r in sweep] == [None, None, "out of memory"] and not any("error" in r for r in sweep)
    (best,) = [r for r in rows if r["section"] == "best batch"]
    assert best["rows_in_flight"] in (2, 4) and best["batches tried"] == 3
