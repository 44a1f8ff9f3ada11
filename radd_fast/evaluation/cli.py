"""The evaluation CLI (``python eval.py`` / ``python -m radd_fast.evaluation.cli``).

Zero-shot perplexity of one dataset (the published flags, with the published
protocol's defaults: PTB, 1024 Monte Carlo draws, a GLOBAL --batch_size divided
over --ngpus, WikiText2 on its train split)::

    python eval.py --model_path JingyangOu/radd-lambda-dce --valid_dataset wikitext2 \\
        --loss_type lambda_DCE --batch_size 16 --ngpus 1

The paper's zero-shot table (LAMBADA, WikiText2, PTB, WikiText103, 1BW; ours,
the paper's, the difference, the Monte Carlo standard error; resumable)::

    python eval.py --suite zero_shot --model_path JingyangOu/radd-t-dce --work_dir runs/table1

The generative-perplexity protocol (sample at each step count, score with a
causal LM, gen-PPL + unigram entropy + E-NFE, table and plot; resumable)::

    python eval.py --suite gen_ppl --model_path M --steps 32,64,128,256,512,1024,2048,4096 \\
        --scorer gpt2-large --work_dir runs/gen_ppl

Generative perplexity of existing samples (JSONL with ``text`` and/or ``ids``)::

    python eval.py --gen_ppl samples.jsonl --scorer gpt2-large --work_dir out/

Kernels and algorithm are separate flags: ``--backend reference|fast`` picks the
kernels (default fast on CUDA), ``--mc_batching`` / ``--no_mc_batching`` whether
several noise draws share one forward (default on for CUDA; off is the published
loop). The flags become one typed, validated ``EvalConfig`` (evaluation/config.py)
before any model is read; a bad flag or value is one ``error: ...`` line and exit
code 2, as in sample.py and train.py (``--debug`` or ``RADD_DEBUG=1``: the traceback).
The protocol is written down in docs/EVALUATION.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import data
from ..checkpoint import load_model
from ..data.tokenizers import tokenizer_mismatch
from ..distributed import DistEnv, shard, spawn_local_ranks
from ..errors import ArgParser, Switch, run_cli
from ..files import atomic_write_json
from ..losses.registry import LOSS_TYPES
from ..sampling.schedule import METHODS
from .config import AR_COLUMNS, BACKENDS, HF_DATASETS, SAMPLING_DTYPES, SUITES, EvalConfig, check_dataset
from .gen_ppl import load_scorer, read_samples, score_samples
from .gen_suite import run_gen_suite
from .ppl import compile_body, evaluate_ppl
from .protocol import PRINTED, EvalError, detokenizer_of, json_safe, published_split, rank_batch_size
from .suite import run_zero_shot

DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalConfig)}  # the flags' defaults: EvalConfig's


def build_parser() -> argparse.ArgumentParser:
    ap = ArgParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                   error_type=EvalError)
    d = DEFAULTS
    # Published flags (same names, meanings and defaults, except --ngpus: one local device by default).
    ap.add_argument("--model_path", default=d["model_path"],
                    help="hub repo id, hub-layout folder or training-run folder")
    ap.add_argument("--batch_size", type=int, default=d["batch_size"],
                    help="GLOBAL batch, divided over --ngpus (as published)")
    ap.add_argument("--length", type=int, default=None, help="block length (default: the model's; 1024 published)")
    ap.add_argument("--valid_dataset", default=d["valid_dataset"],
                    help=f"one of {', '.join(HF_DATASETS)} or a local text file")
    ap.add_argument("--monte_carlo_timesteps", type=int, default=None,
                    help="noise draws per batch (default 1024; 1 for the exact ar_* losses)")
    ap.add_argument("--ngpus", type=int, default=d["ngpus"], help="ranks (one process per GPU; CPU ranks use gloo)")
    ap.add_argument("--loss_type", default=None,
                    help=f"one of {', '.join(LOSS_TYPES)} (default lambda_DCE; --suite: the model's own)")
    ap.add_argument("--work_dir", default=d["work_dir"], help="folder for the results (checked writable first)")
    ap.add_argument("--cache_dir", default=d["cache_dir"], help="where tokenised corpora are cached")
    # Additions.
    ap.add_argument("--tokenizer", default=None,
                    help="'bytes', a hub name or a folder (default: the checkpoint config's, else by vocab size)")
    ap.add_argument("--seed", type=int, default=d["seed"], help="seed of the noise draws (rank r uses seed + r)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="compute dtype override: bf16, fp16 or fp32")
    ap.add_argument("--split", default=None,
                    help="dataset split (default: the published one: train for wikitext2, else test)")
    ap.add_argument("--backend", choices=BACKENDS, default=None,
                    help="kernels: fast (Triton, fused loss head; default on CUDA) or reference (plain PyTorch)")
    ap.add_argument("--mc_batching", action=Switch, default=None,
                    help="several noise draws per forward (default on for CUDA); --no_mc_batching: published loop")
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # removed: a clear error names the new flags
    ap.add_argument("--max_batches", type=int, default=None, help="stop after this many batches (per rank / dataset)")
    ap.add_argument("--token_budget", type=int, default=None, help="tokens per forward with --mc_batching")
    ap.add_argument("--static_rows", action="store_true",
                    help="the training step's static-capacity masked rows (static shapes; same law, other draws)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile: with --static_rows the whole loss, else the model body (static shapes)")
    ap.add_argument("--cuda_graphs", action=Switch, default=None,
                    help="replay the --static_rows loss from CUDA graphs (default on for CUDA with --static_rows)")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    # Suites.
    ap.add_argument("--suite", choices=SUITES, default=None,
                    help="zero_shot: the paper's table; gen_ppl: the generative-perplexity protocol")
    ap.add_argument("--datasets", default=",".join(d["datasets"]), help="zero_shot: comma-separated corpora")
    ap.add_argument("--dataset_files", nargs="+", default=[], metavar="NAME=PATH",
                    help="zero_shot: read a corpus from a local text file (its split and detokenizer still apply)")
    ap.add_argument("--ar_column", choices=AR_COLUMNS, default=None,
                    help="zero_shot: add the exact any-order likelihood of this order as a column")
    ap.add_argument("--steps", default=",".join(map(str, d["steps"])), help="gen_ppl: comma-separated step counts")
    ap.add_argument("--num_samples", type=int, default=d["num_samples"], help="gen_ppl: samples per step count")
    ap.add_argument("--sample_chunk", type=int, default=d["sample_chunk"],
                    help="gen_ppl: samples per generate call and flush")
    ap.add_argument("--rows_in_flight", type=int, default=d["rows_in_flight"], help="gen_ppl: rows per model evaluation")
    ap.add_argument("--sampling_dtype", choices=SAMPLING_DTYPES, default=d["sampling_dtype"],
                    help="gen_ppl: Gumbel noise dtype (paper: float64)")
    ap.add_argument("--method", choices=METHODS, default=d["method"], help="gen_ppl: sampling method")
    # Generative perplexity of a samples file.
    ap.add_argument("--gen_ppl", default=None, metavar="SAMPLES.jsonl",
                    help="score samples with --scorer instead of evaluating a RADD checkpoint")
    ap.add_argument("--scorer", "--eval_model", dest="eval_model", default=d["eval_model"],
                    help="causal LM that scores samples (hub name or local folder)")
    ap.add_argument("--gen_batch_size", type=int, default=d["gen_batch_size"], help="windows per scorer forward")
    return ap


# -- what every mode with a RADD model shares ---------------------------------------------------------------
def load_checkpoint(cfg: EvalConfig, device) -> tuple:
    """(model, noise, the config with the model's length, tokenizer and, for the suite, loss)."""
    model, noise = load_model(cfg.model_path, device=device, backend=cfg.backend, dtype=cfg.dtype)
    return model, noise, cfg.with_model(model)


def load_blocks(dataset: str, tokenizer: str, length: int, split: str, cache_dir: str, tokens: int,
                source: str | None = None) -> torch.Tensor:
    """Token blocks [N, length] (int64) of a corpus, read from ``source`` (a local file) when given,
    with the corpus's published detokenizer; checked against the model's ``tokens``."""
    source = source or dataset
    check_dataset(source)
    try:
        tok = data.get_tokenizer(tokenizer)
        problem = tokenizer_mismatch(tok.vocab_size, tokens, tokenizer, exact=False)  # before any tokenising
        if problem:
            raise EvalError(f"{problem}: wrong --tokenizer?")
        blocks = data.load_blocks(source, split, tok, length, cache_dir=cache_dir, detokenizer=detokenizer_of(dataset))
    except ValueError as e:  # DataError / tokenizer errors: too little text, bad split, unreadable source
        raise EvalError(str(e)) from e
    blocks = torch.from_numpy(blocks[np.arange(len(blocks))])
    if int(blocks.max()) >= tokens:
        raise EvalError(f"token id {int(blocks.max())} from tokenizer {tokenizer!r} is outside the model's "
                        f"{tokens} tokens: wrong --tokenizer?")
    return blocks


# -- zero-shot perplexity of one dataset -----------------------------------------------------------------
def run_ppl(cfg: EvalConfig) -> dict:
    device = cfg.device if cfg.ngpus == 1 else "cpu"  # N ranks: the parent only reads the config
    model, noise, cfg = load_checkpoint(cfg, device)
    blocks = load_blocks(cfg.valid_dataset, cfg.tokenizer, cfg.length, cfg.split, cfg.cache_dir,
                         model.config.tokens)
    report_blocks(cfg, blocks)
    if cfg.ngpus == 1:
        return evaluate_rank(DistEnv(device=torch.device(cfg.device)), cfg, blocks, (model, noise))
    try:
        spawn_local_ranks(evaluate_rank, cfg.ngpus, torch.device(cfg.device).type, cfg, blocks)
    except Exception as e:  # a rank's error arrives as its traceback text: report its last line only
        lines = [s for s in str(e).splitlines() if s.strip()]
        raise EvalError(f"a rank failed: {lines[-1] if lines else type(e).__name__}") from e
    return json.loads(result_path(cfg).read_text())


def report_blocks(cfg: EvalConfig, blocks: torch.Tensor) -> None:
    """Say which split and how much is evaluated before it starts (a truncated run says so too): blocks,
    batches, Monte Carlo draws; the progress bar gives the time left (tqdm's rate and ETA)."""
    rank_bs = rank_batch_size(cfg.batch_size, cfg.ngpus)
    n_batches = math.ceil(len(blocks) / rank_bs)
    used = n_batches if cfg.max_batches is None else min(n_batches, cfg.max_batches * cfg.ngpus)
    n_blocks = min(len(blocks), used * rank_bs)
    notes = ["the bar shows the time left from the first batch on"] if cfg.progress else []
    if cfg.max_batches is None:
        notes.append("--max_batches N stops after N batches")
    print(f"{cfg.valid_dataset}: split {cfg.split}, {len(blocks)} blocks of {cfg.length} tokens; evaluating "
          f"{n_blocks} blocks in {used} batches of {rank_bs} per rank on {cfg.ngpus} rank(s), "
          f"{cfg.monte_carlo_timesteps} Monte Carlo draws each" + (f" ({'; '.join(notes)})" if notes else ""))


def evaluate_rank(env: DistEnv, cfg: EvalConfig, blocks: torch.Tensor, loaded=None) -> dict | None:
    """One rank's share of the evaluation; rank 0 returns (and writes) the results."""
    if loaded is None:
        loaded = load_model(cfg.model_path, device=env.device, backend=cfg.backend, dtype=cfg.dtype)
    model, noise = loaded
    batches = shard(list(blocks.split(rank_batch_size(cfg.batch_size, env.world))), env)
    torch.manual_seed(cfg.seed + env.rank)
    res = evaluate_ppl(model, noise, batches, loss_type=cfg.loss_type, mc_timesteps=cfg.monte_carlo_timesteps,
                       mc_batching=cfg.mc_batching, token_budget=cfg.token_budget, max_batches=cfg.max_batches,
                       progress=cfg.progress, desc=f"{Path(cfg.valid_dataset).name} {cfg.loss_type}",
                       static_rows=cfg.static_rows, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)
    if not env.is_main:
        return None
    out = res.to_dict() | {
        "batch_vars": json_safe(res.batch_vars),  # NaN (one draw) -> null: valid JSON
        "settings": {**cfg.flags(), "world_size": env.world, "mc_per_forward": res.mc_per_forward,
                     "compute_dtype": str(model.compute_dtype).replace("torch.", ""), "backend": model.backend},
        "environment": environment(env.device),
    }
    path = result_path(cfg)
    stderr = "" if res.ppl_stderr is None else f" (Monte Carlo s.e. {res.ppl_stderr:.4g})"
    print(f"Evaluation PPL: {res.ppl}", flush=True)  # before the file: a full disk loses no result
    print(f"split {cfg.split}: {res.num_sequences} blocks in {res.num_batches} batches{stderr}; scored {res.scoring}",
          flush=True)
    atomic_write_json(path, out, advice=PRINTED)
    print(f"results written to {path}")
    return out


def result_path(cfg: EvalConfig) -> Path:
    return Path(cfg.work_dir) / f"eval_ppl_{_tag(cfg.valid_dataset)}_{cfg.loss_type}.json"


# -- the zero-shot suite ---------------------------------------------------------------------------------
def run_zero_shot_suite(cfg: EvalConfig) -> dict:
    model, noise, cfg = load_checkpoint(cfg, cfg.device)
    if cfg.compile:
        compile_body(model)

    def blocks_of(dataset: str):
        split = cfg.split or published_split(dataset)
        source = cfg.dataset_files.get(dataset)
        blocks = load_blocks(dataset, cfg.tokenizer, cfg.length, split, cfg.cache_dir, model.config.tokens, source)
        where = f"local file {source}" if source else "Hugging Face hub"
        return blocks, split, where

    return run_zero_shot(model, noise, cfg.zero_shot_settings(), blocks_of, cfg.work_dir, progress=cfg.progress)


# -- the generative-perplexity suite ----------------------------------------------------------------------
def run_gen_ppl_suite(cfg: EvalConfig) -> dict:
    model, noise, cfg = load_checkpoint(cfg, cfg.device)
    try:
        sample_tok = data.get_tokenizer(cfg.tokenizer)
    except ValueError as e:
        raise EvalError(str(e)) from e
    scorer = load_scorer(cfg.eval_model, cfg.device)  # before sampling: a missing scorer fails in seconds
    try:
        return run_gen_suite(model, noise, cfg.gen_suite_settings(), scorer, sample_tok, cfg.work_dir,
                             device=cfg.device, progress=cfg.progress)
    except ValueError as e:  # a bad sampling option (method, dtype) is a user error
        raise EvalError(str(e)) from e


# -- generative perplexity of a samples file ------------------------------------------------------------
def run_gen_ppl(cfg: EvalConfig) -> dict:
    try:
        samples = read_samples(cfg.gen_ppl)
    except (OSError, ValueError) as e:  # missing or malformed JSONL: a user error, reported without a traceback
        raise EvalError(str(e)) from e
    sample_tok = None
    if any("ids" in s for s in samples):
        try:
            sample_tok = data.get_tokenizer(cfg.tokenizer or "gpt2")
        except ValueError as e:
            raise EvalError(str(e)) from e
    scorer = load_scorer(cfg.eval_model, cfg.device)
    try:
        res = score_samples(samples, scorer, sample_tok, device=cfg.device, batch_size=cfg.gen_batch_size,
                            progress=cfg.progress)
    except ValueError as e:
        raise EvalError(str(e)) from e
    res["eval_model"] = str(cfg.eval_model)
    res["settings"] = cfg.samples_settings()
    res["environment"] = environment(torch.device(cfg.device))
    path = Path(cfg.work_dir) / f"gen_ppl_{_tag(cfg.gen_ppl)}.json"
    print(f"Generative PPL: {res['mean_ppl']}", flush=True)  # before the file: a full disk loses no result
    print(f"Unigram entropy: {res['mean_entropy']}", flush=True)
    atomic_write_json(path, res, advice=PRINTED)
    print(f"results written to {path}")
    return res


# -- helpers -------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _tag(path_or_name: str) -> str:
    p = Path(str(path_or_name))
    return p.stem if p.suffix or p.exists() else str(path_or_name)


RUNS = {"ppl": run_ppl, "zero_shot": run_zero_shot_suite, "gen_ppl_suite": run_gen_ppl_suite,
        "score_samples": run_gen_ppl}


def _main(argv: list[str]) -> int:
    cfg = EvalConfig.from_flags(build_parser().parse_args(argv))
    RUNS[cfg.mode](cfg)
    return 0


def main(argv=None) -> int:
    """eval.py's entry point: user errors print one line ``error: ...`` and exit 2 (radd_fast.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
