"""The benchmark runner works at tiny sizes on CPU and writes its table and JSON."""
import json

import pytest
import torch

from benchmarks import bench_cached_attention, bench_mlp_epilogue, gpu_summary
from benchmarks import run as bench_run


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the runner is exercised by benchmarks/gpu_check")
def test_quick_benchmarks_print_tables_and_write_json(tmp_path, capsys):
    code = bench_run.main(["--quick", "--only", "layer_norm,rotary,linear_log_softmax,model", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("layer_norm", "rotary", "linear_log_softmax", "model"):
        assert f"## {name}" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["modules"]) == {"layer_norm", "rotary", "linear_log_softmax", "model"}
    model_rows = results["modules"]["model"]
    assert {r["provider"] for r in model_rows} == {"reference", "fast"}
    assert all(r["ms"] > 0 and r["tokens/s"] > 0 for r in model_rows)
    assert (tmp_path / "summary.md").read_text().count("|---") >= 4


def test_mlp_epilogue_benchmark_compares_three_providers_with_their_errors():
    """The epilogue-fusion choice of issue 13 is a measurement: every provider's row, and its error
    against fp32 (on the CPU in fp32: eager is the reference itself, compile within rounding)."""
    rows = {r["provider"]: r for r in bench_mlp_epilogue.run(torch.device("cpu"), quick=True)}
    assert set(rows) == {"eager", "addmm_activation", "compile"}
    assert rows["eager"]["max_err"] == 0.0 and rows["eager"]["speedup"] == 1.0
    assert rows["compile"]["max_err"] < 1e-5 and all(r["ms"] > 0 for r in rows.values())


def test_cached_attention_benchmark_agrees_with_float64():
    """The approximate sampler's attention providers all compute the same attention (fp32 on CPU)."""
    rows = bench_cached_attention.run(torch.device("cpu"), quick=True)
    assert {r["provider"] for r in rows} == {"sdpa views", "sdpa contiguous", "matmul"}
    assert all(r["max_err"] < 1e-5 and r["gbps"] > 0 for r in rows)


def test_failing_benchmark_is_reported_and_fails_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_run, "MODULES", ["does_not_exist"])
    assert bench_run.main(["--quick", "--out", str(tmp_path)]) == 1
    assert "does_not_exist: FAILED" in capsys.readouterr().out


def test_markdown_table_marks_missing_values():
    table = bench_run.markdown_table([{"a": 1.5, "b": None}, {"a": 2.0}])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.5 | - |", "| 2 |  |"]


def test_gpu_summary_says_what_is_missing_and_reads_pytest(tmp_path, capsys):
    assert gpu_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "no env.txt" in text and "pytest: no tests.log" in text and "no e2e/e2e.json" in text
    assert gpu_summary.pytest_line("x\n===== 3 passed, 1 skipped in 2.01s =====\n") == "3 passed, 1 skipped in 2.01s"
    assert gpu_summary.pytest_line("collecting\n") == "no pytest summary line (cut short?)"


def test_gpu_summary_states_every_target_met_missed_or_not_measured():
    rows = [
        {"section": "sampling", "size": "small", "provider": "fast", "steps": 1024, "samples": 64, "wall_s": 10.0,
         "vs published": 6.5, "x roofline": 2.1},
        {"section": "sampling", "size": "small", "provider": "fast approx (refresh every 4)", "steps": 1024,
         "samples": 64, "wall_s": 2.5, "vs published": 26.0},
        {"section": "sampling", "size": "quick", "provider": "fast", "steps": 4096, "samples": 64, "wall_s": 1.0,
         "vs published": 50.0},  # a dry-run row: never a verdict
        {"section": "train", "size": "small", "provider": "fast", "tokens/s": 500e3, "MFU": 0.40, "peak_MB": 900,
         "vs published": 2.5},
        {"section": "train", "size": "small", "provider": "published", "tokens/s": 200e3, "peak_MB": 1000},
    ]
    table = gpu_summary.target_lines({"rows": rows})
    verdicts = {line.split(" | ")[1]: line.split(" | ")[-1].rstrip(" |") for line in table.splitlines()
                if line.startswith("| 1")}
    assert verdicts["exact engine >= 6x the published sampler, 1024 steps"] == "met"
    assert verdicts["exact engine >= 10x the published sampler, 4096 steps"] == "not measured"
    assert verdicts["engine evaluation <= 1.8x its FLOP roofline, 1024 steps"] == "missed"
    assert verdicts["training >= 450K tokens/s per GPU"] == "met"
    assert verdicts["training MFU >= 45% (executed FLOPs)"] == "missed"
    assert verdicts["training peak memory <= the published step's (ratio)"] == "met"
    assert verdicts["approximate sampler >= 3x the exact engine, 1024 steps"] == "met"  # 4x per sample
    assert verdicts["approximate sampler >= 20x the published sampler, 1024 steps"] == "met"
    assert verdicts["best-batch samples/s >= 8x the published sampler's"] == "not measured"
