"""What the end-to-end suite (bench_e2e.py) measures with: sizes and their workloads, the providers
holding one set of weights, timing, the ratio columns and the CPU settings.

Providers: ``reference`` (our plain-PyTorch model at the published precision: fp16 autocast on
CUDA), ``fast`` (fast backend, bf16), ``fast+compile`` (the body under torch.compile, with
--compile), and the published code's model (benchmarks/published.py) loaded with the same weights.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace

import torch

from radd_fast import PRESETS, RADD, RADDConfig, get_noise
from radd_fast.config import ModelConfig

from . import published as pubcode
from .timing import sync

CPU_LABEL = "CPU-quick: timings on a shared CPU prove the harness runs; they are not speed claims"


@dataclass(frozen=True)
class Plan:
    """Workload of one size. Sample counts per sampler are (max_steps, samples) pairs: the first pair
    whose max_steps >= steps applies, none: that sampler is not run at those steps (too slow)."""

    forward_batches: tuple
    train_batch: int
    train_steps: int
    sampling_steps: tuple
    fast_samples: int
    cached_samples: tuple  # published and reference samplers with the per-row cache
    nocache_samples: tuple  # the published sampler without its cache
    eval_batch: int
    eval_mc: int
    rows_per_eval: int  # the unit of ms/eval (64: one 64 x L evaluation)
    batch_rows: tuple = (2, 4, 8)  # the batch section: rows in flight (= samples) swept per provider
    batch_steps: int = 8  # ... at this many steps (throughput, not a sampling protocol)
    reference_max_steps: int = 1 << 30  # our reference sampler (a second column) only up to these steps


NEVER = 1 << 30
PLANS = {
    "quick": Plan((2, 8), 4, 2, (8, 32, 128), 64, ((NEVER, 16),), ((NEVER, 16),), 4, 4, 16),
    # Sized for gpu_check (about 3 minutes on an H100/H200, estimate): the published sampler at
    # 64 x 1024 x 4096 steps alone would take minutes, so the cached samplers run fewer samples and
    # the table compares per-sample rates; the no-cache sampler only at <= 1024 steps.
    "small": Plan((8, 32), 32, 5, (1024, 4096), 64, ((1024, 16), (NEVER, 8)), ((1024, 8),), 16, 16, 64,
                  (16, 32, 64, 128, 256), 64, 1024),
    "medium": Plan((4, 8), 8, 5, (1024, 4096), 64, ((1024, 8), (NEVER, 4)), ((1024, 4),), 16, 16, 64,
                   (8, 16, 32, 64, 128), 64, 1024),
}


def samples_for(pairs: tuple, steps: int) -> int:
    return next((n for max_steps, n in pairs if steps <= max_steps), 0)


def size_config(size: str) -> RADDConfig:
    """Model config of a size; model.dtype float16 as the released configs (the published autocast)."""
    if size == "quick":
        return RADDConfig(tokens=256, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=32,
                                                        dropout=0.0, name="quick", dtype="float16"))
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; expected quick or one of {sorted(PRESETS)}")
    return RADDConfig(tokens=50257, model=replace(PRESETS[size], dropout=0.02, dtype="float16"))


@dataclass
class Providers:
    """Our models by provider name, our noise, and the published (module, model, noise) or None."""

    ours: dict
    noise: torch.nn.Module
    pub: pubcode.Published | None = None
    pub_model: torch.nn.Module | None = None
    pub_noise: torch.nn.Module | None = None

    @property
    def ref(self) -> RADD:
        return self.ours["reference"]

    def restore_weights(self, state: dict) -> None:
        """Put the shared weights back (the training section updates them)."""
        for model in [*self.ours.values(), *([self.pub_model] if self.pub_model is not None else [])]:
            model.load_state_dict(state)
            model.zero_grad(set_to_none=True)


def build_providers(cfg: RADDConfig, device: torch.device, compile: bool = False, published=None) -> Providers:
    """reference: fp16 autocast on CUDA (the published precision); fast: fast backend, bf16. One set of
    random weights, a normal(0, 0.02) output layer, copied into every provider."""
    torch.manual_seed(0)
    ref = RADD(cfg).to(device)
    with torch.no_grad():
        torch.nn.init.normal_(ref.output_layer.linear.weight, std=0.02)
    cuda = device.type == "cuda"
    ref.set_compute_dtype(torch.float16 if cuda else torch.float32)
    ours = {"reference": ref}
    for name in ("fast", "fast+compile") if compile else ("fast",):
        model = RADD(cfg, backend="fast").to(device).set_compute_dtype(torch.bfloat16 if cuda else torch.float32)
        model.load_state_dict(ref.state_dict())
        ours[name] = model
    if compile:
        comp = ours["fast+compile"]
        comp.validate_inputs = False  # its range check syncs (a graph break)
        comp.hidden = torch.compile(comp.hidden)  # static [B, T] body; the loss's gather and head stay eager
    providers = Providers(ours, get_noise(cfg).to(device))
    if published is not None:
        providers.pub = pubcode.load_published(published)
        providers.pub_model, providers.pub_noise = pubcode.twin(ref, providers.pub, device)
    return providers


# -- timing helpers --------------------------------------------------------------------------------
def reset_peak(device) -> int:
    """Start a peak-memory window; returns the bytes allocated now (the baseline)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_mb(device, before: int) -> float | None:
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None


def seconds(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed(fn, device, reps: int) -> tuple[float, float]:
    """(seconds of the first call: warm-up, autotuning, compilation; mean seconds of the next reps)."""
    first = seconds(fn, device)
    return first, sum(seconds(fn, device) for _ in range(reps)) / reps


def add_ratios(rows: list[dict], cost) -> list[dict]:
    """``vs published`` / ``vs reference`` = cost of that provider's row / cost of each row."""
    done = [r for r in rows if "error" not in r]
    base = {r["provider"]: cost(r) for r in done if r["provider"] in ("published", "reference")}
    for r in done:
        for name in ("published", "reference"):
            if name in base:
                r[f"vs {name}"] = base[name] / cost(r)
    return rows


def attempt(group: list[dict], fields: dict, measure) -> None:
    """Append ``fields`` + ``measure()`` to group. A provider that fails (CUDA out of memory, a
    broken published call) gets a row with ``error`` instead, so the providers after it still run
    on a lent GPU; the command's exit code then says it failed."""
    try:
        group.append({**fields, **measure()})
    except (RuntimeError, ValueError, TypeError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        group.append({**fields, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
        print(f"FAILED {fields}: {group[-1]['error']}", flush=True)


def dtype_name(model) -> str:
    return str(model.compute_dtype).replace("torch.", "")


def published_dtype(P: Providers, device) -> str:
    return str(P.pub_model.dtype).replace("torch.", "") if device.type == "cuda" else "float32"


@contextlib.contextmanager
def cpu_settings(device: torch.device):
    """On CPU: the fast backend's PyTorch fallbacks instead of the Triton interpreter, and one thread
    (a shared CPU makes multi-threaded timings of tiny ops erratic). Restored afterwards."""
    if device.type == "cuda":
        yield
        return
    old_env, old_threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


def published_from_env(published=None):
    """``published`` if given, else $RADD_PUBLISHED, else None (the published rows are left out)."""
    return published or os.environ.get(pubcode.ENV_VAR) or None
