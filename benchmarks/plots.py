"""PNG plots of the end-to-end benchmark rows (bench_e2e.py).

- ``enfe_vs_steps.png``: measured E-NFE of the cached samplers against the theory N (1 - (1 - 1/N)^L);
- ``sampling_speedup.png``: samples/s of each sampler relative to the published sampler (its
  per-row cache), or to our reference sampler when the run had no published code;
- ``tokens_per_s_vs_batch.png``: forward tokens/s over the batch sweep, per provider.
One figure per file, one line per (size, provider). Without matplotlib nothing is drawn and a
message says so: plots never make a benchmark run fail.
"""
from __future__ import annotations

from pathlib import Path


def _series(rows, section, key_fn, x, y):
    """{label: ([x...], [y...])} sorted by x, for the rows of one section."""
    out: dict = {}
    for r in rows:
        if r.get("section") == section and r.get(y) is not None:
            xs, ys = out.setdefault(key_fn(r), ([], []))
            xs.append(r[x])
            ys.append(r[y])
    return {k: tuple(map(list, zip(*sorted(zip(*v))))) for k, v in out.items()}


def _sampler_label(r) -> str:
    return f"{r['size']} {r['provider']}" + ("" if r.get("cache") or "no-cache" in r["provider"] else " (no cache)")


def _speedup_key(rows) -> str:
    """The ratio column of the sampling plot: against the published sampler when it ran."""
    return "vs published" if any("vs published" in r for r in rows) else "vs reference"


def make_plots(rows: list[dict], out_dir) -> list[Path]:
    """Draw every plot the rows allow into out_dir; returns the files written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, ax, name, xlabel, ylabel, title):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    sampling = [r for r in rows if r.get("section") == "sampling"]
    if sampling:
        fig, ax = plt.subplots(figsize=(6, 4))
        cached = [r for r in sampling if r.get("cache")]
        for label, (xs, ys) in _series(cached, "sampling", _sampler_label, "steps", "E-NFE").items():
            ax.plot(xs, ys, "o-", label=label)
        for size, (xs, ys) in _series(sampling, "sampling", lambda r: r["size"], "steps", "E-NFE theory").items():
            L = next(r["L"] for r in sampling if r["size"] == size)
            ax.plot(xs, ys, "k--", alpha=0.6, label=f"theory N(1-(1-1/N)^L), L={L}")
        ax.plot(*(2 * [sorted({r["steps"] for r in sampling})]), ":", color="gray", label="no cache (NFE = N)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        save(fig, ax, "enfe_vs_steps.png", "steps N", "E-NFE per sample", "Evaluations per sample")

        fig, ax = plt.subplots(figsize=(6, 4))
        key = _speedup_key(sampling)
        for label, (xs, ys) in _series(sampling, "sampling", _sampler_label, "steps", key).items():
            ax.plot(xs, ys, "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        base = "the published sampler (cache)" if key == "vs published" else "our reference sampler (cache)"
        save(fig, ax, "sampling_speedup.png", "steps N", f"samples/s relative to {base}", "Sampling speedup")

    if any(r.get("section") == "forward" for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, (xs, ys) in _series(rows, "forward", lambda r: f"{r['size']} {r['provider']}", "B",
                                       "tokens/s").items():
            ax.plot(xs, ys, "o-", label=label)
        ax.set_xscale("log", base=2)
        save(fig, ax, "tokens_per_s_vs_batch.png", "batch size B", "forward tokens/s", "Forward throughput")
    return written
