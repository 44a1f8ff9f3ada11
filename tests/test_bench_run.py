"""The benchmark runner works at tiny sizes on CPU and writes its table and JSON."""
import json

import pytest
import torch

from benchmarks import bench_mlp_epilogue, gpu_summary
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
