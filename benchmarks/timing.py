"""Shared timing helpers for the benchmarks: medians, device events, peak memory,
and the fwd / bwd / fwd+bwd rows of the memory-bound kernel benchmarks.

On CUDA ``triton.testing.do_bench`` (device events, warm-up, median); on CPU a
median of ``time.perf_counter`` over a few repeats (interpreter timings only
prove the benchmark runs, never speed).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device | str, warmup_ms: int = 25, rep_ms: int = 100,
              cpu_reps: int = 3) -> float:
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated above what was live before ``fn`` (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def allow_retain_graph_under_compile() -> None:
    """Compiled backwards donate buffers, which forbids retain_graph (the "bwd" call of ``grad_calls``)."""
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False


def _as_tuple(outs) -> tuple:
    return outs if isinstance(outs, tuple) else (outs,)


def grad_calls(fn: Callable, inputs: tuple) -> dict[str, Callable[[], object]]:
    """Closures ``{"fwd", "bwd", "fwd+bwd"}`` for ``outs = fn(*inputs)``, gradients to the inputs that
    require grad. Runs ``fn`` once here: "bwd" replays that graph (retain_graph) with random upstream
    gradients drawn once, "fwd+bwd" builds a fresh graph per call."""
    leaves = [t for t in inputs if t.requires_grad]

    def fwd():
        return fn(*inputs)

    outs = _as_tuple(fwd())
    grads = [torch.randn_like(o) for o in outs]

    def bwd():
        torch.autograd.grad(outs, leaves, grads, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(_as_tuple(fwd()), leaves, grads)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def bandwidth_rows(calls: dict[str, Callable[[], object]], device: torch.device, nbytes: Callable[[str], float],
                   cpu_reps: int = 3, **fields) -> list[dict]:
    """One row per mode of ``calls``: ``fields``, mode, ms (median), gbps (``nbytes(mode)`` over that
    time) and peak_mb (None off CUDA)."""
    rows = []
    for mode, call in calls.items():
        ms = median_ms(call, device, cpu_reps=cpu_reps)
        rows.append(dict(fields, mode=mode, ms=ms, gbps=nbytes(mode) / ms / 1e6, peak_mb=peak_memory_mb(call, device)))
    return rows


def bandwidth_table(rows: list[dict]) -> str:
    """Markdown table of ``bandwidth_rows`` rows (with op, shape, dtype and provider fields)."""
    lines = ["| op | shape | dtype | provider | mode | ms | GB/s | peak MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['provider']} | {r['mode']} | "
                     f"{r['ms']:.4f} | {r['gbps']:.1f} | {peak} |")
    return "\n".join(lines)


def bandwidth_main(run: Callable[[str, bool], list[dict]], description: str) -> None:
    """Command line of a ``bandwidth_rows`` benchmark: ``[--quick] [--device D]``; prints its table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (what the CPU runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if torch.cuda.is_available():
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(bandwidth_table(run(args.device, args.quick)))
