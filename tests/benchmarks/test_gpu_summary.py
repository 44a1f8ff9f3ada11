"""The GPU run's summary (benchmarks/gpu_summary.py): what is missing, the pytest line, and a verdict
for every target (met, missed or not measured)."""
from benchmarks import gpu_summary


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
