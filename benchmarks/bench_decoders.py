"""The adaptive decoders' speed-quality frontier against the exact sampler at fewer steps.

    python -m benchmarks.bench_decoders [--quick] [--out benchmarks/results] [--checkpoint /tmp/licence.pt]
    python -m benchmarks.bench_decoders --device cuda --model_path JingyangOu/radd-t-dce --length 1024 \\
        --steps_sweep 64,128,256,1024,4096 --low_steps 64,256,1024 --taus 0.9,0.7,0.5 --gammas 1,4,16 \\
        --samples 64 --rows_in_flight 64 --refresh 4   # GPU, released weights

CPU (default): the small byte-level RADD that benchmarks/bench_cache_quality.py trains (d 128, 4
blocks, L 128, a few minutes on the licence texts under /usr/share/common-licenses; its code, reused
here; ``--checkpoint`` keeps the trained weights for a rerun). For each sampler, ``--samples``
free-running samples from one seed (every row uses the same seed and conditioning: the rows are
paired), and for each:

- NFE: evaluations per sample (mean +- its standard error over samples);
- work per evaluation: body token-rows (positions pushed through the blocks: L, fewer with the
  cache) and head token-rows (positions the output head ran at: the revealed ones for the exact
  sampler, every masked one for a decoder), per row evaluation, exact counts from ``SamplingStats``;
- NLL of the samples under the exact model: the any-order bound (k-DCE Monte Carlo over masks,
  ``bench_cache_quality.nll_per_byte``), nats per token (a byte here);
- unigram entropy (bits, of each sample's token histogram) and the fraction of repeated n-grams
  (1 - distinct / all n-grams of a sample, n = ``--ngram``), each +- its standard error.

Samplers: the exact engine at ``--steps_sweep`` steps (its NFE ~ N (1 - (1 - 1/N)^L)): the baseline
curve; ``confidence`` over ``--taus``; ``entropy_bound`` over ``--gammas``; ``low_confidence`` at
``--low_steps`` steps; each decoder also with ``--refresh R`` (the key/value cache). The verdict
column compares each decoder with the exact sampler at the same NFE (log-linear interpolation of its
curve): NLL lower by more than 2 standard errors is a win only if the unigram entropy and the repeated
n-grams stay within 2 standard errors of the exact sampler's at its most steps (the model's own
distribution, as closely as the sweep gets); lower NLL with less entropy or more repetition only
trades diversity for likelihood.

Writes decoders_<cpu|gpu>[-quick]_<date>.md / .json / .png (NLL and entropy against NFE).
Wall times are recorded; on a shared CPU they measure nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_cache_quality import (
    licence_bytes,
    model_for,
    nll_per_byte,
    random_blocks,
    unigram_entropy_per_sample,
)
from radd_fast.sampling import SamplerConfig, generate

QUICK = dict(train_seconds=60.0, samples=8, nll_draws=8, steps_sweep="8,32,512", low_steps="8,32", taus="0.5,0.1",
             gammas="4,32", length=64)


# -- quality of a set of samples --------------------------------------------------------------------------------
def repeated_ngrams(samples: torch.Tensor, n: int) -> torch.Tensor:
    """Per sample: 1 - (distinct n-grams) / (n-grams), the repetition of its n-grams: [N] float64."""
    out = []
    for row in samples.cpu().tolist():
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        out.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return float(values.mean()), float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else 0.0


def measure(model, noise, cfg: SamplerConfig, args, vocab: int) -> dict:
    """Sample with ``cfg`` and score: NFE, work per evaluation, NLL, unigram entropy, repeated n-grams."""
    t0 = time.perf_counter()
    samples, stats = generate(model, noise, args.samples, args.length, config=cfg, seed=args.seed + 20, progress=False)
    wall = time.perf_counter() - t0
    nll, nll_se = nll_per_byte(model, samples, args.seed + 1, args.nll_draws)
    nfe, nfe_se = mean_se(stats.enfe)
    ent, ent_se = mean_se(unigram_entropy_per_sample(samples, vocab))
    rep, rep_se = mean_se(repeated_ngrams(samples, args.ngram))
    return dict(sampler=stats.sampler, nfe=nfe, nfe_se=nfe_se, nll=nll, nll_se=nll_se, entropy=ent, entropy_se=ent_se,
                rep=rep, rep_se=rep_se, body_per_eval=stats.body_token_rows / max(stats.eval_rows, 1),
                head_per_eval=stats.head_rows_per_evaluation,
                body_per_sample=stats.body_token_rows / max(args.samples, 1),
                head_per_sample=stats.head_rows / max(args.samples, 1), wall_s=wall)


def samplers(args) -> list[dict]:
    """Every row of the table: family, knob (steps, tau or gamma), refresh_every, and its SamplerConfig."""
    base = dict(rows_in_flight=args.rows_in_flight, sampling_dtype="float64")
    steps = [int(s) for s in args.steps_sweep.split(",")]
    rows = [dict(family="exact", knob=s, refresh=None, cfg=SamplerConfig(steps=s, **base)) for s in steps]
    for refresh in [None, *([args.refresh] if args.refresh else [])]:
        sweeps = [("confidence", [float(t) for t in args.taus.split(",")]),
                  ("entropy_bound", [float(g) for g in args.gammas.split(",")])]
        for name, knobs in sweeps:
            rows += [dict(family=name, knob=k, refresh=refresh,
                          cfg=SamplerConfig(decoder=name, decoder_para=k, refresh_every=refresh, **base)) for k in knobs]
        rows += [dict(family="low_confidence", knob=s, refresh=refresh,
                      cfg=SamplerConfig(steps=s, decoder="low_confidence", refresh_every=refresh, **base))
                 for s in (int(s) for s in args.low_steps.split(","))]
    return rows


# -- the verdict: against the exact curve at the same NFE ---------------------------------------------------------
def exact_at(exact: list[dict], nfe: float, key: str) -> float:
    """The exact sampler's ``key`` at ``nfe`` evaluations: linear in log NFE between its points (held
    constant beyond them)."""
    xs = np.log([r["nfe"] for r in exact])
    order = np.argsort(xs)
    return float(np.interp(math.log(nfe), xs[order], np.array([r[key] for r in exact])[order]))


def verdict(row: dict, exact: list[dict]) -> str:
    """Where the row stands against the exact sampler at the same NFE (2 standard errors)."""
    if row["family"] == "exact":
        return "baseline"
    if row["nfe"] < min(r["nfe"] for r in exact) or row["nfe"] > max(r["nfe"] for r in exact):
        where = "outside the exact sweep's NFE, "
    else:
        where = ""
    full = max(exact, key=lambda r: r["nfe"])  # the model's own distribution, as closely as the sweep gets
    d_nll = row["nll"] - exact_at(exact, row["nfe"], "nll")
    se = math.hypot(row["nll_se"], full["nll_se"])
    less_diverse = (row["entropy"] < full["entropy"] - 2 * math.hypot(row["entropy_se"], full["entropy_se"])
                    or row["rep"] > full["rep"] + 2 * math.hypot(row["rep_se"], full["rep_se"]))
    if d_nll < -2 * se:
        return where + ("trades diversity for likelihood" if less_diverse else "beats exact at equal NFE")
    if d_nll > 2 * se:
        return where + "worse than exact at equal NFE" + (", and less diverse" if less_diverse else "")
    return where + "as exact at equal NFE" + (", but less diverse" if less_diverse else "")


# -- report ---------------------------------------------------------------------------------------------------------
def label(row: dict) -> str:
    knob = {"exact": "steps", "low_confidence": "steps", "confidence": "tau", "entropy_bound": "gamma"}[row["family"]]
    cache = "" if row["refresh"] is None else f", refresh {row['refresh']}"
    return f"{row['family']} {knob}={row['knob']:g}{cache}"


def markdown(rows: list[dict], meta: dict) -> str:
    n = meta["args"]["ngram"]
    lines = [f"# Adaptive decoders against the exact sampler, {meta['device_name']}, {meta['date']}{meta['quick']}", "",
             meta["setup"], "",
             f"| sampler | NFE / sample | body token-rows / eval | head token-rows / eval | NLL (nats/token) | "
             f"unigram entropy (bits) | repeated {n}-grams | verdict at equal NFE |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {label(r)} | {r['nfe']:.1f} +- {r['nfe_se']:.1f} | {r['body_per_eval']:.1f} | "
                     f"{r['head_per_eval']:.1f} | {r['nll']:.3f} +- {r['nll_se']:.3f} | {r['entropy']:.3f} +- "
                     f"{r['entropy_se']:.3f} | {r['rep']:.3f} +- {r['rep_se']:.3f} | {r['verdict']} |")
    lines += ["", f"Reference: {meta['data_blocks']} random blocks of the training text under the same model: NLL "
              f"{meta['data_nll']:.3f} +- {meta['data_nll_se']:.3f}, unigram entropy {meta['data_entropy']:.3f} bits, "
              f"repeated {n}-grams {meta['data_rep']:.3f}.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str, data: dict | None = None) -> None:
    """NLL and unigram entropy against NFE, one line per sampler (the exact one thick, the cached ones dashed);
    data: {"nll": .., "entropy": ..} of the training text, drawn as a dotted line when given."""
    import matplotlib  # lazy: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"exact": ("black", "s"), "confidence": ("C0", "o"), "entropy_bound": ("C1", "^"),
              "low_confidence": ("C2", "D")}
    for ax, key, name in ((axes[0], "nll", "NLL of samples under the exact model (nats/token)"),
                          (axes[1], "entropy", "unigram entropy of samples (bits)")):
        for family, (color, marker) in styles.items():
            for refresh in sorted({r["refresh"] or 0 for r in rows if r["family"] == family}):
                pts = sorted((r for r in rows if r["family"] == family and (r["refresh"] or 0) == refresh),
                             key=lambda r: r["nfe"])
                if not pts:
                    continue
                ax.errorbar([r["nfe"] for r in pts], [r[key] for r in pts], yerr=[r[key + "_se"] for r in pts],
                            color=color, marker=marker, ls="--" if refresh else "-", lw=2 if family == "exact" else 1,
                            label=family + (f" + refresh {refresh}" if refresh else ""))
        if data is not None and math.isfinite(data[key]):
            ax.axhline(data[key], color="grey", ls=":", lw=1, label="training text")
        ax.set_xscale("log")
        ax.set_xlabel("evaluations per sample (NFE)")
        ax.set_ylabel(name)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a much shorter run (L 64, 8 samples, 3 knobs a sweep)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model_path", default=None, help="skip training: a radd_fast.load_model path or hub id")
    ap.add_argument("--checkpoint", default=None, help="reuse (or write) the trained model's state dict here")
    ap.add_argument("--train_seconds", type=float, default=240.0)
    ap.add_argument("--train_batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--rows_in_flight", type=int, default=16)
    ap.add_argument("--steps_sweep", default="4,8,16,32,128,1024,8192", help="the exact sampler's steps")
    ap.add_argument("--low_steps", default="8,32,128", help="low_confidence's steps (the exact schedule's counts)")
    ap.add_argument("--taus", default="0.7,0.5,0.3,0.1", help="confidence thresholds")
    ap.add_argument("--gammas", default="2,8,16,64", help="entropy bounds (nats)")
    ap.add_argument("--refresh", type=int, default=4, help="each decoder also with refresh_every R (0: not)")
    ap.add_argument("--ngram", type=int, default=8, help="n of the repeated n-grams")
    ap.add_argument("--nll_draws", type=int, default=16, help="Monte Carlo masks per sample for the NLL")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: a shared CPU runs one thread faster)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.quick:
        defaults = vars(ap.parse_args([]))
        for name, value in QUICK.items():  # the quick values, unless a flag set something else
            if getattr(args, name) == defaults[name]:
                setattr(args, name, value)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    stream, names = licence_bytes()
    t0 = time.perf_counter()
    trains = not args.model_path and not (args.checkpoint and os.path.exists(args.checkpoint))
    model, noise, history = model_for(args, stream, device)
    vocab = model.vocab_size - 1
    rows = []
    for spec in samplers(args):
        print(f"{label(spec)} ...", flush=True)
        row = measure(model, noise, spec.pop("cfg"), args, vocab)
        rows.append(spec | row)
        print(f"  NFE {row['nfe']:.1f}  NLL {row['nll']:.3f}  entropy {row['entropy']:.3f}  rep {row['rep']:.3f}  "
              f"({row['wall_s']:.0f} s)", flush=True)
    exact = [r for r in rows if r["family"] == "exact"]
    for r in rows:
        r["verdict"] = verdict(r, exact)
    data = random_blocks(stream, args.samples, args.length, np.random.default_rng(args.seed + 30)).to(device) \
        if vocab == 256 else None
    data_nll, data_se = nll_per_byte(model, data, args.seed + 1, args.nll_draws) if data is not None else (math.nan,) * 2
    date = datetime.date.today().isoformat()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    m = model.config.model
    setup = (f"Model: d {m.hidden_size}, {m.n_blocks} blocks, {m.n_heads} heads, L {args.length}; "
             + (f"loaded from {args.model_path}." if args.model_path else
                f"byte-level, trained here (benchmarks/bench_cache_quality.py's loop) for {len(history)} steps "
                f"({args.train_seconds:.0f} s, batch {args.train_batch}, lambda-DCE) on the licence texts under "
                f"/usr/share/common-licenses ({len(stream):,} bytes), final training loss "
                f"{np.mean(history[-50:]) if history else math.nan:.3f} nats/byte.")
             + f" {args.samples} samples per row, one seed (rows paired), {args.rows_in_flight} rows in flight, "
             "tweedie schedule (exact and low_confidence), direct strategy, fp64 Gumbel. NLL: the any-order bound "
             f"(k-DCE, {args.nll_draws} masks per sample). +- : standard error over samples. Work per evaluation: "
             "body token-rows (L, fewer with the cache) and head token-rows (the exact sampler's head runs at the "
             "revealed positions only, a decoder's at every masked one) per row evaluation. Verdict: against the "
             "exact sampler interpolated at the same NFE (2 standard errors); a lower NLL counts as a win only "
             "if entropy and repetition stay within 2 standard errors of the exact sampler's at its most steps. "
             f"Run time {time.perf_counter() - t0:.0f} s ({'training included' if trains else 'model loaded'}); "
             "wall times on a shared CPU measure nothing.")
    meta = dict(date=date, device_name=device_name, setup=setup, quick=" (--quick)" if args.quick else "",
                data_blocks=args.samples, data_nll=data_nll, data_nll_se=data_se,
                data_entropy=float(unigram_entropy_per_sample(data, vocab).mean()) if data is not None else math.nan,
                data_rep=float(repeated_ngrams(data, args.ngram).mean()) if data is not None else math.nan,
                train_steps=len(history), args=vars(args), licences=names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"decoders_{'cpu' if device.type == 'cpu' else 'gpu'}{'-quick' if args.quick else ''}_{date}"
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    plot(rows, stem.with_suffix(".png"), f"Adaptive decoders against the exact sampler ({device_name}{meta['quick']})",
         dict(nll=data_nll, entropy=meta["data_entropy"]))
    print(stem.with_suffix(".md").read_text())
    return stem


if __name__ == "__main__":
    main()
