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
                 "roofline ms/eval", "x roofline", "vs published", "vs reference", "note"),
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
