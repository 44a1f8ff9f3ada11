"""End-to-end suite: the published code, our reference and radd-fast, side by side in one process.

    python -m benchmarks.bench_e2e [--quick] [--published PATH] [--out DIR] [--sizes small,medium]
                                   [--sections sampling,batch,train,eval,forward] [--steps 1024,4096] [--compile]
                                   [--refresh_every 4]

Providers (docs/BENCHMARKS.md): ``published`` = the published code itself, imported from PATH
(``--published`` or ``RADD_PUBLISHED``; benchmarks/published.py); ``reference`` = our plain-PyTorch
model and samplers at the published precision (fp16 autocast on CUDA); ``fast`` = the fast backend,
fused masked loss, sampling engine (bf16); ``fast+compile`` with --compile. Every provider holds the
same random weights (a non-zero output layer: a fresh model's zero head makes sampling degenerate).
Ratios: ``vs published`` (the headline) and ``vs reference``, cost of the base / cost of the row.

Sections, each row naming its section, size and provider:
- forward: ``model(x)`` (published output, full [B, T, V]) over a batch sweep; tokens/s, TFLOP/s.
- train: one optimizer step of lambda_DCE (AdamW, grad clip 1.0, GradScaler in fp16); tokens/s,
  MFU on the full-model FLOPs, peak MB. The first step (autotuning, compilation) is ``warmup_s``.
- sampling: tweedie + direct at each steps value: the published sampler with its per-row cache and
  without it, our reference sampler (cache), the fast engine. Wall time, E-NFE (+ theory
  N(1-(1-1/N)^L)), samples/s, ms per ``rows/eval``-row evaluation against its FLOP roofline. The
  engine's CUDA-graph capture is timed apart (``capture_s``) and not in its wall time.
  ``fast approx (refresh every R)`` (``--refresh_every``, default 4; at <= 1024 steps): the opt-in
  approximate sampler, labelled, with its body token-rows as a fraction of exact (``body/exact``).
- batch: samples/s against rows in flight (= samples, one wave) at a few steps, for the engine and
  the published sampler (whose [B, L, V] cache caps its batch: an out-of-memory row says where),
  then ``best batch``: each provider at its best rows in flight, the table a user wants.
- eval: zero-shot lambda_DCE on one [B, L] batch with Monte Carlo timesteps: the published
  evaluation computation, ``evaluate_ppl`` on the reference and fast models. seq x timesteps / s.

Writes ``e2e.json`` (environment, settings, rows; rewritten after every section, so a run cut short
keeps what it measured), ``e2e.md`` (one table per section) and PNG plots (benchmarks/plots.py).
Sizes: quick = d 32, 1 block, L 32, 256 tokens (CPU, well under a minute); small = d 768 x 12 blocks,
medium = d 1024 x 24 blocks, both V = 50258, L = 1024 (GPU). On CPU the fast backend runs its PyTorch
fallbacks (the Triton interpreter is switched off for the run) on one thread: CPU tables prove the
harness runs; they are not speed claims.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from radd_fast import RADD
from radd_fast.errors import run_cli
from radd_fast.evaluation import evaluate_ppl
from radd_fast.flops import forward_flops_per_token, peak_flops, train_flops_per_token
from radd_fast.losses import get_loss_fn
from radd_fast.sampling import DiffusionSampler, generate
from radd_fast.sampling import evaluator as sampling_evaluator

from . import published as pubcode
from .e2e_setup import (
    CPU_LABEL,
    PLANS,
    Plan,
    Providers,
    add_ratios,
    attempt,
    build_providers,
    cpu_settings,
    dtype_name,
    peak_mb,
    published_dtype,
    published_from_env,
    reset_peak,
    samples_for,
    seconds,
    size_config,
    timed,
)
from .plots import make_plots
from .run import environment, markdown_table
from .timing import median_ms

SECTIONS = ("forward", "train", "sampling", "batch", "eval")
# The published training config (configs/config.yaml, optim section): our providers use the same.
ADAMW = {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
GRAD_CLIP = 1.0


# -- forward ---------------------------------------------------------------------------------------
def bench_forward(P: Providers, device, size: str, batches: tuple, T: int) -> list[dict]:
    rows = []
    flops = forward_flops_per_token(P.ref, T)
    for B in batches:
        x = torch.randint(0, P.ref.vocab_size - 1, (B, T), device=device)
        runs = [("published", published_dtype(P, device), pubcode.forward_fn(P.pub_model, x))] if P.pub else []
        runs += [(name, dtype_name(m), _our_forward(m, x)) for name, m in P.ours.items()]
        group = []
        for name, dtype, fn in runs:
            def measure(fn=fn):
                warm = seconds(fn, device)
                before = reset_peak(device)
                ms = median_ms(fn, device)
                return {"ms": ms, "tokens/s": B * T / ms * 1e3, "TFLOP/s": flops * B * T / ms / 1e9,
                        "peak_MB": peak_mb(device, before), "warmup_s": warm}

            attempt(group, {"section": "forward", "size": size, "provider": name, "dtype": dtype, "B": B, "T": T},
                    measure)
        rows += add_ratios(group, lambda r: r["ms"])
    return rows


def _our_forward(model: RADD, x):
    model.eval()

    @torch.no_grad()
    def forward():
        return model(x)

    return forward


# -- training step ---------------------------------------------------------------------------------
def _our_train_step(model: RADD, noise, x):
    """Our training step at the published settings: lambda_DCE (masked rows through the head only),
    AdamW, GradScaler when the autocast dtype is fp16, grad clip 1.0."""
    model.train()
    loss_fn = get_loss_fn(noise, model.vocab_size, train=True, loss_type="lambda_DCE")
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    scaler = torch.amp.GradScaler("cuda", enabled=x.device.type == "cuda" and model.compute_dtype == torch.float16)

    def step():
        loss = loss_fn(model, x).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(P: Providers, device, size: str, B: int, T: int, steps: int) -> list[dict]:
    """Optimizer steps on one fixed batch, per provider; the weights are restored afterwards."""
    x = torch.randint(0, P.ref.vocab_size - 1, (B, T), device=device)
    saved = {k: v.detach().clone() for k, v in P.ref.state_dict().items()}
    published = lambda: pubcode.train_step_fn(P.pub, P.pub_model, P.pub_noise, x)
    runs = [("published", published_dtype(P, device), published)] if P.pub else []
    runs += [(name, dtype_name(m), lambda m=m: _our_train_step(m, P.noise, x)) for name, m in P.ours.items()]
    flops = train_flops_per_token(P.ref, T) * B * T
    peak = peak_flops(device)
    rows = []
    for name, dtype, make_step in runs:
        def measure(make_step=make_step):
            before = reset_peak(device)
            warm, sec = timed(make_step(), device, steps)  # the optimizer state lives only in here
            return {"ms": sec * 1e3, "tokens/s": B * T / sec, "MFU": flops / sec / peak if peak else None,
                    "peak_MB": peak_mb(device, before), "warmup_s": warm}

        attempt(rows, {"section": "train", "size": size, "provider": name, "dtype": dtype, "B": B, "T": T}, measure)
        P.restore_weights(saved)
    for model in [*P.ours.values(), *([P.pub_model] if P.pub else [])]:
        model.eval()
    return add_ratios(rows, lambda r: r["ms"])


# -- sampling --------------------------------------------------------------------------------------
@contextlib.contextmanager
def graph_capture_seconds(device):
    """Collects the seconds the engine spends capturing CUDA graphs (``BodyRunner.prepare``, which also
    runs the warm-up calls that compile), so that its wall time can exclude them."""
    spent: list[float] = []
    runner = sampling_evaluator.BodyRunner
    original = runner.prepare

    def timed_prepare(self, shapes):
        spent.append(seconds(lambda: original(self, shapes), device))

    runner.prepare = timed_prepare
    try:
        yield spent
    finally:
        runner.prepare = original


@dataclass
class SampleRun:
    """What one sampler call produced: tokens [n, L], E-NFE per sample, the seconds of graph capture
    kept out of ``wall_s`` (None: no capture), the fraction of evaluated positions through the head."""

    tokens: torch.Tensor
    enfe: float
    wall_s: float
    capture_s: float | None = None
    head_fraction: float = 1.0
    body_fraction: float = 1.0  # body token-rows / the exact engine's (below 1: the approximate sampler)


def _timed_sampler(fn, device) -> SampleRun:
    """A sampler returning (tokens, E-NFE), timed as a whole (it captures nothing)."""
    out = {}
    wall = seconds(lambda: out.update(result=fn()), device)
    tokens, enfe = out["result"]
    return SampleRun(tokens, enfe, wall)


def _engine_run(model: RADD, noise, num: int, L: int, steps: int, device, **options) -> SampleRun:
    """The fast engine; a short warm-up at the same rows in flight first (kernel compilation and
    autotuning), and the graph capture of the timed call subtracted from its wall time. ``options``:
    ``generate``'s (rows_in_flight, refresh_every)."""
    generate(model, noise, min(num, 64), L, min(steps, 16), seed=0, progress=False, **options)
    with graph_capture_seconds(device) as spent:
        tokens, stats = generate(model, noise, num, L, steps, seed=steps, progress=False, **options)
    capture = getattr(stats, "capture_time", None)  # an engine that reports it already excludes it
    wall = stats.wall_time
    if capture is None:
        capture = sum(spent)
        wall -= capture
    return SampleRun(tokens, stats.enfe_mean, wall, capture, stats.head_rows / max(stats.eval_rows * L, 1),
                     stats.body_fraction)


def _our_cached(model: RADD, noise, num: int, L: int, steps: int):
    sampler = DiffusionSampler("tweedie", model, noise, (num, L), model.vocab_size, "direct", seed=steps)
    return sampler.sample(steps), sampler.update_cnt / num


APPROX_MAX_STEPS = 1024  # the approximate sampler's rows: the target point, not every step count
DEFAULT_REFRESH = (4,)


def approx_label(r: int) -> str:
    return f"fast approx (refresh every {r})"


def _sampler_runs(P: Providers, device, plan: Plan, L: int, steps: int, refresh: tuple = ()) -> list[tuple]:
    """(provider, cache, samples, call -> SampleRun) for every sampler run at ``steps``, the figures
    that matter most first (a run cut short by a timeout keeps them): the engine, the published
    sampler, our reference, the approximate sampler at each ``refresh`` period, the published
    sampler without its cache."""
    cached = samples_for(plan.cached_samples, steps)
    nocache = samples_for(plan.nocache_samples, steps)
    runs = [("fast", True, plan.fast_samples,
             lambda: _engine_run(P.ours["fast"], P.noise, plan.fast_samples, L, steps, device))]
    if P.pub:
        runs.append(("published", True, cached, lambda: _timed_sampler(
            lambda: pubcode.sample_cached(P.pub, P.pub_model, P.pub_noise, cached, L, steps, steps), device)))
    if steps <= plan.reference_max_steps:  # the headline is against published; the GPU budget is short
        runs.append(("reference", True, cached,
                     lambda: _timed_sampler(lambda: _our_cached(P.ref, P.noise, cached, L, steps), device)))
    for r in refresh if steps <= APPROX_MAX_STEPS else ():
        runs.append((approx_label(r), True, plan.fast_samples, lambda r=r: _engine_run(
            P.ours["fast"], P.noise, plan.fast_samples, L, steps, device, refresh_every=r)))
    if P.pub and nocache:
        runs.append(("published no-cache", False, nocache, lambda: _timed_sampler(
            lambda: pubcode.sample_without_cache(P.pub, P.pub_model, P.pub_noise, nocache, L, steps, steps), device)))
    return runs


def _warm_up_samplers(P: Providers, L: int) -> None:
    """Two steps of each eager sampler: cuBLAS / SDPA initialisation is not a sampler's time."""
    if P.pub:
        pubcode.sample_cached(P.pub, P.pub_model, P.pub_noise, 2, L, 2, 0)
    _our_cached(P.ref, P.noise, 2, L, 2)


def bench_sampling(P: Providers, device, size: str, plan: Plan, L: int, refresh: tuple = ()) -> list[dict]:
    """ms/eval = wall x rows/eval / (E-NFE x samples): one evaluation of rows/eval rows, the sampler's
    own work per step included; roofline = its FLOPs (head at ``head_fraction`` of the positions)
    over the card's dense 16-bit peak."""
    peak = peak_flops(device)
    unit = plan.rows_per_eval
    rows = []
    _warm_up_samplers(P, L)
    for steps in plan.sampling_steps:
        group = []
        for provider, cache, num, call in _sampler_runs(P, device, plan, L, steps, refresh):
            def measure(provider=provider, num=num, call=call):
                before = reset_peak(device)
                res = call()
                if bool((res.tokens == P.ref.mask_id).any()):
                    raise RuntimeError(f"{provider}: MASK tokens left after sampling")
                ms_eval = res.wall_s * 1e3 * unit / (res.enfe * num)
                roof = forward_flops_per_token(P.ref, L, res.head_fraction) * L * unit / peak * 1e3 if peak else None
                note = {"note": pubcode.CPU_NOTE} if provider == "published" and device.type == "cpu" else {}
                return {"wall_s": res.wall_s, "capture_s": res.capture_s, "E-NFE": res.enfe,
                        "E-NFE theory": steps * (1 - (1 - 1 / steps) ** L), "samples/s": num / res.wall_s,
                        "rows/eval": unit, "ms/eval": ms_eval, "roofline ms/eval": roof,
                        "x roofline": ms_eval / roof if roof else None, "peak_MB": peak_mb(device, before),
                        "body/exact": res.body_fraction, **note}

            attempt(group, {"section": "sampling", "size": size, "provider": provider, "cache": cache,
                            "steps": steps, "L": L, "samples": num}, measure)
        rows += add_ratios(group, lambda r: r["wall_s"] / r["samples"])
    return rows


# -- samples/s against the batch ------------------------------------------------------------------------------
def _batch_runs(P: Providers, device, rows_in_flight: int, L: int, steps: int) -> list[tuple]:
    """(provider, call -> SampleRun) at one batch: ``rows_in_flight`` samples in one wave."""
    runs = [("fast", lambda: _engine_run(P.ours["fast"], P.noise, rows_in_flight, L, steps, device,
                                         rows_in_flight=rows_in_flight))]
    if P.pub:
        runs.append(("published", lambda: _timed_sampler(lambda: pubcode.sample_cached(
            P.pub, P.pub_model, P.pub_noise, rows_in_flight, L, steps, steps), device)))
    return runs


def bench_batch(P: Providers, device, size: str, plan: Plan, L: int) -> list[dict]:
    """samples/s per provider at each batch of ``plan.batch_rows``, then each provider's best batch."""
    rows = []
    for batch in plan.batch_rows:
        for provider, call in _batch_runs(P, device, batch, L, plan.batch_steps):
            def measure(call=call, batch=batch):
                before = reset_peak(device)
                res = call()
                return {"wall_s": res.wall_s, "E-NFE": res.enfe, "samples/s": batch / res.wall_s,
                        "peak_MB": peak_mb(device, before)}

            attempt(rows, {"section": "batch", "size": size, "provider": provider, "rows_in_flight": batch,
                           "steps": plan.batch_steps, "L": L}, measure)
    for r in rows:  # out of memory at a large batch is the answer this section looks for, not a failure
        if "out of memory" in r.get("error", "").lower():
            r["limit"] = "out of memory"
            del r["error"]
    return rows + best_batches(rows)


def best_batches(rows: list[dict]) -> list[dict]:
    """One ``best batch`` row per provider: its highest samples/s over the batches it ran."""
    best: dict[str, dict] = {}
    for r in rows:
        if "samples/s" in r and r["samples/s"] > best.get(r["provider"], {}).get("samples/s", 0.0):
            best[r["provider"]] = r
    out = [{**r, "section": "best batch", "batches tried": sum(x["provider"] == p for x in rows)}
           for p, r in best.items()]
    return add_ratios(out, lambda r: 1.0 / r["samples/s"])


# -- zero-shot evaluation --------------------------------------------------------------------------
def bench_eval(P: Providers, device, size: str, B: int, L: int, mc: int) -> list[dict]:
    x = torch.randint(0, P.ref.vocab_size - 1, (B, L), device=device)

    def engine(model, batched: bool):
        return lambda: evaluate_ppl(model, P.noise, [x], "lambda_DCE", mc, mc_batching=batched,
                                    progress=False).mean_loss

    runs = [("published", pubcode.eval_fn(P.pub, P.pub_model, P.pub_noise, x, mc))] if P.pub else []
    # reference: the published loop, one draw per forward; fast: the draws batched into large forwards
    runs += [(name, engine(m, batched=name != "reference")) for name, m in P.ours.items()]
    rows = []
    reps = 2 if device.type == "cuda" else 1
    for name, fn in runs:
        def measure(fn=fn):
            before = reset_peak(device)
            loss = {}
            warm, sec = timed(lambda: loss.update(value=float(fn())), device, reps)
            return {"s": sec, "seq*timesteps/s": B * mc / sec, "tokens/s": B * L * mc / sec,
                    "loss (nats/seq)": loss["value"], "peak_MB": peak_mb(device, before), "warmup_s": warm}

        attempt(rows, {"section": "eval", "size": size, "provider": name, "B": B, "L": L, "mc_timesteps": mc},
                measure)
    return add_ratios(rows, lambda r: r["s"])


# -- driver ----------------------------------------------------------------------------------------
def run(device: torch.device, quick: bool, sizes=None, sections=SECTIONS, steps=None, compile: bool = False,
        eval_mc: int | None = None, published=None, on_rows=None, refresh: tuple = DEFAULT_REFRESH) -> list[dict]:
    """Every section (in the order given) for every size; one flat list of rows (the benchmarks.run
    contract). Without CUDA only the quick size runs. ``on_rows(rows)`` is called after each section;
    ``refresh``: the approximate sampler's periods in the sampling section (() for none)."""
    device = torch.device(device)
    quick = quick or device.type != "cuda"
    sizes = list(sizes or (["quick"] if quick else ["small"]))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; expected some of {SECTIONS}")
    published = published_from_env(published)
    rows: list[dict] = []
    with cpu_settings(device):
        for size in sizes:
            plan = replace(PLANS[size], sampling_steps=tuple(steps or PLANS[size].sampling_steps),
                           eval_mc=eval_mc or PLANS[size].eval_mc)
            _run_size(rows, size, plan, device, sections, compile, published, on_rows, tuple(refresh))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the size's models are gone
    return rows


def _run_size(rows: list[dict], size: str, plan: Plan, device, sections, compile: bool, published, on_rows,
              refresh: tuple) -> None:
    """The sections of one size, appended to ``rows`` (``on_rows(rows)`` after each)."""
    cfg = size_config(size)
    L = cfg.model.length
    P = build_providers(cfg, device, compile, published)
    section_runs = {
        "forward": lambda: bench_forward(P, device, size, plan.forward_batches, L),
        "train": lambda: bench_train(P, device, size, plan.train_batch, L, plan.train_steps),
        "sampling": lambda: bench_sampling(P, device, size, plan, L, refresh),
        "batch": lambda: bench_batch(P, device, size, plan, L),
        "eval": lambda: bench_eval(P, device, size, plan.eval_batch, L, plan.eval_mc),
    }
    for section in sections:
        rows += section_runs[section]()
        if on_rows:
            on_rows(rows)


def markdown(rows: list[dict]) -> str:
    out = []
    for section in dict.fromkeys(r["section"] for r in rows):
        part = [{k: v for k, v in r.items() if k != "section"} for r in rows if r["section"] == section]
        out.append(f"## {section}\n\n" + markdown_table(part))
    return "\n".join(out)


def header(env: dict, settings: dict, device: torch.device) -> str:
    """The markdown preamble: what ran where (card, driver, versions, date, published code)."""
    card = env.get("gpu") or "CPU"
    lines = ["# End-to-end benchmark: published code vs reference vs radd-fast", "",
             f"- card: {card}; driver: {env.get('driver') or '-'}; CUDA: {env.get('cuda') or '-'}",
             f"- torch {env['torch']}, triton {env.get('triton')}, python {env['python']}; date {env['date']}",
             f"- published code: {_published_line(env.get('published'))}",
             f"- settings: `{json.dumps(settings)}`"]
    if device.type != "cuda":
        lines.append(f"- **{CPU_LABEL}**")
    return "\n".join(lines) + "\n\n"


def _published_line(info: dict | None) -> str:
    if not info:
        return "not given (--published PATH or $RADD_PUBLISHED): no published rows"
    return f"`{info['path']}` (sha256 of its .py/.yaml files {info['sha256'][:16]}), rows labelled `{info['label']}`"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU-friendly, seconds)")
    ap.add_argument("--published", default=None, metavar="PATH",
                    help=f"a checkout of the published RADD code (default: ${pubcode.ENV_VAR}; none: no published rows)")
    ap.add_argument("--out", default="benchmarks/out/e2e", help="folder for e2e.json, e2e.md and the plots")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated: quick, small, medium (default: quick with --quick or on CPU, else small,medium)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, run in this order; of {SECTIONS}")
    ap.add_argument("--steps", default=None, help="sampling steps, comma-separated (default: the size's plan)")
    ap.add_argument("--eval_mc", type=int, default=None, help="Monte Carlo timesteps in the eval section")
    ap.add_argument("--compile", action="store_true", help="add a fast+torch.compile provider")
    ap.add_argument("--refresh_every", default=",".join(map(str, DEFAULT_REFRESH)),
                    help="the approximate sampler's periods in the sampling section, comma-separated ('' for none)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    split = lambda s: [v for v in s.split(",") if v] if s else None
    steps = [int(s) for s in split(args.steps)] if args.steps else None
    quick = args.quick or device.type != "cuda"
    sizes = split(args.sizes) or (["quick"] if quick else ["small", "medium"])
    published = published_from_env(args.published)
    env = environment()
    if published:
        env["published"] = pubcode.load_published(published).describe()  # fails here, before any work
    settings = {**vars(args), "published": published, "sizes": sizes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(rows):
        (out / "e2e.json").write_text(json.dumps({"env": env, "settings": settings, "rows": rows}, indent=1,
                                                 default=str))
        (out / "e2e.md").write_text(header(env, settings, device) + markdown(rows))

    t0 = time.perf_counter()
    refresh = tuple(int(r) for r in split(args.refresh_every) or ())
    rows = run(device, quick, sizes, split(args.sections), steps, args.compile, args.eval_mc, published, write, refresh)
    write(rows)
    print(header(env, settings, device) + markdown(rows))
    for path in make_plots(rows, out):
        print(f"plot: {path}")
    print(f"results in {out} ({time.perf_counter() - t0:.0f} s)")
    ratios = [v for r in rows for k, v in r.items() if k.startswith("vs ")]
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"FAILED: {len(failed)} provider runs (rows with an 'error' column)")
    return 0 if ratios and not failed and all(math.isfinite(v) and v > 0 for v in ratios) else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
