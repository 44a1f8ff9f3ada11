"""The evaluation CLI (``python eval.py`` / ``python -m radd_fast.evaluation.cli``).

Evaluate RADD checkpoints: zero-shot perplexity, or the generative perplexity of samples.

Zero-shot perplexity (published flags unchanged, spec 7)::

    python eval.py --model_path JingyangOu/radd-lambda-dce --valid_dataset wikitext2 \\
        --loss_type lambda_DCE --monte_carlo_timesteps 1024 --batch_size 16 --length 1024 --ngpus 1

Datasets: lambada, wikitext2, wikitext103, ptb, lm1b (Hugging Face datasets, each
with its detokenizer; test split unless --split) or a local text file path.
Prints ``Evaluation PPL: <value>`` and writes the settings, per-batch losses and
PPL as JSON into --work_dir. ``--engine fast`` (default on GPU): fused masked
loss, bf16, batched Monte Carlo draws; ``--engine reference``: the published
computation. ``--ngpus N`` runs N ranks (torch.distributed on 127.0.0.1).

Generative perplexity of samples (JSONL with ``text`` and/or ``ids`` per line)::

    python eval.py --gen_ppl samples.jsonl --eval_model gpt2-large --work_dir out/
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

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..errors import UserError
from .ppl import LOSS_TYPES, check_loss_type

HF_DATASETS = ("lambada", "wikitext2", "wikitext103", "ptb", "lm1b")


class EvalError(UserError):
    """A user-facing problem with the arguments or the data (printed without a traceback)."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Published flags (same names and meaning).
    ap.add_argument("--model_path", default="JingyangOu/radd-lambda-dce",
                    help="hub repo id, hub-layout folder or training-run folder")
    ap.add_argument("--batch_size", type=int, default=16, help="sequences per batch (per rank)")
    ap.add_argument("--length", type=int, default=None, help="block length (default: the model's)")
    ap.add_argument("--valid_dataset", default="wikitext103",
                    help=f"one of {', '.join(HF_DATASETS)} or a local text file path")
    ap.add_argument("--monte_carlo_timesteps", type=int, default=1,
                    help="noise draws per batch averaged per sequence (1 for the ar_* losses)")
    ap.add_argument("--ngpus", type=int, default=1, help="ranks (one process per GPU; CPU ranks use gloo)")
    ap.add_argument("--loss_type", default="lambda_DCE", help=f"one of {', '.join(LOSS_TYPES)}")
    ap.add_argument("--work_dir", default=".", help="folder for the JSON results")
    # Additions.
    ap.add_argument("--tokenizer", default=None,
                    help="'bytes', a hub name or a folder (default: the checkpoint config's 'tokenizer', else "
                         "gpt2 for a 50257-token model, bytes for 256)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise draws (rank r uses seed + r)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="compute dtype override: bf16, fp16 or fp32")
    ap.add_argument("--split", default="test", help="dataset split (default: test)")
    ap.add_argument("--engine", choices=("fast", "reference"), default=None,
                    help="fast: fused masked loss + batched draws (default on GPU); reference: published")
    ap.add_argument("--cache_dir", default="data", help="where tokenised corpora are cached")
    ap.add_argument("--max_batches", type=int, default=None, help="stop after this many batches per rank")
    ap.add_argument("--token_budget", type=int, default=None, help="tokens per forward on the fast engine")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model body (static shapes)")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    # Generative perplexity.
    ap.add_argument("--gen_ppl", default=None, metavar="SAMPLES.jsonl",
                    help="score samples with --eval_model instead of evaluating a RADD checkpoint")
    ap.add_argument("--eval_model", default="gpt2-large", help="causal LM scoring --gen_ppl (hub name or folder)")
    ap.add_argument("--gen_batch_size", type=int, default=8, help="windows per scorer forward")
    return ap


# -- data ----------------------------------------------------------------------------------------------
def check_dataset(dataset: str) -> None:
    if not Path(dataset).expanduser().exists() and dataset not in HF_DATASETS:
        raise EvalError(f"unknown dataset {dataset!r}: expected one of {', '.join(HF_DATASETS)} "
                        f"or the path of an existing local text file (.txt / .jsonl / folder of .txt)")


def load_blocks(dataset: str, tokenizer: str, length: int, split: str, cache_dir: str) -> torch.Tensor:
    """Token blocks [N, length] (int64) of a corpus name or a local text file (radd_fast.data)."""
    from .. import data

    check_dataset(dataset)
    try:
        blocks = data.load_blocks(dataset, split, data.get_tokenizer(tokenizer), length, cache_dir=cache_dir)
    except ValueError as e:  # DataError / tokenizer errors: too little text, bad split, unreadable source
        raise EvalError(str(e)) from e
    return torch.from_numpy(blocks[np.arange(len(blocks))])


# -- zero-shot perplexity ------------------------------------------------------------------------------
def resolve(args) -> argparse.Namespace:
    """Fill the defaults that depend on the machine; validate everything that needs no model."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError("--device cuda but no CUDA device is visible")
    args.engine = args.engine or ("fast" if args.device.startswith("cuda") else "reference")
    try:
        check_loss_type(args.loss_type, args.monte_carlo_timesteps)
    except ValueError as e:
        raise EvalError(str(e)) from e
    for name in ("batch_size", "ngpus"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.length is not None and args.length < 1:
        raise EvalError(f"--length must be >= 1, got {args.length}")
    check_dataset(args.valid_dataset)
    return args


def prepare(args):
    """Load the checkpoint (on the device for one rank, else on CPU for its config), take the length and
    tokenizer defaults from it, then the data blocks. Returns (args, blocks, (model, noise) or None)."""
    from ..checkpoint import load_model
    from ..data.tokenizers import default_tokenizer_name

    device = args.device if args.ngpus == 1 else "cpu"
    model, noise = load_model(args.model_path, device=device, backend=args.engine, dtype=args.dtype)
    if args.length is None:
        args.length = model.length
    elif args.length > model.length:
        raise EvalError(f"--length {args.length} is larger than the model's length {model.length} (model.length)")
    try:
        args.tokenizer = args.tokenizer or default_tokenizer_name(model.config)
    except ValueError as e:  # the config names no tokenizer and the vocabulary size fits none
        raise EvalError(str(e)) from e
    blocks = load_blocks(args.valid_dataset, args.tokenizer, args.length, args.split, args.cache_dir)
    if int(blocks.max()) >= model.config.tokens:
        raise EvalError(f"token id {int(blocks.max())} from tokenizer {args.tokenizer!r} is outside the model's "
                        f"{model.config.tokens} tokens: wrong --tokenizer?")
    return args, blocks, ((model, noise) if args.ngpus == 1 else None)


def evaluate_rank(rank: int, world: int, device: torch.device, args, blocks: torch.Tensor,
                  loaded=None) -> dict | None:
    """One rank's share of the evaluation; rank 0 returns (and writes) the results."""
    from ..checkpoint import load_model
    from .distributed import shard
    from .ppl import evaluate_ppl

    if loaded is None:
        loaded = load_model(args.model_path, device=device, backend=args.engine, dtype=args.dtype)
    model, noise = loaded
    if args.compile:
        from .ppl import compile_body

        compile_body(model)
    batches = shard(list(blocks.split(args.batch_size)), rank, world)
    torch.manual_seed(args.seed + rank)
    res = evaluate_ppl(model, noise, batches, loss_type=args.loss_type, mc_timesteps=args.monte_carlo_timesteps,
                       token_budget=args.token_budget, max_batches=args.max_batches,
                       progress=not args.no_progress, desc=f"{Path(args.valid_dataset).name} {args.loss_type}")
    if rank != 0:
        return None
    out = {
        "ppl": res.ppl,
        "mean_loss": res.mean_loss,
        "bits_per_token": res.bits_per_token,
        "num_batches": res.num_batches,
        "num_sequences": res.num_sequences,
        "batch_losses": res.batch_losses,
        "seconds": res.seconds,
        "sequences_timesteps_per_s": res.sequences_timesteps_per_s,
        "settings": {**settings(args), "world_size": world, "mc_per_forward": res.mc_per_forward,
                     "compute_dtype": str(model.compute_dtype).replace("torch.", ""), "backend": model.backend},
        "environment": environment(device),
    }
    path = Path(args.work_dir) / f"eval_ppl_{_tag(args.valid_dataset)}_{args.loss_type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"Evaluation PPL: {res.ppl}")
    print(f"results written to {path}")
    return out


def run_ppl(args) -> dict:
    args, blocks, loaded = prepare(resolve(args))
    if args.ngpus == 1:
        return evaluate_rank(0, 1, torch.device(args.device), args, blocks, loaded)
    from .distributed import launch

    launch(evaluate_rank, args.ngpus, torch.device(args.device).type, args, blocks)
    path = Path(args.work_dir) / f"eval_ppl_{_tag(args.valid_dataset)}_{args.loss_type}.json"
    return json.loads(path.read_text())


# -- generative perplexity -----------------------------------------------------------------------------
def run_gen_ppl(args) -> dict:
    from .gen_ppl import read_samples, score_samples

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        samples = read_samples(args.gen_ppl)
    except ValueError as e:  # malformed JSONL: a user error, reported without a traceback
        raise EvalError(str(e)) from e
    sample_tok = None
    if any("ids" in s for s in samples):
        from .. import data

        try:
            sample_tok = data.get_tokenizer(args.tokenizer or "gpt2")
        except ValueError as e:
            raise EvalError(str(e)) from e
    res = score_samples(samples, args.eval_model, sample_tok, device=device, batch_size=args.gen_batch_size,
                        progress=not args.no_progress)
    res["settings"] = {"samples": str(args.gen_ppl), "eval_model": args.eval_model,
                       "tokenizer": args.tokenizer or "gpt2", "device": device}
    res["environment"] = environment(torch.device(device))
    path = Path(args.work_dir) / f"gen_ppl_{_tag(args.gen_ppl)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"Generative PPL: {res['mean_ppl']}")
    print(f"Unigram entropy: {res['mean_entropy']}")
    print(f"results written to {path}")
    return res


# -- helpers -------------------------------------------------------------------------------------------
def settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("no_progress",)}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _tag(path_or_name: str) -> str:
    p = Path(str(path_or_name))
    return p.stem if p.suffix or p.exists() else str(path_or_name)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_gen_ppl(args) if args.gen_ppl else run_ppl(args)
    except (EvalError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result is not None and math.isfinite(result.get("ppl", result.get("mean_ppl", math.nan))) else 1


if __name__ == "__main__":
    sys.exit(main())
