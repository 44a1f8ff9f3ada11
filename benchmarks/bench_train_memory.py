"""Training step: peak memory and throughput per micro-batch size, with and without activation checkpointing.

The whole step of ``radd_fast.training.step.TrainStep`` (planned masking, the static-row
loss, backward, fused AdamW gated on the device), RADD-small by default, bf16, fast backend,
compiled (``--no-compile`` for eager). For each micro-batch size B and each checkpointing
setting: the peak CUDA memory of a step (weights, gradients and optimizer state included,
and the part above them: activations), tokens/s, and MFU on the executed FLOPs
(``radd_fast.flops.executed_train_flops``). Activation checkpointing pays where the
activations of the largest micro-batch that runs without it do not fit, or where a larger
micro-batch with it is faster per token; the table shows both.

    python -m benchmarks.bench_train_memory                      # B = 8, 16, 32 on one GPU
    python -m benchmarks.bench_train_memory --batch-sizes 32,64 --out benchmarks/results/train_memory.json

CUDA only: on a machine without a GPU it prints that it needs CUDA and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from radd_fast import PRESETS, RADD, RADDConfig
from radd_fast.config import ModelConfig
from radd_fast.flops import MFU_FORMULA, peak_flops
from radd_fast.noise import LogLinearNoise
from radd_fast.training.step import TrainStep

from .run import markdown_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, default=50257, help="vocabulary without MASK (GPT-2: 50257)")
    p.add_argument("--batch-sizes", default="8,16,32", help="micro-batch sizes, comma-separated")
    p.add_argument("--loss", default="lambda_DCE")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (after 3 warm-up steps)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def measure(args, batch_size: int, checkpointing: bool, device: torch.device) -> dict:
    """One setting: a fresh model, warm-up steps (compilation), then timed steps and the peak."""
    preset = PRESETS[args.preset]
    cfg = RADDConfig(tokens=args.tokens, model=ModelConfig(**{**preset.__dict__, "use_checkpoint": checkpointing}))
    torch.manual_seed(0)
    model = RADD(cfg, backend="fast").to(device).set_compute_dtype(torch.bfloat16)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-4, fused=True)
    stepper = TrainStep(model, LogLinearNoise().to(device), args.loss, compile=args.compile)
    L = cfg.model.length

    def step(i: int) -> None:
        x = torch.randint(0, args.tokens, (batch_size, L), device=device)
        stepper.micro_batch(x, weight=1.0)
        stepper.update(optimizer, params, lr=3e-4, max_norm=1.0, step=i)

    for i in range(3):
        step(i + 1)
    stepper.read()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()  # weights, gradients, optimizer state
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i + 4)
    report = stepper.read()  # the one sync of the timed steps
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    tokens = args.steps * batch_size * L
    card = peak_flops(device, torch.bfloat16)
    return {"B": batch_size, "L": L, "checkpointing": checkpointing, "compiled": args.compile,
            "peak_GiB": peak / 2**30, "activations_GiB": (peak - resident) / 2**30,
            "tokens/s": tokens / seconds, "mfu": report.flops / (seconds * card) if card else None,
            "head_rows/token": report.head_rows / tokens, "overflows": report.overflows}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train_memory needs CUDA: peak memory is a CUDA allocator statistic (nothing measured)")
        return 0
    device = torch.device("cuda")
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",") if b):
        for checkpointing in (False, True):
            try:
                rows.append(measure(args, batch_size, checkpointing, device))
            except torch.OutOfMemoryError:
                rows.append({"B": batch_size, "checkpointing": checkpointing, "peak_GiB": "out of memory"})
            torch.cuda.empty_cache()
    print(markdown_table(rows))
    print(MFU_FORMULA)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(), "mfu_formula": MFU_FORMULA, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
