"""The zero-shot suite: the paper's Table 1 protocol in one run, resumable, with standard errors.

For each corpus (LAMBADA, WikiText2, PTB, WikiText103, 1BW by default) the
token blocks are evaluated in batches with the model's own loss type and
``mc_timesteps`` noise draws per batch (``ppl.batch_estimate``); optionally an
exact any-order likelihood (``ar_forward`` / ``ar_backward`` / ``ar_random``) as
a second column. After every batch the state (per-batch losses and Monte Carlo
variances) is written atomically to ``zero_shot_state.json`` in the work folder,
and each batch's noise is seeded from (seed, dataset, column, batch index): a
killed run restarts at the dataset and batch where it stopped and ends with
exactly the numbers of an uninterrupted one. The table (ours, the paper's, the
difference, the standard error of ours) is printed, then written as JSON and markdown
(``radd_fast.files``: a full disk is one error line naming the file, after the table).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from ..files import atomic_write_json, atomic_write_text
from ..progress import progress_bar, write
from .paper_numbers import DATASET_TITLES, SOURCE, ZERO_SHOT_NOTE, ZERO_SHOT_TABLE, paper_row
from .ppl import (
    batch_estimate,
    check_finite,
    check_loss_type,
    make_loss_fn,
    mc_per_forward,
    perplexity,
    ppl_standard_error,
)
from .protocol import PRINTED, RESUME, EvalError, derived_seed

STATE_FILE = "zero_shot_state.json"
RESULT_STEM = "zero_shot"
MAIN_COLUMN = "bound"


def columns_of(settings: dict) -> dict:
    """Column name -> (loss type, Monte Carlo draws): the model's loss, then the optional exact one."""
    cols = {MAIN_COLUMN: (settings["loss_type"], settings["mc_timesteps"])}
    if settings.get("ar_column"):
        cols[settings["ar_column"]] = (settings["ar_column"], 1)
    return cols


def load_state(work_dir: Path, settings: dict) -> dict:
    """The saved state of a suite with the same settings, or a fresh one; EvalError on a mismatch."""
    path = Path(work_dir) / STATE_FILE
    if not path.exists():
        return {"settings": settings, "datasets": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{path} is not a readable suite state ({e}): delete it to start over") from e
    saved = state.get("settings", {})
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        raise EvalError(f"{path} holds a suite run with other settings ({', '.join(changed)}): use another "
                        f"--work_dir, or delete the file to start over")
    return state


def run_zero_shot(model, noise, settings: dict, blocks_of: Callable[[str], tuple], work_dir, *,
                  progress: bool = True, on_batch: Callable | None = None) -> dict:
    """Evaluate every dataset of ``settings["datasets"]``, resuming from the work folder's state.

    settings: ``loss_type``, ``mc_timesteps``, ``length``, ``batch_size``, ``seed``, ``datasets``,
        ``ar_column`` (None or an ar_* loss), ``mc_batching``, ``token_budget``, ``max_batches``
        and anything else that identifies the run (model path, tokenizer); all JSON values.
    blocks_of: dataset -> (blocks [N, length] int64, split, source description); called only for
        datasets not yet finished.
    on_batch: ``on_batch(dataset, column, batch_index)`` after each batch is saved (tests stop here).
    Returns the results dict also written to ``zero_shot.json`` / ``zero_shot.md``.
    """
    for loss_type, mc in columns_of(settings).values():
        check_loss_type(loss_type, mc)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state = load_state(work_dir, settings)
    model.eval()
    for dataset in settings["datasets"]:
        entry = state["datasets"].setdefault(dataset, {})
        if entry.get("done"):
            continue
        blocks, split, source = blocks_of(dataset)
        batches = list(blocks.split(settings["batch_size"]))
        if settings.get("max_batches"):
            batches = batches[:settings["max_batches"]]
        entry.update(split=split, source=source, num_blocks=sum(len(b) for b in batches),
                     num_batches=len(batches), available_blocks=len(blocks))
        write(f"{dataset}: split {split}, {entry['num_blocks']} blocks of {blocks.shape[1]} tokens "
              f"in {len(batches)} batches ({source})")
        for column, (loss_type, mc) in columns_of(settings).items():
            _run_column(model, noise, settings, state, dataset, column, loss_type, mc, batches, work_dir,
                        progress, on_batch)
        entry["done"] = True
        atomic_write_json(work_dir / STATE_FILE, state, advice=RESUME)
    results = summarize(state, settings)
    write_results(results, work_dir)
    return results


def _run_column(model, noise, settings, state, dataset, column, loss_type, mc, batches, work_dir, progress,
                on_batch) -> None:
    """The remaining batches of one (dataset, column); the state is saved after each."""
    col = state["datasets"][dataset].setdefault(column, {"loss_type": loss_type, "mc_timesteps": mc,
                                                         "batch_losses": [], "batch_vars": [], "num_sequences": 0})
    loss_fn = make_loss_fn(model, noise, loss_type)
    start = len(col["batch_losses"])
    bar = progress_bar(progress, len(batches), f"{dataset} {loss_type}", unit="batch", initial=start)
    try:
        for i in range(start, len(batches)):
            x = batches[i].to(model.device).long()
            k = mc_per_forward(model.device, tuple(x.shape), mc, loss_type, settings.get("token_budget"),
                               bool(settings.get("mc_batching")))
            torch.manual_seed(derived_seed(settings["seed"], dataset, column, i))
            with torch.no_grad():
                loss, var = batch_estimate(loss_fn, model, x, mc, k)
            check_finite(loss, f"{dataset} batch {i}")
            col["batch_losses"].append(float(loss))
            col["batch_vars"].append(None if math.isnan(float(var)) else float(var))
            col["num_sequences"] += int(x.shape[0])
            atomic_write_json(work_dir / STATE_FILE, state, advice=RESUME)
            bar.update(1)
            if on_batch is not None:
                on_batch(dataset, column, i)
    finally:
        bar.close()


def column_summary(col: dict, length: int) -> dict:
    """PPL and its Monte Carlo standard error of one (dataset, column) from its per-batch values."""
    losses = col["batch_losses"]
    variances = [math.nan if v is None else v for v in col["batch_vars"]]
    mean = sum(losses) / len(losses)
    exact = col["mc_timesteps"] == 1 and col["loss_type"].startswith("ar_")
    stderr = 0.0 if exact else ppl_standard_error(losses, variances, length)
    return {"loss_type": col["loss_type"], "mc_timesteps": col["mc_timesteps"], "mean_loss": mean,
            "ppl": perplexity(mean, length), "ppl_stderr": stderr, "num_batches": len(losses),
            "num_sequences": col["num_sequences"]}


def summarize(state: dict, settings: dict) -> dict:
    """The suite's results: one row per dataset with ours, the paper's value and the difference."""
    row_name = paper_row(settings["loss_type"], settings.get("model_path", ""))
    paper = ZERO_SHOT_TABLE.get(row_name, {})
    rows = []
    for dataset in settings["datasets"]:
        entry = state["datasets"][dataset]
        cols = {c: column_summary(entry[c], settings["length"]) for c in columns_of(settings)}
        ours = cols[MAIN_COLUMN]["ppl"]
        ref = paper.get(dataset)
        rows.append({"dataset": dataset, "split": entry["split"], "source": entry["source"],
                     "num_blocks": entry["num_blocks"], "available_blocks": entry["available_blocks"],
                     "ppl": ours, "ppl_stderr": cols[MAIN_COLUMN]["ppl_stderr"], "paper": ref,
                     "difference": None if ref is None else ours - ref, "columns": cols})
    return {"settings": settings, "paper_row": row_name, "paper_source": f"{SOURCE}, {ZERO_SHOT_NOTE}",
            "rows": rows}


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table_markdown(results: dict) -> str:
    """The table as markdown: dataset, split, blocks, ours +- s.e., the paper's, difference (+ ar column)."""
    s = results["settings"]
    ar = s.get("ar_column")
    head = ["dataset", "split", "blocks", f"ours ({s['loss_type']}, {s['mc_timesteps']} draws)", "MC s.e.",
            f"paper ({results['paper_row'] or 'no row'})", "difference"] + ([f"{ar} (exact)"] if ar else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        cells = [DATASET_TITLES.get(r["dataset"], r["dataset"]), r["split"], str(r["num_blocks"]), _fmt(r["ppl"]),
                 _fmt(r["ppl_stderr"], 3), _fmt(r["paper"]),
                 "n/a" if r["difference"] is None else f"{r['difference']:+.2f}"]
        if ar:
            cells.append(_fmt(r["columns"][ar]["ppl"]))
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nPaper: {results['paper_source']}. Ours: PPL = exp(mean loss / {s['length']}), an upper bound for "
            f"the diffusion losses; MC s.e.: Monte Carlo standard error (delta method, docs/EVALUATION.md).")
    return "\n".join(lines) + "\n" + note + "\n"


def write_results(results: dict, work_dir: Path) -> None:
    """``zero_shot.json`` and ``zero_shot.md`` in the work folder; the table printed."""
    md = table_markdown(results)
    print(md)  # before the files: a full disk loses no result
    atomic_write_json(Path(work_dir) / f"{RESULT_STEM}.json", results, advice=PRINTED)
    atomic_write_text(Path(work_dir) / f"{RESULT_STEM}.md", md, advice=PRINTED)
