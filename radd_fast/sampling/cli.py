"""The sampling CLI (``python sample.py`` / ``python -m radd_fast.sampling.cli``).

Sample text from a RADD checkpoint: the published ``run_sample.py`` flags with their
published meanings, plus a few::

    python sample.py --model_path JingyangOu/radd-t-dce --batch_size 8 --steps 1024
    python sample.py --model_path ckpt --tokenizer bytes --prefix "Once upon" --suffix "the end." \\
        --infill "40:in the middle" --batch_size 16 --seed 0 --out out/samples.jsonl

``--batch_size`` is the number of samples (published); ``--num_samples`` says the same and
wins when both are given; ``--rows_in_flight`` is how many rows one model evaluation takes
(default: from the free device memory, see ``SamplerConfig``). ``--method ordered`` reveals left to right as
published (``--order random``: a random order per row). ``--strategy_para`` defaults to the
published CLI's 0.8 for top_p (``PUBLISHED_CLI_TOP_P``; the library's default, used by ``generate``, is
0.9: ``PUBLISHED_LIBRARY_TOP_P``), and to the published ``top_k_sampling`` k = 400 for top_k.

Prints each sample, then one summary line: what was sampled (method, steps, strategy, the
Gumbel dtype: float64 by default, the paper's protocol; ``--sampling_dtype float32`` draws
the published code's noise), the seed, E-NFE (model evaluations per sample), tokens/s and wall
time. The fast loop keys sample i's randomness by (``--seed``, i), so the samples do not depend
on ``--rows_in_flight``, ``--wave_size`` or the number of ranks, and it hands each sample over as
soon as it and every sample before it are done (at most a second later; output.py). Under
torchrun rank r makes samples [r N / world, (r + 1) N / world). ``--loop`` picks the sampling
loop: ``fast`` (default) runs ``radd_fast.sampling.generate``; ``published_api`` the published
DiffusionSampler / OrderedSampler loop (``sampling/published_api.py``; its samples depend on
``--rows_in_flight``). ``--engine fast|reference``, its old name, still works and warns in one line.
``--decoder confidence|entropy_bound|low_confidence`` with ``--decoder_para X`` (opt-in, fast loop) reveals
the positions the model is most confident of instead of the schedule's random ones: approximate, and
labelled ``approximate (<decoder> <knob>)`` in the summary and in every record.
``--out`` writes JSONL, one object per sample, in whole lines (Ctrl-C or a full disk keeps every
sample written before it): {"index", "text", "ids", "enfe", "sampler"}. Every bad flag or file is
one ``error: ...`` line and exit code 2, found before any sampling (``--debug`` or
``RADD_DEBUG=1``: the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import check_device, load_model
from ..config import parse_dtype
from ..data.tokenizers import default_tokenizer_name, get_tokenizer, tokenizer_mismatch
from ..distributed import DistEnv, broadcast_object, cleanup, gather_objects, init_distributed
from ..errors import ArgParser, Switch, UserError, run_cli
from ..files import WriteError
from ..model.kv_cache import KVCache
from ..progress import progress_bar
from .conditioning import initial_state, projection, text_conditioning
from .config import SamplerConfig, auto_rows_in_flight
from .decoders import DECODERS
from .engine import generate
from .output import SampleWriter, rank_path
from .published_api import DiffusionSampler, OrderedSampler
from .schedule import METHODS
from .strategies import PUBLISHED_CLI_TOP_P, PUBLISHED_LIBRARY_TOP_K, STRATEGIES

# The published run_sample.py's --strategy_para default is 0.8 for every strategy (not the library's
# top-p 0.9); 0.8 is no whole number, so top_k takes the library's top_k_sampling default instead.
PUBLISHED_CLI_PARA = {"top_p": PUBLISHED_CLI_TOP_P}
ORDERS = ("left_to_right", "random")
# --loop: which sampling loop runs. fast: the engine (generate); published_api: DiffusionSampler /
# OrderedSampler, the published loop step by step (sampling/published_api.py).
LOOPS = ("fast", "published_api")
# --engine, the old name of --loop (its "reference" was the published-API loop, not the reference backend).
ENGINE_TO_LOOP = {"fast": "fast", "reference": "published_api"}


class SampleArgError(UserError):
    """A bad sample.py flag (printed as one line, exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                  error_type=SampleArgError)
    # Published flags (same names and meanings).
    p.add_argument("--model_path", default="JingyangOu/radd-t-dce", help="hub repo id, hub-layout folder or run folder")
    p.add_argument("--batch_size", type=int, default=1, help="number of samples (published meaning)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--steps", type=int, default=1024)
    p.add_argument("--method", choices=METHODS, default="tweedie")
    p.add_argument("--strategy", choices=STRATEGIES, default="direct")
    p.add_argument("--strategy_para", type=float, default=None,
                   help=f"p for top_p (default {PUBLISHED_CLI_TOP_P}, the published CLI's), whole-number k for top_k "
                        f"(default {PUBLISHED_LIBRARY_TOP_K}, the published library's)")
    # Additions.
    p.add_argument("--num_samples", type=int, default=None, help="number of samples (default: --batch_size)")
    p.add_argument("--rows_in_flight", type=int, default=None,
                   help="rows per model evaluation (default: from the free device memory; at most 16 on CPU)")
    p.add_argument("--order", choices=ORDERS, default="left_to_right",
                   help="--method ordered: reveal order (published: left to right)")
    p.add_argument("--prefix", default="", help="text fixed at the start")
    p.add_argument("--suffix", default="", help="text fixed at the end")
    p.add_argument("--infill", action="append", default=[], metavar="POS:TEXT",
                   help="text fixed from token position POS on (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", default=None,
                   help="hub name, local folder, or 'bytes' (default: the checkpoint config's, else by vocab size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="compute dtype: bf16 / fp16 / fp32 (default: the model's)")
    p.add_argument("--backend", choices=("reference", "fast"), default=None,
                   help="model kernels (default: fast on CUDA, reference elsewhere)")
    p.add_argument("--loop", choices=LOOPS, default=None,
                   help="sampling loop: fast (default; radd_fast.generate) or published_api (the published "
                        "DiffusionSampler / OrderedSampler loop)")
    p.add_argument("--engine", choices=tuple(ENGINE_TO_LOOP), default=None,
                   help="deprecated: the old name of --loop (--engine reference is --loop published_api)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer body (--loop fast)")
    p.add_argument("--cuda_graphs", action=Switch, default=None,
                   help="replay the evaluations from CUDA graphs (--loop fast; default on for CUDA); --no_cuda_graphs: "
                        "eager")
    p.add_argument("--sampling_dtype", choices=("float32", "float64"), default="float64",
                   help="Gumbel noise dtype: float64 (the paper's protocol) or float32 (the published code's noise)")
    p.add_argument("--out", default=None, help="JSONL output path (its folder must exist)")
    p.add_argument("--refresh_every", type=int, default=None, metavar="R",
                   help="APPROXIMATE: reuse each row's keys/values, a full evaluation every R of its evaluations "
                        "(docs/SAMPLING.md); omit for exact sampling")
    p.add_argument("--decoder", choices=DECODERS, default=None,
                   help="APPROXIMATE: reveal what the model is confident of instead of the schedule's random "
                        "positions (docs/SAMPLING.md, 'Adaptive decoders'); omit for exact sampling")
    p.add_argument("--decoder_para", type=float, default=None, metavar="X",
                   help="the decoder's knob: tau for confidence (default 0.9), gamma for entropy_bound (default 1.0); "
                        "low_confidence has none (--steps sets its pace)")
    p.add_argument("--wave_size", type=int, default=None,
                   help="samples planned together, to bound memory (default: max(32 x rows in flight, 4096)); "
                        "samples are written as they finish whatever it is")
    p.add_argument("--no_progress", action="store_true")
    return p


@dataclass
class Run:
    """The checked arguments of one call."""

    args: argparse.Namespace
    device: torch.device
    loop: str  # one of LOOPS (--loop, or the deprecated --engine)
    num_samples: int
    infill: list[tuple[int, str]]
    sampler: SamplerConfig  # the order is set once the length is known (after loading)


def main(argv=None) -> int:
    """``sample.py``'s entry point: 0 on success, 2 (one ``error:`` line) on a user error."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    run = check_args(build_parser().parse_args(_join_infill_values(argv)))
    env = _join_ranks(run)
    try:
        return _sample(run, env)
    finally:
        cleanup(env)


def _join_ranks(run: Run) -> DistEnv:
    """Under torchrun, one rank per process (a GPU each, or gloo on CPU); alone, this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistEnv(device=run.device)
    if run.loop != "fast":
        raise SampleArgError("several ranks (torchrun) need --loop fast; --loop published_api runs in one process")
    env = init_distributed(run.device.type)
    run.device = env.device
    return env


def _sample(run: Run, env: DistEnv) -> int:
    # Before any work; ranks > 0 stream into <out>.rank<r> beside it (rank 0's check covers the folder).
    out_path = check_output(run.args.out) if env.is_main else run.args.out and Path(run.args.out).expanduser()
    model, noise = _with_flag("--model_path", load_model, run.args.model_path, device=run.device,
                              backend=_backend(run), dtype=run.args.dtype)
    check_finite_weights(model, run.args.model_path)
    tok = _with_flag("--tokenizer", load_tokenizer, run.args.tokenizer, model.config)
    length = check_length(run.args.length, model.length)
    init, cond = _conditioning(run, tok, length, model.mask_id)
    first, count = rank_share(run.num_samples, env)
    cache_bytes = KVCache.bytes_per_row(model, length) if run.sampler.refresh_every else 0
    rows = run.sampler.rows_in_flight or auto_rows_in_flight(max(count, 1), length, model.config.model.hidden_size,
                                                             run.device, cache_bytes)
    sampler = run.sampler.replace(order=_order(run, length), rows_in_flight=rows)
    seed = broadcast_object(run.args.seed if run.args.seed is not None else int(torch.randint(0, 2**62, ())), env)
    # Only now: a run refused above leaves an existing file as it was.
    writer = SampleWriter(None if out_path is None else rank_path(out_path, env.rank), tok, sampler.describe(),
                          echo=env.is_main)
    kept = []  # this rank's samples: (first index, tokens [n, L], E-NFE [n]), for the summary and rank 0

    def deliver(start: int, tokens: torch.Tensor, enfe) -> None:
        writer.write(start, tokens, enfe)
        kept.append((start, tokens, [int(e) for e in enfe]))

    try:
        t0 = time.perf_counter()
        if run.loop == "fast":
            _fast(run, sampler, model, noise, length, cond, seed, first, count, env, deliver)
        else:
            _published_api(run, sampler, model, noise, length, init, seed, deliver)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        wall = time.perf_counter() - t0
    except KeyboardInterrupt:
        writer.close()
        raise KeyboardInterrupt(f"{writer.note()}, whole lines{_others_kept(out_path, env)}") from None
    except BaseException:
        writer.close()
        raise
    try:
        shares = gather_objects(kept if not env.is_main else [], env)
        if env.world > 1:
            _merge_ranks(writer, shares, out_path, env)
    finally:
        writer.close()
    counts = gather_objects(count, env)
    if env.is_main:
        enfe_all = [e for share in [kept, *shares[1:]] for _, _, enfe in share for e in enfe]
        print(summary_line(run, sampler, length, init, model.mask_id, enfe_all, wall, counts, seed))
    return 0


def rank_share(num_samples: int, env: DistEnv) -> tuple[int, int]:
    """(first sample, count) of this rank: the contiguous [r N / world, (r + 1) N / world), so every rank
    makes num_samples / world of them, give or take one."""
    first, end = env.rank * num_samples // env.world, (env.rank + 1) * num_samples // env.world
    return first, end - first


def _merge_ranks(writer: SampleWriter, shares: list, out_path: Path | None, env: DistEnv) -> None:
    """Rank 0 appends (and prints) the other ranks' samples in rank order; then each rank removes its
    own ``<out>.rank<r>``, which kept them in case the run stopped. A failed append leaves them."""
    error = None
    if env.is_main:
        try:
            for share in shares[1:]:
                for start, tokens, enfe in share:
                    writer.write(start, tokens, enfe)
        except WriteError as e:
            error = e
    merged = broadcast_object(error is None, env)
    if merged and out_path is not None and not env.is_main:
        rank_path(out_path, env.rank).unlink(missing_ok=True)
    if error is not None:
        raise error


def _others_kept(out_path: Path | None, env: DistEnv) -> str:
    if env.world == 1 or out_path is None:
        return ""
    return f" (ranks 1-{env.world - 1}: {out_path.name}.rank<r>)"


# -- checks before any work -----------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> Run:
    """Every flag that can be checked without the model, with the flag named in each error."""
    for flag in ("steps", "batch_size", "num_samples", "length", "rows_in_flight", "wave_size", "refresh_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SampleArgError(f"--{flag} must be >= 1, got {value}")
    if args.dtype is not None:
        _with_flag("--dtype", parse_dtype, args.dtype)
    device = _with_flag("--device", check_device, args.device)
    loop = resolve_loop(args.loop, args.engine)
    if args.refresh_every is not None and loop != "fast":
        raise SampleArgError("--refresh_every (approximate key/value reuse) needs --loop fast")
    if args.decoder is not None and loop != "fast":
        raise SampleArgError(f"--decoder {args.decoder} (an approximate adaptive decoder) needs --loop fast")
    if args.decoder_para is not None and args.decoder is None:
        raise SampleArgError(f"--decoder_para {args.decoder_para:g} needs --decoder (one of {', '.join(DECODERS)})")
    if args.cuda_graphs and torch.device(device).type != "cuda":
        raise SampleArgError(f"--cuda_graphs needs a CUDA --device (got {device}); leave it unset or pass "
                             "--no_cuda_graphs")
    if args.strategy == "direct" and args.strategy_para is not None:
        raise SampleArgError(f"--strategy_para {args.strategy_para:g} does nothing with --strategy direct (it is p for "
                             "top_p, k for top_k): pass --strategy top_p or top_k, or drop --strategy_para")
    infill = [parse_infill(spec) for spec in args.infill]
    num_samples = args.num_samples or args.batch_size
    try:
        sampler = SamplerConfig(steps=args.steps, method=args.method, strategy=args.strategy,
                                strategy_para=_cli_para(args.strategy, args.strategy_para),
                                sampling_dtype=args.sampling_dtype, compile=args.compile, cuda_graphs=args.cuda_graphs,
                                rows_in_flight=args.rows_in_flight,  # None: settled once the model is loaded
                                wave_size=args.wave_size, refresh_every=args.refresh_every, decoder=args.decoder,
                                decoder_para=args.decoder_para)
    except ValueError as e:
        raise SampleArgError(_flag_named(str(e))) from None
    return Run(args, device, loop, num_samples, infill, sampler)


def _flag_named(message: str) -> str:
    """A SamplerConfig error with the flag that set the value named, if the message does not name it."""
    for field in ("strategy_para", "decoder_para"):
        if field in message:
            return f"{message} (--{field})"
    return message


def resolve_loop(loop: str | None, engine: str | None) -> str:
    """--loop, or the deprecated --engine (one warning line on stderr; rank 0 only under torchrun)."""
    if engine is None:
        return loop or "fast"
    if loop is not None and loop != ENGINE_TO_LOOP[engine]:
        raise SampleArgError(f"--engine {engine} (the deprecated name of --loop {ENGINE_TO_LOOP[engine]}) "
                             f"contradicts --loop {loop}: pass --loop only")
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: --engine is deprecated: use --loop {ENGINE_TO_LOOP[engine]}", file=sys.stderr)
    return ENGINE_TO_LOOP[engine]


def _cli_para(strategy: str, para):
    return PUBLISHED_CLI_PARA.get(strategy) if para is None else para


def _join_infill_values(argv: list[str]) -> list[str]:
    """``--infill -5:x`` -> ``--infill=-5:x``: argparse takes a value starting with '-' for a flag."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--infill" and i + 1 < len(argv):
            out.append(f"--infill={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def parse_infill(spec: str) -> tuple[int, str]:
    """'POS:TEXT' -> (POS, TEXT) with POS a token position >= 0 and TEXT not empty."""
    pos, sep, text = spec.partition(":")
    pos = pos.strip()
    if not sep or not pos.lstrip("-").isdigit():
        raise SampleArgError(f"--infill expects POS:TEXT with an integer POS, got {spec!r}")
    if int(pos) < 0:
        raise SampleArgError(f"--infill position must be >= 0 (a token position), got {spec!r}")
    if not text:
        raise SampleArgError(f"--infill {spec!r} has no text after the colon")
    return int(pos), text


def check_output(path: str | None) -> Path | None:
    """The JSONL path, checked without touching it: a folder, a missing or unwritable folder fail here."""
    if path is None:
        return None
    target = Path(path).expanduser()
    if target.is_dir():
        raise SampleArgError(f"--out {path} is a folder; pass a file path, e.g. {target / 'samples.jsonl'}")
    if not target.parent.is_dir():
        raise SampleArgError(f"--out {path}: folder {target.parent} does not exist")
    writable = os.access(target, os.W_OK) if target.exists() else os.access(target.parent, os.W_OK | os.X_OK)
    if not writable:
        raise SampleArgError(f"--out {path} cannot be written (permission denied)")
    return target


def load_tokenizer(name: str | None, config):
    """The tokenizer for ``config``; its ids must be exactly the model's real tokens."""
    if name is None:
        name = default_tokenizer_name(config)
    tok = get_tokenizer(str(name))
    problem = tokenizer_mismatch(tok.vocab_size, config.tokens, name, exact=True)
    if problem:
        raise SampleArgError(problem)
    return tok


def check_finite_weights(model, source) -> None:
    """NaN / inf weights sample garbage (all end-of-text) without any other sign: refuse them."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise SampleArgError(f"model {source} has non-finite (NaN / inf) weights in {len(bad)} tensor(s), e.g. "
                             f"{bad[0]} (--model_path)")


def check_length(length: int | None, model_length: int) -> int:
    if length is None:
        return model_length
    if length > model_length:
        raise SampleArgError(f"--length {length} exceeds the model's length {model_length}")
    return length


def _with_flag(flag: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with any user error re-raised naming ``flag``."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        text = str(e)
        raise type(e)(text if flag in text else f"{text} ({flag})") from e


def _backend(run: Run) -> str:
    return run.args.backend or ("fast" if run.device.type == "cuda" else "reference")


def _conditioning(run: Run, tok, length: int, mask_id: int):
    """(initial state [1 or N, L], the conditioning pairs); a misfit prefix / suffix / infill names its flag."""
    args = run.args
    try:
        cond = text_conditioning(length, tok.encode(args.prefix) if args.prefix else [],
                                 tok.encode(args.suffix) if args.suffix else [],
                                 {pos: tok.encode(text) for pos, text in run.infill})
        return initial_state(cond, run.num_samples, length, mask_id, run.device), cond
    except ValueError as e:
        raise SampleArgError(f"{e} (--prefix / --suffix / --infill)") from None


# -- sampling: each loop yields (index of the first sample, tokens [n, L], E-NFE [n]) ---------------
def _order(run: Run, length: int):
    return torch.arange(length) if run.args.method == "ordered" and run.args.order == "left_to_right" else None


def _fast(run: Run, cfg: SamplerConfig, model, noise, length: int, cond, seed: int, first: int, count: int,
          env: DistEnv, deliver) -> None:
    """This rank's samples first .. first + count - 1 from ``generate``, sample i keyed by (seed, i), each
    given to ``deliver(index, tokens [n, L], E-NFE [n])`` in sample order as soon as it and every sample
    before it are done (``generate``'s ``on_rows``, at most once a second).

    The engine's own summary line is off: this CLI prints one, the same for both loops."""
    generate(model, noise, count, length, config=cfg, conditioning=cond, seed=seed, first_index=first,
             on_rows=deliver, progress=not run.args.no_progress and env.is_main, summary=False)


def _published_api(run: Run, cfg: SamplerConfig, model, noise, length: int, init, seed: int, deliver) -> None:
    """The published-API loop, ``cfg.rows_in_flight`` samples at a time, each chunk delivered when done
    (chunk b0 seeded seed + b0, as before: its samples depend on the rows in flight)."""
    args, rows = run.args, cfg.rows_in_flight
    gen_seed = seed
    bar = progress_bar(not args.no_progress, total=run.num_samples, desc="sampling", unit="sample")
    try:
        for b0 in range(0, run.num_samples, rows):
            B = min(rows, run.num_samples - b0)
            kw = dict(seed=gen_seed + b0, sampling_dtype=cfg.sampling_dtype)
            if cfg.method == "ordered":
                sampler = OrderedSampler(model, (B, length), model.vocab_size, cfg.strategy, cfg.strategy_para,
                                         order=cfg.order, **kw)
            else:
                sampler = DiffusionSampler(cfg.method, model, noise, (B, length), model.vocab_size, cfg.strategy,
                                           cfg.strategy_para, **kw)
            start = init if init.shape[0] == 1 else init[b0:b0 + B]
            tokens = sampler.sample(cfg.steps, projection(start, model.mask_id))
            bar.update(B)
            deliver(b0, tokens.cpu(), sampler.last_row_nfe.tolist())
    finally:
        bar.close()


# -- output --------------------------------------------------------------------------------------
def summary_line(run: Run, cfg: SamplerConfig, length: int, init, mask_id: int, enfe: list[int], wall: float,
                 counts: list[int], seed: int) -> str:
    """The one summary of a call: what was sampled (over how many ranks, how many each), the seed,
    E-NFE per sample, sampled tokens per second, wall time."""
    n_free = int((init == mask_id).sum()) * (run.num_samples if init.shape[0] == 1 else 1)
    mean_enfe = sum(enfe) / max(len(enfe), 1)
    where = f" on {len(counts)} ranks ({' + '.join(map(str, counts))} samples)" if len(counts) > 1 else ""
    return (f"loop {run.loop}{where} | {cfg.describe()} | {run.num_samples} samples x {length} tokens | "
            f"seed {seed} | E-NFE {mean_enfe:.1f} per sample | {n_free / max(wall, 1e-9):,.0f} tokens/s | "
            f"wall {wall:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
