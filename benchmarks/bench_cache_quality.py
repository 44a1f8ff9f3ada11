"""Quality and cost of the approximate sampler (``refresh_every``) against the exact engine.

    python -m benchmarks.bench_cache_quality [--out benchmarks/results] [--train_seconds 240]
    python -m benchmarks.bench_cache_quality --device cuda --model_path JingyangOu/radd-t-dce \\
        --length 1024 --steps 1024 --kl_samples 16 --free_samples 64 --rows_in_flight 64   # GPU, real weights

CPU (default): trains a small byte-level RADD (d 128, 4 blocks, L 128) in-process for a
few minutes on the licence texts that Debian installs under /usr/share/common-licenses
(GPL, LGPL, GFDL, Apache, MPL, Artistic, BSD, CC0: real prose nobody here wrote), then,
for refresh_every r in {1, 2, 4, 8, 16} and "never" (the first evaluation of a row only):

(a) teacher-forced KL(exact || cached) of the per-token distributions at the revealed
    positions, along trajectories of the exact sampler (the same schedule and tokens fed
    to both; the cache is filled every r-th evaluation and updated in between, as the
    sampler does), in nats per token over all revealed tokens;
(b) free-running samples of ``generate(..., refresh_every=r)``: their NLL under the exact
    model (the any-order bound, Monte Carlo over masks with ``losses.k_dce``, in nats per
    byte; the exact sampler's samples are the baseline) and their unigram
    entropy (bits per byte of each sample's byte histogram, averaged);
(c) body token-rows computed as a fraction of the exact engine's (exact counts).

Writes cache_quality_<device>_<date>.md / .json / .png (quality vs cost). ``--model_path``
skips training (any ``radd_fast.load_model`` path or hub id); the licence text is then
only the reference row. Wall times are recorded but on CPU measure nothing useful.
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

from radd_fast import RADD, LogLinearNoise, ModelConfig, RADDConfig, get_loss_fn, load_model
from radd_fast.data import get_tokenizer
from radd_fast.losses import k_dce
from radd_fast.model.head import gumbel
from radd_fast.model.kv_cache import KVCache, hidden_cached, hidden_filling
from radd_fast.sampling import generate
from radd_fast.sampling.cached import pushed_positions
from radd_fast.sampling.schedule import draw_reveal_steps, group_steps, update_rates

LICENSES = Path("/usr/share/common-licenses")
NEVER = "never"


# -- data and model -------------------------------------------------------------------------------------------
def licence_bytes() -> tuple[np.ndarray, list[str]]:
    """Every licence text once (symlinks such as GPL -> GPL-3 resolved), as byte tokens."""
    files = sorted({p.resolve() for p in LICENSES.iterdir() if p.is_file()})
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    tokens = np.array(get_tokenizer("bytes").encode(text), dtype=np.int64)
    return tokens, [p.name for p in files]


def random_blocks(stream: np.ndarray, n: int, length: int, gen: np.random.Generator) -> torch.Tensor:
    starts = gen.integers(0, len(stream) - length, size=n)
    return torch.from_numpy(np.stack([stream[s:s + length] for s in starts]))


def small_model(length: int) -> RADD:
    cfg = RADDConfig(tokens=256, model=ModelConfig(hidden_size=128, n_heads=4, n_blocks=4, length=length,
                                                   dropout=0.0, name="cache-bench"))
    return RADD(cfg, backend="reference")


def train(model: RADD, stream: np.ndarray, seconds: float, batch: int, lr: float, seed: int) -> list[float]:
    """A short hand loop on the lambda-DCE loss: Adam, linear warm-up; returns nats per byte per step."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    loss_fn = get_loss_fn(LogLinearNoise(), model.vocab_size, train=True, loss_type="lambda_DCE")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    history, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (len(history) + 1) / 100)
        x = random_blocks(stream, batch, model.length, gen).to(model.device)
        loss = loss_fn(model, x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.item() / model.length)
        if len(history) % 200 == 0:
            print(f"  step {len(history)}: {np.mean(history[-50:]):.3f} nats/byte ({time.perf_counter() - t0:.0f} s)")
    return history


def model_for(args, stream: np.ndarray, device: torch.device) -> tuple[RADD, object, list[float]]:
    """The benchmark's model: ``args.model_path`` loaded, else the small byte model trained here for
    ``args.train_seconds`` on ``stream`` (or reloaded from ``args.checkpoint``, which a training run
    writes). Returns (model in eval mode, noise, training loss per step; [] when loaded)."""
    if args.model_path:
        model, noise = load_model(args.model_path, device=device)
        return model.eval(), noise, []
    model = small_model(args.length).to(device)
    if args.checkpoint and os.path.exists(args.checkpoint):  # a model this benchmark trained before
        saved = torch.load(args.checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(saved["state"])
        history = saved["history"].tolist()
    else:
        print(f"training on {len(stream):,} bytes of licence text for {args.train_seconds:.0f} s")
        history = train(model, stream, args.train_seconds, batch=args.train_batch, lr=2e-3, seed=args.seed)
        if args.checkpoint:
            torch.save(dict(state=model.state_dict(), history=torch.tensor(history)), args.checkpoint)
    return model.eval(), LogLinearNoise(), history


# -- (a) teacher-forced KL ---------------------------------------------------------------------------------
class TeacherForced:
    """One refresh period r along the exact trajectory: its cache, and the KL and work it accumulates."""

    def __init__(self, model, r: int, n: int, length: int):
        self.r, self.cache = r, KVCache.allocate(model, n, length)
        self.kl_sum, self.kl_cached_sum, self.tokens, self.tokens_cached = 0.0, 0.0, 0, 0
        self.token_rows = 0

    def step(self, model, k: int, x, group, alive, exact_cache, exact_logp) -> None:
        """Evaluation k of the rows ``alive`` [n_alive] (row b at cache slot b); exact_logp [n_alive, L, V-1]."""
        n, L = x.shape
        if k % self.r == 0:  # a full evaluation: exactly the exact one, which filled exact_cache
            self.cache.k[:, alive] = exact_cache.k[:, alive]
            self.cache.v[:, alive] = exact_cache.v[:, alive]
            self.tokens += int((group[alive] == k).sum())
            self.token_rows += L * alive.numel()
            return
        ks = torch.full((n,), -2, dtype=torch.int64, device=x.device)  # rows done push nothing
        ks[alive] = k
        k0 = k - k % self.r
        S = int(((group >= k0) & (group <= k)).sum(dim=1).max())
        positions, valid = pushed_positions(group, ks, self.r, S)
        write = self.cache.write_index(torch.arange(n, device=x.device),
                                       torch.where(valid, positions, torch.full_like(positions, L)))
        h = hidden_cached(model, x.gather(1, positions), positions, write, self.cache)  # [n, S, d]
        at = (group.gather(1, positions) == ks[:, None]) & valid  # [n, S]: the revealed queries
        logp = model.vocab_log_probs(h[at]).double()
        index_in_alive = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        index_in_alive[alive] = torch.arange(alive.numel(), device=x.device)
        row = index_in_alive[:, None].expand_as(positions)[at]
        ref = exact_logp[row, positions[at]].double()
        kl = float((ref.exp() * (ref - logp)).sum())
        self.kl_sum += kl
        self.kl_cached_sum += kl
        n_revealed = int(at.sum())
        self.tokens += n_revealed
        self.tokens_cached += n_revealed
        self.token_rows += int(valid.sum())


@torch.no_grad()
def teacher_forced_kl(model, noise, n: int, length: int, steps: int, periods: list, seed: int) -> dict:
    """Run the exact sampler (its own loop: schedule up front, Gumbel-max fp64 at the revealed
    positions) and score every cached variant on its trajectory. Returns period -> measures."""
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    free = torch.ones(n, length, dtype=torch.bool, device=device)
    group, K = group_steps(draw_reveal_steps(update_rates(noise, steps, "tweedie", 1e-5, device), free, gen))
    x = torch.full((n, length), model.mask_id, dtype=torch.int64, device=device)
    exact_cache = KVCache.allocate(model, n, length)
    variants = {p: TeacherForced(model, length if p == NEVER else p, n, length) for p in periods}
    for k in range(int(K.max())):
        alive = torch.nonzero(K > k).squeeze(1)
        h = hidden_filling(model, x[alive], exact_cache, alive)  # the exact evaluation, filling the cache
        logp = model.vocab_log_probs(h)  # [n_alive, L, V-1]
        for variant in variants.values():
            variant.step(model, k, x, group, alive, exact_cache, logp)
        reveal = group[alive] == k  # Gumbel-max over the real tokens at the revealed positions only
        at = logp[reveal].double()
        rows = x[alive]
        rows[reveal] = (at + gumbel(at.shape, torch.float64, device, gen)).argmax(-1)
        x[alive] = rows
    exact_rows = length * int(K.sum())
    return {p: dict(kl=v.kl_sum / max(v.tokens, 1), kl_cached_evals=v.kl_cached_sum / max(v.tokens_cached, 1),
                    tf_body_fraction=v.token_rows / exact_rows) for p, v in variants.items()}


# -- (b) free-running samples -------------------------------------------------------------------------------
@torch.no_grad()
def nll_per_byte(model, samples: torch.Tensor, seed: int, draws: int) -> tuple[float, float]:
    """The any-order NLL bound of each sample under the model, -log p / L (nats per byte): mean and
    standard error over samples. Monte Carlo over ``draws`` masks per sample (``losses.k_dce``: k ~ U{1..L}
    positions masked, every masked position scored, weight L / k), seeded so that every sampler's
    samples get the same masks."""
    torch.manual_seed(seed)
    nll = sum(k_dce(model, samples).double().cpu() for _ in range(draws)) / (draws * samples.shape[1])
    return float(nll.mean()), float(nll.std() / math.sqrt(nll.numel()))


def unigram_entropy_bits(samples: torch.Tensor, vocab: int) -> float:
    """Entropy (bits) of each sample's token histogram, averaged over samples."""
    return float(unigram_entropy_per_sample(samples, vocab).mean())


def unigram_entropy_per_sample(samples: torch.Tensor, vocab: int) -> torch.Tensor:
    """Entropy (bits) of each sample's token histogram: [n] float64."""
    counts = torch.zeros(samples.shape[0], vocab, dtype=torch.float64)
    counts.scatter_add_(1, samples.cpu(), torch.ones(samples.shape, dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-300))).sum(1)


def free_running(model, noise, n: int, length: int, steps: int, period, rows: int, seed: int, draws: int) -> dict:
    refresh = None if period is None else (length if period == NEVER else period)
    t0 = time.perf_counter()
    samples, stats = generate(model, noise, n, length, steps, refresh_every=refresh, rows_in_flight=rows,
                              seed=seed, progress=False)
    wall = time.perf_counter() - t0
    nll, se = nll_per_byte(model, samples, seed + 1, draws)
    return dict(samples=samples, nll=nll, nll_se=se, entropy=unigram_entropy_bits(samples, model.vocab_size - 1),
                body_fraction=stats.body_fraction, body_padded_fraction=stats.body_token_rows_padded /
                max(stats.body_token_rows_exact, 1), wall_s=wall, enfe=stats.enfe_mean, sampler=stats.sampler)


# -- report ----------------------------------------------------------------------------------------------------------
def label(period) -> str:
    return "exact" if period is None else f"r = {period}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Approximate sampler (refresh_every): quality vs cost, {meta['device_name']}, {meta['date']}", "",
             meta["setup"], "",
             "| sampler | KL teacher-forced (nats/token) | KL on cached evaluations only | NLL of samples under the exact "
             "model (nats/byte) | unigram entropy (bits) | body token-rows / exact | with padding | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        kl = "0 (exact)" if row["period"] is None else f"{row['kl']:.4f}"
        klc = "-" if row["period"] is None or row.get("kl_cached_evals") is None else f"{row['kl_cached_evals']:.4f}"
        lines.append(f"| {label(row['period'])} | {kl} | {klc} | {row['nll']:.3f} +- {row['nll_se']:.3f} | "
                     f"{row['entropy']:.3f} | {100 * row['body_fraction']:.1f}% | "
                     f"{100 * row['body_padded_fraction']:.1f}% | {row['wall_s']:.1f} |")
    lines += ["", f"Reference: NLL of {meta['data_blocks']} random blocks of the licence text under the same model: "
              f"{meta['data_nll']:.3f} +- {meta['data_nll_se']:.3f} nats/byte; their unigram entropy "
              f"{meta['data_entropy']:.3f} bits.", "", meta["targets"], ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # lazy: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    approx = [r for r in rows if r["period"] not in (None, 1)]  # r = 1 is the exact engine (KL 0)
    exact = next(r for r in rows if r["period"] is None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = [100 * r["body_fraction"] for r in approx]
    ax1.plot(x, [max(r["kl"], 1e-8) for r in approx], "o", color="C0")
    for r, xi in zip(approx, x):
        ax1.annotate(label(r["period"]), (xi, max(r["kl"], 1e-8)), textcoords="offset points", xytext=(4, 4))
        ax2.annotate(label(r["period"]), (xi, r["nll"]), textcoords="offset points", xytext=(4, 4))
    ax1.axhline(0.01, color="grey", ls="--", lw=1, label="target 0.01")
    ax1.set_yscale("log")
    ax1.set_xlabel("body token-rows, % of exact")
    ax1.set_ylabel("teacher-forced KL (nats/token)")
    ax1.legend()
    ax2.errorbar(x, [r["nll"] for r in approx], yerr=[r["nll_se"] for r in approx], fmt="o", label="cached")
    ax2.errorbar([100.0], [exact["nll"]], yerr=[exact["nll_se"]], fmt="s", color="black", label="exact")
    ax2.set_xlabel("body token-rows, % of exact")
    ax2.set_ylabel("NLL of samples under the exact model (nats/byte)")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model_path", default=None, help="skip training: a radd_fast.load_model path or hub id")
    ap.add_argument("--checkpoint", default=None, help="reuse (or write) the trained model's state dict here")
    ap.add_argument("--train_seconds", type=float, default=240.0)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--kl_samples", type=int, default=32)
    ap.add_argument("--free_samples", type=int, default=32)
    ap.add_argument("--rows_in_flight", type=int, default=32)
    ap.add_argument("--periods", default="1,2,4,8,16,never")
    ap.add_argument("--nll_draws", type=int, default=32, help="Monte Carlo masks per sample for the NLL")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: a shared CPU runs one thread faster)")
    ap.add_argument("--train_batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    periods = [NEVER if p == NEVER else int(p) for p in args.periods.split(",")]
    stream, names = licence_bytes()
    model, noise, history = model_for(args, stream, device)
    L = args.length
    print("teacher-forced KL along the exact trajectories")
    kl = teacher_forced_kl(model, noise, args.kl_samples, L, args.steps, periods, args.seed + 10)
    rows = []
    for period in [None, *periods]:
        print(f"free-running: {label(period)}")
        row = free_running(model, noise, args.free_samples, L, args.steps, period, args.rows_in_flight, args.seed + 20,
                           args.nll_draws)
        row.pop("samples")
        row.update(period=period, **(kl.get(period) or dict(kl=0.0, kl_cached_evals=None, tf_body_fraction=1.0)))
        rows.append(row)
    data = random_blocks(stream, args.free_samples, L, np.random.default_rng(args.seed + 30)).to(device) \
        if model.vocab_size == 257 else None
    data_nll, data_se = nll_per_byte(model, data, args.seed + 1, args.nll_draws) if data is not None else (float("nan"),) * 2
    r4 = next((r for r in rows if r["period"] == 4), None)
    targets = "Targets (CPU): at r = 4 body token-rows <= 30% of exact and KL <= 0.01 nats/token: " + (
        "not measured (no r = 4 row)" if r4 is None else
        f"body token-rows {100 * r4['body_fraction']:.1f}% ({'met' if r4['body_fraction'] <= 0.30 else 'MISSED'}), "
        f"KL {r4['kl']:.4f} ({'met' if r4['kl'] <= 0.01 else 'MISSED'}).")
    date = datetime.date.today().isoformat()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    m = model.config.model
    setup = (f"Model: d {m.hidden_size}, {m.n_blocks} blocks, {m.n_heads} heads, L {L}, byte tokens; "
             + (f"loaded from {args.model_path}." if args.model_path else
                f"trained here for {len(history)} steps ({args.train_seconds:.0f} s, batch {args.train_batch}, lambda-DCE, "
                f"AdamW 2e-3) "
                f"on the licence texts under /usr/share/common-licenses ({', '.join(names)}; {len(stream):,} bytes), "
                f"final training loss {np.mean(history[-50:]) if history else float('nan'):.3f} nats/byte.")
             + f" Sampling: tweedie, {args.steps} steps, loglinear noise, direct, fp64 Gumbel; KL over "
             f"{args.kl_samples} exact trajectories, free-running {args.free_samples} samples per row of the table "
             f"(rows in flight {args.rows_in_flight}); 'never' = refresh_every {L} (only a row's first evaluation "
             f"is full). NLL: the any-order bound (k-DCE, {args.nll_draws} masks per sample). Wall times on a shared "
             "2-core CPU: not a speed measurement." + (" Device: CPU." if device.type == "cpu" else ""))
    meta = dict(date=date, device_name=device_name, setup=setup, targets=targets, data_blocks=args.free_samples,
                data_nll=data_nll, data_nll_se=data_se,
                data_entropy=unigram_entropy_bits(data, 256) if data is not None else float("nan"),
                train_steps=len(history), train_loss_last=float(np.mean(history[-50:])) if history else None,
                args=vars(args), licences=names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cache_quality_{'cpu' if device.type == 'cpu' else 'gpu'}_{date}"
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    plot(rows, stem.with_suffix(".png"), f"refresh_every: quality vs cost ({device_name})")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
