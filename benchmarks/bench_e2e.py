"""End-to-end suite: the published computation ("reference") vs radd-fast ("fast"), side by side.

    python -m benchmarks.bench_e2e [--quick] [--out DIR] [--sizes small,medium] [--sections ...] [--compile]

Sections (each row names its section, size and provider):
- forward: ``model(x)`` (published output, full [B, T, V]) over a batch sweep; tokens/s, TFLOP/s.
- train: one optimizer step of lambda_DCE. reference = eager, full-logits loss (``model(x)`` then
  gather, as published), fp16 autocast + GradScaler; fast = fast backend + fused masked loss
  (``radd_fast.losses``) + bf16 (+ torch.compile of the blocks with --compile). tokens/s, MFU, peak MB.
- sampling: tweedie + direct at steps {64, 256, 1024, 4096}: reference without cache (a full
  forward of every row each step), reference with the published per-row cache (``DiffusionSampler``),
  fast engine (``radd_fast.sampling.generate``). Wall time, E-NFE (+ theory N(1-(1-1/N)^L)), samples/s.
- eval: zero-shot lambda_DCE on one [B, L] batch with a few Monte Carlo timesteps: published loop
  (full logits, one forward per draw), ``evaluate_ppl`` reference engine, ``evaluate_ppl`` fast engine
  (fused loss, bf16, draws batched). Throughput in sequences x timesteps / s.

Writes ``e2e.json`` (environment, settings, rows), ``e2e.md`` (one table per section) and PNG plots
(benchmarks/plots.py; skipped with a message without matplotlib) into --out.
Sizes: quick = d 32, 1 block, L 32, 256 tokens (CPU, about a minute); small = d 768 x 12 blocks, medium =
d 1024 x 24 blocks, both V = 50258, L = 1024 (GPU). FLOPs per token: ``radd_fast.flops`` (the project's one
count); a training step is 3x forward. MFU = achieved / the card's dense bf16 peak.
On CPU the fast provider uses the fast backend's PyTorch fallbacks (the Triton interpreter is
switched off for the run: interpreted kernels take minutes and time nothing real).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from radd_fast import PRESETS, RADD, RADDConfig, get_noise
from radd_fast.config import ModelConfig
from radd_fast.evaluation import evaluate_ppl
from radd_fast.flops import forward_flops_per_token, peak_flops
from radd_fast.losses import get_loss_fn
from radd_fast.losses.masking import mask_with_prob
from radd_fast.losses.time_samplers import decoupled
from radd_fast.sampling import DiffusionSampler, expected_enfe, generate, update_rates

from .run import environment, markdown_table
from .timing import median_ms, sync

SECTIONS = ("forward", "train", "sampling", "eval")


@dataclass(frozen=True)
class Plan:
    """Workload of one size: batch sweep of the forward, training batch / steps, sampling steps and
    sample counts (reference samplers, fast engine), eval batch and Monte Carlo timesteps."""

    forward_batches: tuple
    train_batch: int
    train_steps: int
    sampling_steps: tuple
    ref_samples: int
    fast_samples: int
    eval_batch: int
    eval_mc: int


PLANS = {
    "quick": Plan((2, 8), 4, 2, (8, 32, 128), 16, 64, 4, 4),
    "small": Plan((1, 4, 8, 16), 8, 5, (64, 256, 1024, 4096), 4, 16, 16, 16),
    "medium": Plan((4, 8), 4, 5, (64, 256, 1024, 4096), 4, 16, 16, 16),
}


def size_config(size: str) -> RADDConfig:
    if size == "quick":
        return RADDConfig(tokens=256, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=32,
                                                        dropout=0.0, name="quick"))
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; expected quick or one of {sorted(PRESETS)}")
    return RADDConfig(tokens=50257, model=ModelConfig(**{**PRESETS[size].__dict__, "dropout": 0.02}))


def providers(cfg: RADDConfig, device: torch.device, compile: bool = False) -> dict:
    """reference: published computation and precision (fp16 autocast on CUDA); fast: fast backend, bf16.
    Same weights (a random head: a fresh model's zero head would make every output uniform)."""
    torch.manual_seed(0)
    ref = RADD(cfg).to(device)
    with torch.no_grad():
        torch.nn.init.normal_(ref.output_layer.linear.weight, std=0.02)
    cuda = device.type == "cuda"
    ref.set_compute_dtype(torch.float16 if cuda else torch.float32)
    fast = RADD(cfg, backend="fast").to(device).set_compute_dtype(torch.bfloat16 if cuda else torch.float32)
    fast.load_state_dict(ref.state_dict())
    out = {"reference": ref, "fast": fast}
    if compile:
        comp = RADD(cfg, backend="fast").to(device).set_compute_dtype(fast.compute_dtype)
        comp.load_state_dict(ref.state_dict())
        comp.validate_inputs = False  # its range check syncs (a graph break)
        # The body has static [B, T] shapes; the loss's masked-row gather and fused head stay eager.
        comp.hidden = torch.compile(comp.hidden)
        out["fast+compile"] = comp
    return out


def _reset_peak(device) -> int:
    """Start a peak-memory window; returns the bytes allocated now (the baseline)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_mb(device, before: int) -> float | None:
    """Peak MB allocated above the baseline since ``_reset_peak`` (CUDA only)."""
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None


def _timed(fn, device, reps: int) -> float:
    """Mean seconds of fn over reps runs (after one warm-up), synchronised."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


# -- forward -------------------------------------------------------------------------------------------
def bench_forward(models: dict, device, size: str, batches: tuple, T: int) -> list[dict]:
    rows = []
    V = models["reference"].vocab_size
    for B in batches:
        x = torch.randint(0, V - 1, (B, T), device=device)
        base = None
        for name, model in models.items():
            model.eval()

            def fwd():
                with torch.no_grad():
                    return model(x)

            before = _reset_peak(device)
            ms = median_ms(fwd, device)
            base = base or ms
            rows.append({"section": "forward", "size": size, "provider": name, "B": B, "T": T, "ms": ms,
                         "tokens/s": B * T / ms * 1e3,
                         "TFLOP/s": forward_flops_per_token(model, T) * B * T / ms / 1e9,
                         "peak_MB": _peak_mb(device, before), "speedup": base / ms})
    return rows


# -- training step -------------------------------------------------------------------------------------
def published_lambda_dce(model: RADD, batch: torch.Tensor) -> torch.Tensor:
    """The published loss computation: full [B, T, V] log-probs from ``model(x)``, gather, mask, sum / lam."""
    lam = decoupled(batch.shape[0], batch.device)
    perturbed = mask_with_prob(batch, lam, model.mask_id)
    logp = model(perturbed).gather(-1, batch[..., None]).squeeze(-1)  # [B, T]
    masked = perturbed == model.mask_id
    return -(logp.double() * masked).sum(-1) / lam.double()


def _train_step(model, loss_fn, opt, scaler, x):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    return step


def bench_train(models: dict, device, size: str, B: int, T: int, steps: int) -> list[dict]:
    """AdamW steps (published hyper-parameters, grad clip 1.0) of lambda_DCE on a fixed batch."""
    rows, base = [], None
    cuda = device.type == "cuda"
    for name, model in models.items():
        model.train()
        noise = get_noise(model.config).to(device)
        fused = get_loss_fn(noise, model.vocab_size, train=True, loss_type="lambda_DCE")
        loss_fn = published_lambda_dce if name == "reference" else fused
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and model.compute_dtype == torch.float16)
        x = torch.randint(0, model.vocab_size - 1, (B, T), device=device)
        before = _reset_peak(device)
        sec = _timed(_train_step(model, loss_fn, opt, scaler, x), device, steps)
        peak = _peak_mb(device, before)
        model.zero_grad(set_to_none=True)
        opt = None  # free the optimizer state before the next provider
        base = base or sec
        flops = 3 * forward_flops_per_token(model, T) * B * T
        pf = peak_flops(device)
        rows.append({"section": "train", "size": size, "provider": name, "B": B, "T": T,
                     "dtype": str(model.compute_dtype).replace("torch.", ""), "ms": sec * 1e3,
                     "tokens/s": B * T / sec, "MFU": flops / sec / pf if pf else None, "peak_MB": peak,
                     "speedup": base / sec})
        model.eval()
    return rows


# -- sampling ------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_without_cache(model: RADD, noise, num: int, L: int, steps: int, generator) -> torch.Tensor:
    """tweedie + direct with a full forward of every row at every step (no cache): NFE = steps."""
    device = model.device
    rates = update_rates(noise, steps, "tweedie", device=device)
    x = torch.full((num, L), model.mask_id, dtype=torch.long, device=device)
    for i in range(steps):
        logp = model(x)[..., :model.mask_id]
        masked = x == model.mask_id
        rate = rates[i].float()
        scores = torch.cat([logp[masked] + rate.log(), torch.log1p(-rate).expand(int(masked.sum()), 1)], -1)
        u = torch.rand(scores.shape, device=device, generator=generator).clamp_min(1e-20)
        x[masked] = (scores - (-u.log()).log()).argmax(-1)
    return x


def bench_sampling(models: dict, device, size: str, steps_list: tuple, L: int, num_ref: int,
                   num_fast: int) -> list[dict]:
    ref, fast = models["reference"], models["fast"]
    noise = get_noise(ref.config).to(device)
    ref.eval()
    fast.eval()
    rows = []
    for steps in steps_list:
        g = torch.Generator(device=device).manual_seed(steps)
        theory = expected_enfe(steps, L)
        sync(device)
        t0 = time.perf_counter()
        sample_without_cache(ref, noise, num_ref, L, steps, g)
        sync(device)
        t_nc = time.perf_counter() - t0
        sampler = DiffusionSampler("tweedie", ref, noise, (num_ref, L), ref.vocab_size, "direct", seed=steps)
        t0 = time.perf_counter()
        sampler.sample(steps)
        sync(device)
        t_c = time.perf_counter() - t0
        generate(fast, noise, min(num_fast, 8), L, steps, seed=0, progress=False)  # warm-up (graphs, kernels)
        _, stats = generate(fast, noise, num_fast, L, steps, seed=steps, progress=False)
        common = {"section": "sampling", "size": size, "steps": steps, "L": L, "E-NFE theory": theory}
        for provider, cache, num, wall, enfe in (
                ("reference", False, num_ref, t_nc, float(steps)),
                ("reference", True, num_ref, t_c, sampler.update_cnt / num_ref),
                ("fast", True, num_fast, stats.wall_time, stats.enfe_mean)):
            rows.append({**common, "provider": provider, "cache": cache, "samples": num, "wall_s": wall,
                         "E-NFE": enfe, "samples/s": num / wall, "speedup": (num / wall) / (num_ref / t_nc)})
    return rows


# -- zero-shot evaluation ------------------------------------------------------------------------------
def bench_eval(models: dict, device, size: str, B: int, L: int, mc: int) -> list[dict]:
    ref = models["reference"]
    noise = get_noise(ref.config).to(device)
    x = torch.randint(0, ref.vocab_size - 1, (B, L), device=device)
    ref.eval()

    @torch.no_grad()
    def published():
        return sum(published_lambda_dce(ref, x).mean() for _ in range(mc)) / mc

    def engine(model):
        return lambda: evaluate_ppl(model, noise, [x], "lambda_DCE", mc, progress=False)

    runs = [("published loop", published), ("reference engine", engine(ref))]
    runs += [(f"{name} engine", engine(m)) for name, m in models.items() if name != "reference"]
    rows, base = [], None
    for name, fn in runs:
        before = _reset_peak(device)
        sec = _timed(fn, device, reps=2 if device.type == "cuda" else 1)
        base = base or sec
        rows.append({"section": "eval", "size": size, "provider": name, "B": B, "L": L, "mc_timesteps": mc,
                     "s": sec, "seq*timesteps/s": B * mc / sec, "tokens/s": B * L * mc / sec,
                     "peak_MB": _peak_mb(device, before), "speedup": base / sec})
    return rows


# -- driver --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cpu_settings(device: torch.device):
    """On CPU: the fast backend's PyTorch fallbacks instead of the Triton interpreter, and one thread
    (a shared CPU makes multi-threaded timings of tiny ops erratic). Restored afterwards."""
    if device.type == "cuda":
        yield
        return
    old_env, old_threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


def run(device: torch.device, quick: bool, sizes=None, sections=SECTIONS, steps=None, compile: bool = False,
        eval_mc: int | None = None) -> list[dict]:
    """Every section for every size; returns one flat list of rows (the benchmarks.run contract).
    Without CUDA only the quick size runs. Default sizes: quick, or small on a GPU (about two
    minutes, what benchmarks.run / gpu_check can afford); the CLI adds medium."""
    device = torch.device(device)
    quick = quick or device.type != "cuda"
    sizes = list(sizes or (["quick"] if quick else ["small"]))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; expected some of {SECTIONS}")
    rows = []
    with _cpu_settings(device):
        for size in sizes:
            cfg = size_config(size)
            plan = PLANS[size]
            plan = replace(plan, sampling_steps=tuple(steps or plan.sampling_steps), eval_mc=eval_mc or plan.eval_mc)
            L = cfg.model.length
            models = providers(cfg, device, compile)
            if "forward" in sections:
                rows += bench_forward(models, device, size, plan.forward_batches, L)
            if "train" in sections:
                rows += bench_train(models, device, size, plan.train_batch, L, plan.train_steps)
            if "sampling" in sections:
                rows += bench_sampling(models, device, size, plan.sampling_steps, L, plan.ref_samples,
                                       plan.fast_samples)
            if "eval" in sections:
                rows += bench_eval(models, device, size, plan.eval_batch, L, plan.eval_mc)
            del models
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict]) -> str:
    out = []
    for section in dict.fromkeys(r["section"] for r in rows):
        part = [{k: v for k, v in r.items() if k != "section"} for r in rows if r["section"] == section]
        out.append(f"## {section}\n\n" + markdown_table(part))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU-friendly, seconds)")
    ap.add_argument("--out", default="benchmarks/out/e2e", help="folder for e2e.json, e2e.md and the plots")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated: quick, small, medium (default: quick with --quick or on CPU, "
                         "else small,medium)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--steps", default=None, help="sampling steps, comma-separated (default 64,256,1024,4096)")
    ap.add_argument("--eval_mc", type=int, default=None, help="Monte Carlo timesteps in the eval section")
    ap.add_argument("--compile", action="store_true", help="add a fast+torch.compile provider")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    split = lambda s: [v for v in s.split(",") if v] if s else None
    steps = [int(s) for s in split(args.steps)] if args.steps else None
    quick = args.quick or device.type != "cuda"
    sizes = split(args.sizes) or (["quick"] if quick else ["small", "medium"])
    t0 = time.perf_counter()
    rows = run(device, quick, sizes, split(args.sections), steps, args.compile, args.eval_mc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()}
    (out / "e2e.json").write_text(json.dumps({"env": environment(), "settings": settings, "rows": rows},
                                             indent=1, default=str))
    table = markdown(rows)
    (out / "e2e.md").write_text(f"# End-to-end benchmark\n\n`{json.dumps(environment())}`\n\n{table}")
    print(table)
    from .plots import make_plots

    for path in make_plots(rows, out):
        print(f"plot: {path}")
    print(f"results in {out} ({time.perf_counter() - t0:.0f} s)")
    return 0 if all(math.isfinite(r.get("speedup", 0.0)) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
