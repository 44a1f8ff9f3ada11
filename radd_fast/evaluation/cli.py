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
loop). The protocol is written down in docs/EVALUATION.md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import data
from ..checkpoint import check_device, load_model
from ..data.tokenizers import default_tokenizer_name, tokenizer_mismatch
from ..distributed import DistEnv, shard, spawn_local_ranks
from ..errors import UserError, run_cli
from ..losses.registry import LOSS_TYPES
from ..sampling.schedule import METHODS
from .gen_ppl import load_scorer, read_samples, score_samples
from .gen_suite import run_gen_suite
from .paper_numbers import GEN_PPL_STEPS, ZERO_SHOT_DATASETS
from .ppl import check_loss_type, compile_body, default_mc_batching, evaluate_ppl, evaluation_acceleration
from .protocol import (
    PUBLISHED_SPLITS,
    EvalError,
    check_work_dir,
    default_mc_timesteps,
    detokenizer_of,
    json_safe,
    model_loss_type,
    published_split,
    rank_batch_size,
)
from .suite import run_zero_shot

HF_DATASETS = tuple(PUBLISHED_SPLITS)
ENGINE_GONE = ("--engine is gone: it meant two things; use --backend reference|fast for the kernels and "
               "--mc_batching / --no_mc_batching for batched Monte Carlo draws")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Published flags (same names, meanings and defaults, except --ngpus: one local device by default).
    ap.add_argument("--model_path", default="JingyangOu/radd-lambda-dce",
                    help="hub repo id, hub-layout folder or training-run folder")
    ap.add_argument("--batch_size", type=int, default=16, help="GLOBAL batch, divided over --ngpus (as published)")
    ap.add_argument("--length", type=int, default=None, help="block length (default: the model's; 1024 published)")
    ap.add_argument("--valid_dataset", default="ptb", help=f"one of {', '.join(HF_DATASETS)} or a local text file")
    ap.add_argument("--monte_carlo_timesteps", type=int, default=None,
                    help="noise draws per batch (default 1024; 1 for the exact ar_* losses)")
    ap.add_argument("--ngpus", type=int, default=1, help="ranks (one process per GPU; CPU ranks use gloo)")
    ap.add_argument("--loss_type", default=None,
                    help=f"one of {', '.join(LOSS_TYPES)} (default lambda_DCE; --suite: the model's own)")
    ap.add_argument("--work_dir", default="runs/eval", help="folder for the results (checked writable first)")
    ap.add_argument("--cache_dir", default="data", help="where tokenised corpora are cached")
    # Additions.
    ap.add_argument("--tokenizer", default=None,
                    help="'bytes', a hub name or a folder (default: the checkpoint config's, else by vocab size)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise draws (rank r uses seed + r)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="compute dtype override: bf16, fp16 or fp32")
    ap.add_argument("--split", default=None,
                    help="dataset split (default: the published one: train for wikitext2, else test)")
    ap.add_argument("--backend", choices=("reference", "fast"), default=None,
                    help="kernels: fast (Triton, fused loss head; default on CUDA) or reference (plain PyTorch)")
    ap.add_argument("--mc_batching", action=argparse.BooleanOptionalAction, default=None,
                    help="several noise draws per forward (default on for CUDA); --no_mc_batching: published loop")
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # removed: a clear error names the new flags
    ap.add_argument("--max_batches", type=int, default=None, help="stop after this many batches (per rank / dataset)")
    ap.add_argument("--token_budget", type=int, default=None, help="tokens per forward with --mc_batching")
    ap.add_argument("--static_rows", action="store_true",
                    help="the training step's static-capacity masked rows (static shapes; same law, other draws)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile: with --static_rows the whole loss, else the model body (static shapes)")
    ap.add_argument("--cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="replay the --static_rows loss from CUDA graphs (default on for CUDA with --static_rows)")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    # Suites.
    ap.add_argument("--suite", choices=("zero_shot", "gen_ppl"), default=None,
                    help="zero_shot: the paper's table; gen_ppl: the generative-perplexity protocol")
    ap.add_argument("--datasets", default=",".join(ZERO_SHOT_DATASETS), help="zero_shot: comma-separated corpora")
    ap.add_argument("--dataset_files", nargs="+", default=[], metavar="NAME=PATH",
                    help="zero_shot: read a corpus from a local text file (its split and detokenizer still apply)")
    ap.add_argument("--ar_column", choices=("ar_forward", "ar_backward", "ar_random"), default=None,
                    help="zero_shot: add the exact any-order likelihood of this order as a column")
    ap.add_argument("--steps", default=",".join(map(str, GEN_PPL_STEPS)), help="gen_ppl: comma-separated step counts")
    ap.add_argument("--num_samples", type=int, default=1024, help="gen_ppl: samples per step count")
    ap.add_argument("--sample_chunk", type=int, default=256, help="gen_ppl: samples per generate call and flush")
    ap.add_argument("--rows_in_flight", type=int, default=64, help="gen_ppl: rows per model evaluation")
    ap.add_argument("--sampling_dtype", choices=("float64", "float32"), default="float64",
                    help="gen_ppl: Gumbel noise dtype (paper: float64)")
    ap.add_argument("--method", choices=METHODS, default="tweedie", help="gen_ppl: sampling method")
    # Generative perplexity of a samples file.
    ap.add_argument("--gen_ppl", default=None, metavar="SAMPLES.jsonl",
                    help="score samples with --scorer instead of evaluating a RADD checkpoint")
    ap.add_argument("--scorer", "--eval_model", dest="eval_model", default="gpt2-large",
                    help="causal LM that scores samples (hub name or local folder)")
    ap.add_argument("--gen_batch_size", type=int, default=8, help="windows per scorer forward")
    return ap


# -- shared checks ---------------------------------------------------------------------------------------
def _checked_device(device: str | None) -> str:
    """--device (default: cuda when visible) checked by the loader's own rule, the flag named."""
    try:
        return str(check_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    except UserError as e:
        raise EvalError(f"{e} (--device)") from None


def _check_counts(args) -> None:
    """Counts that must be >= 1 when given (0 or negative would mean "all" or slice from the end)."""
    for name in ("max_batches", "token_budget", "gen_batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise EvalError(f"--{name} must be >= 1, got {value}")


def _check_acceleration(args) -> None:
    """--compile / --cuda_graphs through the shared policy, before any model is loaded."""
    try:
        evaluation_acceleration(torch.device(args.device), args.static_rows, args.compile, args.cuda_graphs)
    except ValueError as e:
        raise EvalError(f"--cuda_graphs: {e}".replace("static_rows=True", "--static_rows")) from e


def resolve_common(args) -> argparse.Namespace:
    """Defaults that depend on the machine; everything checkable without a model, the work folder first."""
    if args.engine is not None:
        raise EvalError(ENGINE_GONE)
    args.device = _checked_device(args.device)
    _check_counts(args)
    _check_acceleration(args)
    args.backend = args.backend or ("fast" if args.device.startswith("cuda") else "reference")
    if args.mc_batching is None:
        args.mc_batching = default_mc_batching(torch.device(args.device))
    if args.length is not None and args.length < 1:
        raise EvalError(f"--length must be >= 1, got {args.length}")
    check_work_dir(args.work_dir)
    return args


def check_losses(loss_type: str, mc: int) -> None:
    try:
        check_loss_type(loss_type, mc)
    except ValueError as e:
        raise EvalError(str(e)) from e


def check_dataset(dataset: str) -> None:
    if not Path(dataset).expanduser().exists() and dataset not in HF_DATASETS:
        raise EvalError(f"unknown dataset {dataset!r}: expected one of {', '.join(HF_DATASETS)} "
                        f"or the path of an existing local text file (.txt / .jsonl / folder of .txt)")


def load_checkpoint(args, device):
    """(model, noise) with the length and tokenizer defaults taken from the model."""
    model, noise = load_model(args.model_path, device=device, backend=args.backend, dtype=args.dtype)
    if args.length is None:
        args.length = model.length
    elif args.length > model.length:
        raise EvalError(f"--length {args.length} is larger than the model's length {model.length} (model.length)")
    try:
        args.tokenizer = args.tokenizer or default_tokenizer_name(model.config)
    except ValueError as e:  # the config names no tokenizer and the vocabulary size fits none
        raise EvalError(str(e)) from e
    return model, noise


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
def run_ppl(args) -> dict:
    args = resolve_common(args)
    args.loss_type = args.loss_type or "lambda_DCE"
    args.monte_carlo_timesteps = args.monte_carlo_timesteps or default_mc_timesteps(args.loss_type)
    check_losses(args.loss_type, args.monte_carlo_timesteps)
    rank_bs = rank_batch_size(args.batch_size, args.ngpus)
    check_dataset(args.valid_dataset)
    args.split = args.split or published_split(args.valid_dataset)
    device = args.device if args.ngpus == 1 else "cpu"  # N ranks: the parent only reads the config
    model, noise = load_checkpoint(args, device)
    blocks = load_blocks(args.valid_dataset, args.tokenizer, args.length, args.split, args.cache_dir,
                         model.config.tokens)
    report_blocks(args, blocks, rank_bs)
    if args.ngpus == 1:
        return evaluate_rank(DistEnv(device=torch.device(args.device)), args, blocks, (model, noise))
    device_type = torch.device(args.device).type
    if device_type == "cuda" and args.ngpus > torch.cuda.device_count():
        raise EvalError(f"--ngpus {args.ngpus} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    try:
        spawn_local_ranks(evaluate_rank, args.ngpus, device_type, args, blocks)
    except Exception as e:  # a rank's error arrives as its traceback text: report its last line only
        lines = [s for s in str(e).splitlines() if s.strip()]
        raise EvalError(f"a rank failed: {lines[-1] if lines else type(e).__name__}") from e
    return json.loads(result_path(args).read_text())


def report_blocks(args, blocks: torch.Tensor, rank_bs: int) -> None:
    """Say which split and how many blocks are evaluated (a truncated run says so too)."""
    n_batches = math.ceil(len(blocks) / rank_bs)
    used = n_batches if args.max_batches is None else min(n_batches, args.max_batches * args.ngpus)
    n_blocks = min(len(blocks), used * rank_bs)
    print(f"{args.valid_dataset}: split {args.split}, {len(blocks)} blocks of {args.length} tokens; evaluating "
          f"{n_blocks} blocks in {used} batches of {rank_bs} per rank on {args.ngpus} rank(s)")


def evaluate_rank(env: DistEnv, args, blocks: torch.Tensor, loaded=None) -> dict | None:
    """One rank's share of the evaluation; rank 0 returns (and writes) the results."""
    if loaded is None:
        loaded = load_model(args.model_path, device=env.device, backend=args.backend, dtype=args.dtype)
    model, noise = loaded
    batches = shard(list(blocks.split(rank_batch_size(args.batch_size, env.world))), env)
    torch.manual_seed(args.seed + env.rank)
    res = evaluate_ppl(model, noise, batches, loss_type=args.loss_type, mc_timesteps=args.monte_carlo_timesteps,
                       mc_batching=args.mc_batching, token_budget=args.token_budget, max_batches=args.max_batches,
                       progress=not args.no_progress, desc=f"{Path(args.valid_dataset).name} {args.loss_type}",
                       static_rows=args.static_rows, compile=args.compile, cuda_graphs=args.cuda_graphs)
    if not env.is_main:
        return None
    out = res.to_dict() | {
        "batch_vars": json_safe(res.batch_vars),  # NaN (one draw) -> null: valid JSON
        "settings": {**settings(args), "world_size": env.world, "mc_per_forward": res.mc_per_forward,
                     "compute_dtype": str(model.compute_dtype).replace("torch.", ""), "backend": model.backend},
        "environment": environment(env.device),
    }
    path = result_path(args)
    path.write_text(json.dumps(out, indent=1))
    stderr = "" if res.ppl_stderr is None else f" (Monte Carlo s.e. {res.ppl_stderr:.4g})"
    print(f"Evaluation PPL: {res.ppl}")
    print(f"split {args.split}: {res.num_sequences} blocks in {res.num_batches} batches{stderr}; scored {res.scoring}")
    print(f"results written to {path}")
    return out


def result_path(args) -> Path:
    return Path(args.work_dir) / f"eval_ppl_{_tag(args.valid_dataset)}_{args.loss_type}.json"


# -- the zero-shot suite ---------------------------------------------------------------------------------
def parse_dataset_files(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--dataset_files expects NAME=PATH, got {item!r}")
        if not Path(path).expanduser().exists():
            raise EvalError(f"--dataset_files {name}: no such file {path}")
        out[name] = path
    return out


def run_zero_shot_suite(args) -> dict:
    args = resolve_common(args)
    if args.ngpus != 1:
        raise EvalError("--suite zero_shot runs on one device: use --ngpus 1")
    files = parse_dataset_files(args.dataset_files)
    datasets = [d for d in args.datasets.split(",") if d]
    for d in datasets:
        if d not in HF_DATASETS and d not in files:
            raise EvalError(f"--datasets: unknown corpus {d!r}; expected some of {', '.join(HF_DATASETS)} "
                            f"(or map it to a file with --dataset_files {d}=PATH)")
    model, noise = load_checkpoint(args, args.device)
    loss_type = args.loss_type or model_loss_type(model.config, args.model_path)
    mc = args.monte_carlo_timesteps or default_mc_timesteps(loss_type)
    check_losses(loss_type, mc)
    if args.compile:
        compile_body(model)
    settings_ = {"model_path": str(args.model_path), "loss_type": loss_type, "mc_timesteps": mc,
                 "length": args.length, "batch_size": args.batch_size, "seed": args.seed, "datasets": datasets,
                 "dataset_files": files, "ar_column": args.ar_column, "mc_batching": bool(args.mc_batching),
                 "token_budget": args.token_budget, "max_batches": args.max_batches, "tokenizer": args.tokenizer,
                 "split": args.split, "backend": args.backend, "dtype": args.dtype}

    def blocks_of(dataset: str):
        split = args.split or published_split(dataset)
        source = files.get(dataset)
        blocks = load_blocks(dataset, args.tokenizer, args.length, split, args.cache_dir, model.config.tokens, source)
        where = f"local file {source}" if source else "Hugging Face hub"
        return blocks, split, where

    return run_zero_shot(model, noise, settings_, blocks_of, args.work_dir, progress=not args.no_progress)


# -- the generative-perplexity suite ----------------------------------------------------------------------
def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise EvalError(f"--steps expects comma-separated whole numbers, got {text!r}") from e
    if not steps or min(steps) < 1:
        raise EvalError(f"--steps needs step counts >= 1, got {text!r}")
    return steps


def run_gen_ppl_suite(args) -> dict:
    args = resolve_common(args)
    steps = parse_steps(args.steps)
    for name in ("num_samples", "sample_chunk", "rows_in_flight"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name} must be >= 1, got {getattr(args, name)}")
    model, noise = load_checkpoint(args, args.device)
    try:
        sample_tok = data.get_tokenizer(args.tokenizer)
    except ValueError as e:
        raise EvalError(str(e)) from e
    scorer = load_scorer(args.eval_model, args.device)  # before sampling: a missing scorer fails in seconds
    settings_ = {"model_path": str(args.model_path), "steps": steps, "num_samples": args.num_samples,
                 "length": args.length, "chunk": args.sample_chunk, "rows_in_flight": args.rows_in_flight,
                 "method": args.method, "sampling_dtype": args.sampling_dtype, "seed": args.seed,
                 "scorer": str(args.eval_model), "score_batch_size": args.gen_batch_size, "tokenizer": args.tokenizer}
    try:
        return run_gen_suite(model, noise, settings_, scorer, sample_tok, args.work_dir, device=args.device,
                             progress=not args.no_progress)
    except ValueError as e:  # a bad sampling option (method, dtype) is a user error
        raise EvalError(str(e)) from e


# -- generative perplexity of a samples file ------------------------------------------------------------
def run_gen_ppl(args) -> dict:
    device = _checked_device(args.device)
    _check_counts(args)
    check_work_dir(args.work_dir)
    try:
        samples = read_samples(args.gen_ppl)
    except (OSError, ValueError) as e:  # missing or malformed JSONL: a user error, reported without a traceback
        raise EvalError(str(e)) from e
    sample_tok = None
    if any("ids" in s for s in samples):
        try:
            sample_tok = data.get_tokenizer(args.tokenizer or "gpt2")
        except ValueError as e:
            raise EvalError(str(e)) from e
    scorer = load_scorer(args.eval_model, device)
    try:
        res = score_samples(samples, scorer, sample_tok, device=device, batch_size=args.gen_batch_size,
                            progress=not args.no_progress)
    except ValueError as e:
        raise EvalError(str(e)) from e
    res["eval_model"] = str(args.eval_model)
    res["settings"] = {"samples": str(args.gen_ppl), "eval_model": args.eval_model,
                       "tokenizer": args.tokenizer or "gpt2", "device": device}
    res["environment"] = environment(torch.device(device))
    path = Path(args.work_dir) / f"gen_ppl_{_tag(args.gen_ppl)}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"Generative PPL: {res['mean_ppl']}")
    print(f"Unigram entropy: {res['mean_entropy']}")
    print(f"results written to {path}")
    return res


# -- helpers -------------------------------------------------------------------------------------------
def settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("no_progress", "engine")}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _tag(path_or_name: str) -> str:
    p = Path(str(path_or_name))
    return p.stem if p.suffix or p.exists() else str(path_or_name)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.gen_ppl:
        run_gen_ppl(args)
    elif args.suite == "zero_shot":
        run_zero_shot_suite(args)
    elif args.suite == "gen_ppl":
        run_gen_ppl_suite(args)
    else:
        run_ppl(args)
    return 0


def main(argv=None) -> int:
    """eval.py's entry point: user errors print one line ``error: ...`` and exit 2 (radd_fast.errors)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
