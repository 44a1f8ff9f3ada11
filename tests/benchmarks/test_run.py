"""The benchmark runner (benchmarks/run.py) works at tiny sizes on CPU and writes its table and JSON;
a failing benchmark is reported and fails the run."""
import json

import pytest
import torch

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


def test_failing_benchmark_is_reported_and_fails_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_run, "MODULES", ["does_not_exist"])
    assert bench_run.main(["--quick", "--out", str(tmp_path)]) == 1
    assert "does_not_exist: FAILED" in capsys.readouterr().out


def test_markdown_table_marks_missing_values():
    table = bench_run.markdown_table([{"a": 1.5, "b": None}, {"a": 2.0}])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.5 | - |", "| 2 |  |"]
