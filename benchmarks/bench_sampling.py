"""Sampling: the published sampler (reference) vs the fast engine, over the number of steps.

    python -m benchmarks.bench_sampling [--quick] [--device cuda] [--out benchmarks/out]

Reference = ``DiffusionSampler`` (published algorithm: per step a full forward of the
changed rows with the reference model backend, a full log-softmax, the direct
strategy over every masked position). Fast = ``generate`` (schedule up front, full
static batches, CUDA graphs, head only at revealed positions, fused kernel) on the
fast model backend. Columns: wall seconds, E-NFE measured and in theory
N (1 - (1 - 1/N)^L), samples/s, speedup, the engine's time per evaluation against a
bare ``model.hidden`` forward of the same batch.

Full (GPU): RADD-small shapes (d 768, 12 blocks, V 50258, L 1024), random weights
(no hub access needed), bf16, 64 samples, steps {64, 256, 1024, 4096}; the reference
runs up to 1024 steps (set RADD_BENCH_REF_MAX_STEPS to go further: ~4 min at 4096 on
an H100). Quick: a tiny model, steps {16, 64}, 4 samples (proves it runs, not speed).
"""
from __future__ import annotations

import os
import time

import torch

from benchmarks.timing import median_ms, sync
from radd_fast import PRESETS, RADD, ModelConfig, RADDConfig, get_noise
from radd_fast.sampling import DiffusionSampler, expected_enfe, generate


def _model(quick: bool, device, backend: str) -> RADD:
    if quick:
        cfg = RADDConfig(tokens=255, model=ModelConfig(hidden_size=64, n_heads=4, n_blocks=2, length=32, name="q"))
    else:
        cfg = RADDConfig(tokens=50257, model=PRESETS["small"])
    torch.manual_seed(0)
    model = RADD(cfg, backend=backend, dtype=None if quick else "bf16")
    with torch.no_grad():  # the published init zero-inits the head: samples would be uniform
        model.output_layer.linear.weight.normal_(0, 0.02)
        model.output_layer.norm_final.bias.zero_()
    return model.to(device).eval()


def _fast_backend(quick: bool, device) -> tuple[RADD, str]:
    if device.type != "cuda":
        return _model(quick, device, "reference"), "reference"
    try:
        model = _model(quick, device, "fast")
        with torch.no_grad():
            model.hidden(torch.zeros(1, model.length, dtype=torch.int64, device=device))
        return model, "fast"
    except Exception as e:  # noqa: BLE001 - the row records which backend ran and why
        print(f"fast model backend unavailable ({type(e).__name__}: {e}); the engine runs on the reference backend")
        return _model(quick, device, "reference"), "reference (fast failed)"


def run(device: torch.device, quick: bool) -> list[dict]:
    device = torch.device(device)
    steps_list = [16, 64] if quick else [64, 256, 1024, 4096]
    n = 4 if quick else 64
    ref_max = int(os.environ.get("RADD_BENCH_REF_MAX_STEPS", 64 if quick else 1024))
    ref_model = _model(quick, device, "reference")
    fast_model, fast_backend = _fast_backend(quick, device)
    noise = get_noise(ref_model.config).to(device)
    L, V = ref_model.length, ref_model.vocab_size
    with torch.no_grad():
        x = torch.randint(0, V - 1, (n, L), device=device)
        hidden_ms = median_ms(lambda: fast_model.hidden(x), device)
    generate(fast_model, noise, n, L, 8, batch_size=n, seed=0, progress=False)  # warm-up: kernels compile
    rows = []
    for steps in steps_list:
        theory = expected_enfe(steps, L)
        sync(device)
        t0 = time.perf_counter()
        _, stats = generate(fast_model, noise, n, L, steps, batch_size=n, seed=steps, progress=False)
        sync(device)
        fast_s = time.perf_counter() - t0
        row = {"steps": steps, "samples": n, "length": L, "fast_backend": fast_backend, "fast_s": fast_s,
               "fast_enfe": stats.enfe_mean, "enfe_theory": theory, "fast_samples_per_s": n / fast_s,
               "fast_ms_per_eval": 1e3 * fast_s / max(stats.evaluations, 1), "hidden_ms": hidden_ms,
               "cuda_graphs": stats.cuda_graphs}
        row["eval_over_hidden"] = row["fast_ms_per_eval"] / hidden_ms
        if steps <= ref_max:
            sampler = DiffusionSampler("tweedie", ref_model, noise, (n, L), V, "direct", seed=steps)
            sync(device)
            t0 = time.perf_counter()
            sampler.sample(steps)
            sync(device)
            ref_s = time.perf_counter() - t0
            row.update(ref_s=ref_s, ref_enfe=sampler.update_cnt / n, ref_samples_per_s=n / ref_s,
                       speedup=ref_s / fast_s)
            del sampler
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    return rows


def plot(rows: list[dict], folder) -> None:
    """E-NFE vs steps with the theory curve, and the speedup vs steps (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["steps"] for r in rows]
    L = rows[0]["length"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    grid = sorted({int(s) for s in torch.logspace(0, torch.log10(torch.tensor(max(steps) * 1.0)), 60).tolist()})
    a.plot(grid, [expected_enfe(s, L) for s in grid], "k-", label="N (1 - (1 - 1/N)^L)")
    a.plot(steps, [r["fast_enfe"] for r in rows], "o", label="fast engine")
    ref = [r for r in rows if "ref_enfe" in r]
    a.plot([r["steps"] for r in ref], [r["ref_enfe"] for r in ref], "x", label="reference")
    a.set(xscale="log", xlabel="steps N", ylabel="E-NFE per sample", title=f"E-NFE, L = {L}")
    a.legend()
    b.plot([r["steps"] for r in ref], [r["speedup"] for r in ref], "o-")
    b.set(xscale="log", xlabel="steps N", ylabel="speedup (reference s / fast s)", title="fast engine speedup")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "sampling.png"), dpi=120)


if __name__ == "__main__":
    import argparse
    import json

    from benchmarks.run import environment, markdown_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    result = run(torch.device(args.device), args.quick)
    os.makedirs(args.out, exist_ok=True)
    print(f"`{json.dumps(environment())}`\n\n" + markdown_table(result))
    with open(os.path.join(args.out, "sampling.json"), "w") as fh:
        json.dump({"env": environment(), "rows": result}, fh, indent=1)
    try:
        plot(result, args.out)
    except ImportError:
        print("matplotlib not installed: no plots")
