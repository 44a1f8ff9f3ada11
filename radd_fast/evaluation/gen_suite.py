"""The generative-perplexity protocol: sample at each step count, score, tabulate, plot.

For each number of sampling steps, ``num_samples`` sequences are drawn with
``radd_fast.sampling.generate`` (float64 Gumbel noise by default, as the paper)
and appended to ``samples_steps<S>.jsonl`` chunk by chunk, flushed and fsynced,
each chunk seeded from (seed, steps, chunk index): an interrupted run keeps what
it made and resumes with exactly the samples it would have drawn. The samples
are then scored with a causal LM (``gen_ppl.score_samples``), the scores saved
per step count, and one table (mean gen-PPL, its spread, unigram entropy, E-NFE,
the paper's fp64 gen-PPL) written as JSON and markdown, with a plot of gen-PPL and
entropy against steps when matplotlib is installed. Entropy is always printed
beside gen-PPL: a sampler can buy a low gen-PPL with repetitive text
(docs/EVALUATION.md). Each result is printed before its file is written, and every
file goes through ``radd_fast.files``: a full disk is one error line naming the file,
and leaves whole sample lines and whole result files.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from ..files import LineFile, atomic_write, atomic_write_json, atomic_write_text
from ..progress import write
from ..sampling import generate
from .gen_ppl import score_samples
from .paper_numbers import FP32_COUNTEREXAMPLE, GEN_PPL_FP64, GEN_PPL_NOTE, SOURCE
from .protocol import PRINTED, EvalError, derived_seed

RESULT_STEM = "gen_ppl_suite"


def samples_path(work_dir, steps: int) -> Path:
    return Path(work_dir) / f"samples_steps{steps}.jsonl"


def read_complete_lines(path: Path) -> list[dict]:
    """The samples already written; a last line cut by a kill is dropped (and cut from the file)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]  # everything up to the last complete line
    if len(keep) != len(raw):
        with path.open("r+b") as fh:
            fh.truncate(len(keep))
    out = []
    for n, line in enumerate(keep.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not valid JSON ({e}): delete the file to sample again") from e
    return out


def sample_steps(model, noise, steps: int, settings: dict, work_dir, *, progress: bool = False,
                 on_chunk: Callable | None = None) -> list[dict]:
    """Draw (or finish drawing) the samples of one step count; returns all its records.

    Record: ``{"index", "steps", "ids": [length ints], "enfe": evaluations of that row}``."""
    path = samples_path(work_dir, steps)
    records = read_complete_lines(path)
    n, chunk = settings["num_samples"], settings["chunk"]
    while len(records) < n:
        c = len(records) // chunk  # chunks are aligned: a resumed chunk is redrawn with its own seed
        size = min(chunk, n - c * chunk)
        tokens, stats = generate(model, noise, num_samples=size, length=settings["length"], steps=steps,
                                 method=settings["method"], sampling_dtype=settings["sampling_dtype"],
                                 batch_size=settings["rows_in_flight"], seed=derived_seed(settings["seed"], steps, c),
                                 progress=progress)
        enfe, rows = stats.enfe.tolist(), tokens.cpu().tolist()  # one device-to-host copy per chunk
        new = [{"index": c * chunk + r, "steps": steps, "ids": rows[r], "enfe": int(enfe[r])}
               for r in range(len(records) - c * chunk, size)]
        with LineFile(path, "a", fsync=True) as out:  # whole lines only, even on a full disk
            out.write_lines(json.dumps(r) for r in new)
        records += new
        write(f"steps {steps}: {len(records)}/{n} samples in {path}")
        if on_chunk is not None:
            on_chunk(steps, c)
    return records[:n]


def score_steps(records: list[dict], steps: int, scorer, sample_tokenizer, settings: dict, work_dir, *,
                device, progress: bool) -> dict:
    """Scores of one step count, cached in ``gen_ppl_steps<S>.json`` once computed."""
    path = Path(work_dir) / f"gen_ppl_steps{steps}.json"
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("num_samples") == len(records) and saved.get("scorer") == settings["scorer"]:
            return saved
    res = score_samples([{"ids": r["ids"]} for r in records], scorer, sample_tokenizer, device=device,
                        batch_size=settings["score_batch_size"], progress=progress)
    row = {"steps": steps, "num_samples": len(records), "scorer": settings["scorer"],
           "mean_ppl": res["mean_ppl"], "median_ppl": res["median_ppl"], "std_ppl": res["std_ppl"],
           "stderr_ppl": res["stderr_ppl"], "mean_entropy": res["mean_entropy"],
           "mean_entropy_bits": res["mean_entropy"] / math.log(2),
           "enfe": sum(r["enfe"] for r in records) / len(records), "paper_fp64_gen_ppl": GEN_PPL_FP64.get(steps),
           "per_sample_ppl": [p["ppl"] for p in res["per_sample"]],
           "per_sample_entropy": [p["entropy"] for p in res["per_sample"]]}
    write(f"steps {steps}: gen-PPL {row['mean_ppl']:.2f}, entropy {row['mean_entropy']:.3f} nats, "
          f"E-NFE {row['enfe']:.1f}")  # before the file: a full disk loses no result
    atomic_write_json(path, row, advice=PRINTED)
    return row


def run_gen_suite(model, noise, settings: dict, scorer, sample_tokenizer, work_dir, *, device, progress: bool = True,
                  on_chunk: Callable | None = None) -> dict:
    """Sample, score and tabulate every step count of ``settings["steps"]``.

    settings: ``steps`` (list), ``num_samples``, ``length``, ``chunk`` (samples per generate call and
        per flush), ``rows_in_flight``, ``method``, ``sampling_dtype``, ``seed``, ``scorer`` (its name),
        ``score_batch_size``, ``model_path``; scorer: a loaded ``(causal LM, tokenizer)`` pair.
    Returns the results dict also written to ``gen_ppl_suite.json`` / ``.md`` (+ ``.png``).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for steps in settings["steps"]:
        records = sample_steps(model, noise, steps, settings, work_dir, progress=progress, on_chunk=on_chunk)
        rows.append(score_steps(records, steps, scorer, sample_tokenizer, settings, work_dir, device=device,
                                progress=progress))
    results = {"settings": settings, "paper_source": f"{SOURCE}, {GEN_PPL_NOTE}",
               "paper_fp32_counterexample": FP32_COUNTEREXAMPLE,
               "rows": [{k: v for k, v in r.items() if not k.startswith("per_sample")} for r in rows]}
    md = table_markdown(results)
    print(md)  # before the files: a full disk loses no result
    atomic_write_json(work_dir / f"{RESULT_STEM}.json", results, advice=PRINTED)
    atomic_write_text(work_dir / f"{RESULT_STEM}.md", md, advice=PRINTED)
    plot = plot_results(results, work_dir / f"{RESULT_STEM}.png")
    print(f"plot written to {plot}" if plot else "plot skipped: matplotlib is not installed")
    return results


def table_markdown(results: dict) -> str:
    s = results["settings"]
    head = ["steps", "gen-PPL (mean)", "std", "s.e.", "median", "entropy (nats)", "entropy (bits)", "E-NFE",
            "paper fp64 gen-PPL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        paper = r["paper_fp64_gen_ppl"]
        lines.append(f"| {r['steps']} | {r['mean_ppl']:.2f} | {r['std_ppl']:.2f} | {r['stderr_ppl']:.2f} | "
                     f"{r['median_ppl']:.2f} | {r['mean_entropy']:.3f} | {r['mean_entropy_bits']:.3f} | "
                     f"{r['enfe']:.1f} | {'n/a' if paper is None else paper} |")
    return ("\n".join(lines) + f"\n\n{s['num_samples']} samples x {s['length']} tokens per row, {s['method']}, "
            f"{s['sampling_dtype']} Gumbel, scored by {s['scorer']}. Paper: {results['paper_source']}.\n")


def plot_results(results: dict, path: Path) -> Path | None:
    """gen-PPL (ours and the paper's fp64) and unigram entropy against steps; None without matplotlib."""
    try:  # matplotlib is optional and heavy: imported only when a plot is made
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["steps"] for r in results["rows"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.errorbar(steps, [r["mean_ppl"] for r in results["rows"]], yerr=[r["stderr_ppl"] for r in results["rows"]],
                 marker="o", label="ours")
    paper = sorted(GEN_PPL_FP64.items())
    ax1.plot([p[0] for p in paper], [p[1] for p in paper], "s--", label="paper (fp64, RADD-medium)")
    ax2.plot(steps, [r["mean_entropy"] for r in results["rows"]], marker="o")
    for ax, label in ((ax1, "generative perplexity"), (ax2, "unigram entropy (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
    ax1.legend()
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120), advice=PRINTED)
    plt.close(fig)
    return path
