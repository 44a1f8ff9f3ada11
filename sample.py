"""Sample text from a RADD checkpoint (the published flags, plus a few).

    python sample.py --model_path JingyangOu/radd-t-dce --batch_size 8 --steps 1024
    python sample.py --model_path ckpt --tokenizer bytes --prefix "Once upon" --suffix "the end." \\
        --infill "40:in the middle" --num_samples 16 --seed 0 --out samples.jsonl

Prints each sample, then E-NFE (model evaluations per sample), tokens/s and wall time.
``--engine fast`` (default) runs radd_fast.sampling.generate; ``--engine reference`` the
published-style DiffusionSampler / OrderedSampler loop. ``--out`` writes JSONL, one object
per sample: {"index", "text", "ids", "enfe"}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from radd_fast import load_model
from radd_fast.sampling import METHODS, STRATEGIES, DiffusionSampler, OrderedSampler, generate, text_conditioning
from radd_fast.sampling.conditioning import initial_state, projection
from radd_fast.sampling.strategies import check_strategy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="JingyangOu/radd-t-dce", help="hub repo id, hub-layout folder or run folder")
    p.add_argument("--batch_size", type=int, default=1, help="samples evaluated together")
    p.add_argument("--length", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--steps", type=int, default=1024)
    p.add_argument("--method", choices=METHODS, default="tweedie")
    p.add_argument("--strategy", choices=STRATEGIES, default="direct")
    p.add_argument("--strategy_para", type=float, default=None, help="p for top_p, k for top_k")
    p.add_argument("--prefix", default="", help="text fixed at the start")
    p.add_argument("--suffix", default="", help="text fixed at the end")
    p.add_argument("--infill", action="append", default=[], metavar="POS:TEXT",
                   help="text fixed from token position POS on (repeatable)")
    p.add_argument("--num_samples", type=int, default=None, help="default: --batch_size")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", default=None,
                   help="hub name, local folder, or 'bytes' (default: the checkpoint config's, else by vocab size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="compute dtype: bf16 / fp16 / fp32 (default: the model's)")
    p.add_argument("--backend", choices=("reference", "fast"), default=None,
                   help="model kernels (default: fast on CUDA, reference elsewhere)")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer body (fast engine)")
    p.add_argument("--sampling_dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--out", default=None, help="JSONL output path")
    p.add_argument("--no_progress", action="store_true")
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.num_samples is not None and args.num_samples < 1:
        p.error(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.length is not None and args.length < 1:
        p.error(f"--length must be >= 1, got {args.length}")
    try:
        args.strategy_para = check_strategy(args.strategy, args.strategy_para)
    except ValueError as e:
        p.error(str(e))
    args.infill = [parse_infill(p, spec) for spec in args.infill]


def parse_infill(p: argparse.ArgumentParser, spec: str) -> tuple[int, str]:
    pos, sep, text = spec.partition(":")
    if not sep or not pos.strip().lstrip("-").isdigit():
        p.error(f"--infill expects POS:TEXT with an integer POS, got {spec!r}")
    return int(pos), text


def load_tokenizer(name: str | None, config):
    from radd_fast.data.tokenizers import default_tokenizer_name, get_tokenizer

    if name is None:
        name = default_tokenizer_name(config)
    tok = get_tokenizer(str(name))
    if tok.vocab_size > config.tokens:
        raise ValueError(f"tokenizer {name!r} has {tok.vocab_size} ids but the model only {config.tokens} tokens")
    return tok


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = torch.device(args.device)
    backend = args.backend or ("fast" if device.type == "cuda" else "reference")
    model, noise = load_model(args.model_path, device=device, backend=backend, dtype=args.dtype)
    tok = load_tokenizer(args.tokenizer, model.config)
    length = args.length or model.length
    if length > model.length:
        parser.error(f"--length {length} exceeds the model's length {model.length}")
    num_samples = args.num_samples or args.batch_size
    try:
        cond = text_conditioning(length, tok.encode(args.prefix) if args.prefix else [],
                                 tok.encode(args.suffix) if args.suffix else [],
                                 {pos: tok.encode(text) for pos, text in args.infill})
        init = initial_state(cond, num_samples, length, model.mask_id, device)
    except ValueError as e:
        parser.error(str(e))

    t0 = time.perf_counter()
    if args.engine == "fast":
        tokens, stats = generate(model, noise, num_samples, length, args.steps, method=args.method,
                                 strategy=args.strategy, strategy_para=args.strategy_para, conditioning=cond,
                                 batch_size=args.batch_size, seed=args.seed, sampling_dtype=args.sampling_dtype,
                                 progress=not args.no_progress, compile=args.compile)
        enfe = stats.enfe.tolist()
    else:
        tokens, enfe = _reference(model, noise, args, num_samples, length, init)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0

    rows = tokens.cpu().tolist()
    out = open(args.out, "w", encoding="utf-8") if args.out else None
    try:
        for i, ids in enumerate(rows):
            text = tok.decode(ids)
            print(f"{'=' * 30} sample {i} {'=' * 30}\n{text}")
            if out is not None:
                out.write(json.dumps({"index": i, "text": text, "ids": ids, "enfe": int(enfe[i])}) + "\n")
    finally:
        if out is not None:
            out.close()
    n_free = int((init == model.mask_id).sum()) * (num_samples if init.shape[0] == 1 else 1)
    print(f"engine {args.engine} | {num_samples} samples x {length} tokens | E-NFE {sum(enfe) / len(enfe):.1f} "
          f"per sample | {n_free / wall:,.0f} tokens/s | wall {wall:.2f} s")
    return 0


def _reference(model, noise, args, num_samples, length, init):
    """The published loop, batch by batch."""
    gen_seed = args.seed if args.seed is not None else int(torch.randint(0, 2**62, ()))
    outs, enfe = [], []
    for b0 in range(0, num_samples, args.batch_size):
        B = min(args.batch_size, num_samples - b0)
        kw = dict(seed=gen_seed + b0, sampling_dtype=args.sampling_dtype)
        if args.method == "ordered":
            sampler = OrderedSampler(model, (B, length), model.vocab_size, args.strategy, args.strategy_para, **kw)
        else:
            sampler = DiffusionSampler(args.method, model, noise, (B, length), model.vocab_size, args.strategy,
                                       args.strategy_para, **kw)
        rows = init if init.shape[0] == 1 else init[b0:b0 + B]
        outs.append(sampler.sample(args.steps, projection(rows, model.mask_id)))
        enfe += sampler.last_row_nfe.tolist()
    return torch.cat(outs), enfe


if __name__ == "__main__":
    sys.exit(main())
