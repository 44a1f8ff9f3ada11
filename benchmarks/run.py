"""Run every benchmark module side by side and print one markdown table per module.

    python -m benchmarks.run [--quick] [--only layer_norm,attention] [--out DIR]

Each ``benchmarks/bench_<name>.py`` exposes ``run(device, quick) -> list[dict]``. The modules, in
order: those that time a kernel (read from the table of kernels, ``radd_fast/kernels/registry.py``),
then the others (``OTHER_MODULES``).
Results go to ``DIR/results.json`` (every row, with the environment) plus
``DIR/summary.md``. A module that fails is
reported (with its traceback) and the command exits non-zero at the end, so one
broken benchmark neither hides the others nor passes silently.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from radd_fast.kernels.registry import KERNELS

# the benchmarks that time a kernel: the table's (radd_fast/kernels/registry.py), in its order, each once
KERNEL_MODULES = list(dict.fromkeys(k.benchmark for k in KERNELS.values()))
# the benchmarks that time no one kernel: a fusion choice, the sampler's cached attention, the whole model,
# the side-by-side suite
OTHER_MODULES = ["mlp_epilogue", "cached_attention", "model", "e2e"]
MODULES = KERNEL_MODULES + OTHER_MODULES


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def table_main(run, description: str, argv=None) -> None:
    """Command line of a benchmark module whose rows are not bandwidth rows: ``[--quick] [--device D]``,
    its rows printed as one markdown table."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (what the CPU runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    print(json.dumps(environment()))
    print(markdown_table(run(torch.device(args.device), args.quick)))


def environment() -> dict:
    env = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["driver"] = gpu_driver()
    return env


def gpu_driver() -> str | None:
    """The NVIDIA driver version (nvidia-smi), None where it cannot be asked."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU-friendly)")
    ap.add_argument("--only", default="", help="comma-separated module names (default: all)")
    ap.add_argument("--out", default="benchmarks/out", help="folder for JSON and the markdown summary")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or MODULES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    summary, failed = [f"# Benchmarks ({'quick' if args.quick else 'full'})\n", f"`{json.dumps(env)}`\n"], []
    results = {"env": env, "quick": args.quick, "modules": {}}
    for name in names:
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            rows = module.run(torch.device(args.device), args.quick)
        except Exception:  # report and continue: the other benchmarks still run; exit code says it failed
            failed.append(name)
            summary.append(f"## {name}: FAILED\n```\n{traceback.format_exc()}```\n")
            print(summary[-1], flush=True)
            continue
        results["modules"][name] = rows
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        summary.append(f"## {name} ({time.perf_counter() - t0:.0f} s)\n\n" + markdown_table(rows))
        print(summary[-1], flush=True)
    (out / "summary.md").write_text("\n".join(summary))
    if failed:
        print(f"FAILED benchmarks: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
