"""The summary that benchmarks/gpu_check prints last and writes as OUT/summary.md.

    python -m benchmarks.gpu_summary OUT_DIR

Reads OUT/env.txt, OUT/tests.log, OUT/status.txt (one ``step: exit code`` per line), OUT/e2e/e2e.json
and OUT/micro/results.json, whichever exist, and prints: the environment, each step's exit code,
pytest's closing line, the side-by-side tables (the columns that carry the comparison) and the
micro-benchmark rows with derived figures. A missing file is reported as missing, never fatal:
the summary of a run cut short says what it has.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .run import markdown_table

# The columns of each e2e section worth a line in the summary (the full tables are in e2e/e2e.md).
E2E_COLUMNS = {
    "sampling": ("size", "provider", "steps", "samples", "wall_s", "capture_s", "E-NFE", "samples/s", "ms/eval",
                 "roofline ms/eval", "x roofline", "body/exact", "vs published", "vs reference", "note"),
    "batch": ("size", "provider", "rows_in_flight", "steps", "samples/s", "peak_MB", "limit"),
    "best batch": ("size", "provider", "rows_in_flight", "samples/s", "batches tried", "vs published"),
    "train": ("size", "provider", "dtype", "B", "T", "ms", "tokens/s", "MFU", "peak_MB", "warmup_s", "vs published",
              "vs reference"),
    "eval": ("size", "provider", "B", "L", "mc_timesteps", "seq*timesteps/s", "loss (nats/seq)", "peak_MB",
             "vs published", "vs reference"),
    "forward": ("size", "provider", "dtype", "B", "ms", "tokens/s", "TFLOP/s", "peak_MB", "vs published",
                "vs reference"),
}
DERIVED = ("speedup", "gb/s", "gbps", "tflop/s", "tflops", "e-nfe", "tokens/s")


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def pytest_line(log: str | None) -> str:
    """pytest's closing line ('N passed, M skipped in S s'), or what was found instead."""
    if log is None:
        return "no tests.log"
    lines = [ln.strip("= ").strip() for ln in log.splitlines() if re.search(r"\b(passed|failed|error|tests? collected)\b", ln)]
    return lines[-1] if lines else "no pytest summary line (cut short?)"


def e2e_tables(res: dict) -> str:
    rows = res.get("rows", [])
    out = []
    for section in dict.fromkeys(r["section"] for r in rows):
        cols = E2E_COLUMNS.get(section)
        part = [{c: r[c] for c in (cols or r) if c in r and c != "section"} for r in rows if r["section"] == section]
        out.append(f"### e2e {section}\n\n" + markdown_table(part))
    return "\n".join(out) or "(no e2e rows)\n"


# The open issues' GPU targets (RADD-small, the "small" rows), read off the side-by-side rows.
TARGET_SIZE = "small"


def _rows(rows: list[dict], section: str, provider: str, steps: int | None = None) -> list[dict]:
    return [r for r in rows if r.get("section") == section and r.get("provider") == provider and "error" not in r
            and r.get("size") == TARGET_SIZE and (steps is None or r.get("steps") == steps)]


def _column(section: str, provider: str, column: str, steps: int | None = None, best=max):
    """A measure: the best value of ``column`` over the matching rows (None when there are none)."""
    def measure(rows):
        values = [r[column] for r in _rows(rows, section, provider, steps) if isinstance(r.get(column), (int, float))]
        return best(values) if values else None
    return measure


def _approx_rows(rows: list[dict]) -> list[dict]:
    """The approximate sampler's rows (any refresh period) at 1024 steps."""
    return [r for r in rows if r.get("section") == "sampling" and str(r.get("provider", "")).startswith("fast approx")
            and r.get("steps") == 1024 and r.get("size") == TARGET_SIZE and "error" not in r]


def _approx_vs_exact(rows: list[dict]) -> float | None:
    """The approximate sampler against the exact engine at 1024 steps, per-sample time."""
    exact, approx = _rows(rows, "sampling", "fast", 1024), _approx_rows(rows)
    if not exact or not approx:
        return None
    per_sample = lambda r: r["wall_s"] / r["samples"]
    return max(per_sample(exact[0]) / per_sample(r) for r in approx)


def _approx_vs_published(rows: list[dict]) -> float | None:
    values = [r["vs published"] for r in _approx_rows(rows) if "vs published" in r]
    return max(values) if values else None


def _train_peak_ratio(rows: list[dict]) -> float | None:
    fast, pub = _rows(rows, "train", "fast"), _rows(rows, "train", "published")
    if not fast or not pub or not fast[0].get("peak_MB") or not pub[0].get("peak_MB"):
        return None
    return fast[0]["peak_MB"] / pub[0]["peak_MB"]


# (issue, target, measure(rows) -> value or None, verdict(value) -> bool)
TARGETS = (
    ("13", "exact engine >= 6x the published sampler, 1024 steps", _column("sampling", "fast", "vs published", 1024),
     lambda v: v >= 6),
    ("13", "exact engine >= 10x the published sampler, 4096 steps", _column("sampling", "fast", "vs published", 4096),
     lambda v: v >= 10),
    ("13", "engine evaluation <= 1.8x its FLOP roofline, 1024 steps",
     _column("sampling", "fast", "x roofline", 1024, best=min), lambda v: v <= 1.8),
    ("13", "best-batch samples/s >= 8x the published sampler's", _column("best batch", "fast", "vs published"),
     lambda v: v >= 8),
    ("14", "training step >= 2x the published tokens/s", _column("train", "fast", "vs published"), lambda v: v >= 2),
    ("14", "training >= 450K tokens/s per GPU", _column("train", "fast", "tokens/s"), lambda v: v >= 450e3),
    ("14", "training MFU >= 45% (executed FLOPs)", _column("train", "fast", "MFU"), lambda v: v >= 0.45),
    ("14", "training peak memory <= the published step's (ratio)", _train_peak_ratio, lambda v: v <= 1),
    ("15", "approximate sampler >= 3x the exact engine, 1024 steps", _approx_vs_exact, lambda v: v >= 3),
    ("15", "approximate sampler >= 20x the published sampler, 1024 steps", _approx_vs_published, lambda v: v >= 20),
)


def target_lines(res) -> str:
    """One line per target of the open issues: met / missed with the measured value, or not measured."""
    rows = res.get("rows", []) if isinstance(res, dict) else []
    lines = [f"RADD-small rows only (size {TARGET_SIZE!r}); the approximate sampler's KL is measured by "
             "benchmarks/bench_cache_quality.py, not here.", "", "| issue | target | measured | verdict |",
             "|---|---|---|---|"]
    for issue, text, measure, ok in TARGETS:
        value = measure(rows)
        verdict = "not measured" if value is None else ("met" if ok(value) else "missed")
        lines.append(f"| {issue} | {text} | {'-' if value is None else f'{value:.3g}'} | {verdict} |")
    return "\n".join(lines) + "\n"


def micro_tables(res: dict) -> str:
    out = []
    for name, rows in res.get("modules", {}).items():
        keep = [r for r in rows if any(k.lower() in DERIVED for k in r)] or rows
        out.append(f"### {name} ({len(rows)} rows; derived figures)\n\n" + markdown_table(keep[:12]))
    return "\n".join(out) or "(no micro-benchmark rows)\n"


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return e


def summary(out: Path) -> str:
    parts = ["# gpu_check summary", "", "```", (_read(out / "env.txt") or "no env.txt").strip(), "```", ""]
    status = _read(out / "status.txt") or ""
    parts += [f"- {line}" for line in status.splitlines() if line.strip()]
    parts += [f"- pytest: {pytest_line(_read(out / 'tests.log'))}", ""]
    parts += ["## Targets of the open issues", "", target_lines(_json(out / "e2e" / "e2e.json"))]
    for title, path, render in (("Side by side (benchmarks/bench_e2e.py)", out / "e2e" / "e2e.json", e2e_tables),
                                ("Kernel micro-benchmarks (benchmarks/run.py)", out / "micro" / "results.json",
                                 micro_tables)):
        res = _json(path)
        body = render(res) if isinstance(res, dict) else f"no {path.relative_to(out)}: {res}\n"
        parts += [f"## {title}", "", body]
    return "\n".join(parts)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.gpu_summary OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    text = summary(out)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
