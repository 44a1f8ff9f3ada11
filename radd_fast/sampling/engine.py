"""The fast sampling engine: ``generate`` (the product's default path).

1. Draw the whole reveal schedule up front on the device (schedule.py): each free
   token's reveal step; a row's evaluations are its distinct reveal steps (E-NFE).
2. Plan the evaluations on the host (batching.py): a fixed batch of rows in
   flight, a finished row replaced by the next, so every evaluation has the
   same shape (buckets in the tail).
3. Each evaluation (evaluator.py): the transformer body on the rows in flight
   (a CUDA graph per bucket), the head + strategy + Gumbel-max + write only at
   the positions revealed by that evaluation (a fused Triton kernel).

Host syncs: two per wave (the plan needs K and the per-evaluation head counts),
one at the end (the no-MASK-left check); none inside the loop. Rows are processed
in waves of ``wave_size`` (default max(32 x batch_size, 4096)) to bound memory.

Example::

    model, noise = radd_fast.load_model("JingyangOu/radd-t-dce", device="cuda", backend="fast")
    tokens, stats = generate(model, noise, num_samples=64, length=1024, steps=1024, seed=0)
    print(stats.enfe_mean, stats.tokens_per_s)   # ~647 evaluations per row (spec 5)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .batching import plan_ticks
from .conditioning import initial_state
from .evaluator import BodyRunner, RevealSampler, compact, tick_key
from .schedule import (
    DIFFUSION_METHODS,
    check_method,
    check_steps,
    draw_reveal_steps,
    expected_enfe_exact,
    group_steps,
    ordered_groups,
    update_rates,
)
from .strategies import check_strategy
from .strategies import sampling_dtype as parse_sampling_dtype


@dataclass
class SamplingStats:
    enfe: torch.Tensor  # [num_samples] int64 (CPU): evaluations of each row = its distinct reveal steps
    enfe_theory: float | None  # expected E-NFE per row under the schedule (None for "ordered")
    head_rows: int  # positions the output head ran at (= tokens revealed)
    head_rows_padded: int  # the same, with the padding of the static shapes
    eval_rows: int  # rows through the transformer body (= enfe.sum())
    eval_rows_padded: int
    evaluations: int  # body calls
    wall_time: float  # seconds, synchronised
    num_samples: int
    length: int
    steps: int
    cuda_graphs: int  # graphs captured

    @property
    def enfe_mean(self) -> float:
        return float(self.enfe.double().mean()) if self.enfe.numel() else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.num_samples / max(self.wall_time, 1e-12)

    @property
    def tokens_per_s(self) -> float:
        return self.head_rows / max(self.wall_time, 1e-12)

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "enfe"}
        out.update(enfe_mean=self.enfe_mean, samples_per_s=self.samples_per_s, tokens_per_s=self.tokens_per_s)
        return out


def _device_of(model) -> torch.device:
    return model.vocab_embed.embedding.device


def _check_model(model) -> None:
    for name in ("hidden", "head", "output_layer", "mask_id", "vocab_size", "compute_dtype"):
        if not hasattr(model, name):
            raise TypeError(f"the fast engine needs a radd_fast.RADD model (missing {name!r}); "
                            "use the reference samplers for other models")


@torch.no_grad()
def generate(model, noise, num_samples: int, length: int | None = None, steps: int = 1024, method: str = "tweedie",
             strategy: str = "direct", strategy_para=None, conditioning=None, batch_size: int = 64,
             seed: int | None = None, sampling_dtype: str = "float32", eps: float = 1e-5, progress: bool = True,
             compile: bool = False, *, order=None, cuda_graphs: bool | None = None, use_kernels: bool | None = None,
             buckets: bool = True, wave_size: int | None = None) -> tuple[torch.Tensor, SamplingStats]:
    """Sample ``num_samples`` sequences: returns (tokens [num_samples, length] int64 on the model's device, stats).

    method: 'tweedie' | 'euler' (need ``noise``) | 'ordered' (any-order AR: ``order``, a permutation of
    range(length) shared by all rows, or by default a random order per row; ``steps`` chunks of it);
    strategy: 'direct' | 'top_p' | 'top_k' with ``strategy_para`` (p or k); conditioning: see
    conditioning.py (fixed tokens, never changed); batch_size: rows in flight per evaluation;
    seed: deterministic output on one device; sampling_dtype: 'float32' | 'float64' Gumbel noise;
    cuda_graphs: default on for CUDA; use_kernels: Triton sampling kernels (default where they run);
    buckets: pad evaluation shapes to powers of two (False: exact shapes, no padding).
    """
    _check_model(model)
    check_method(method)
    steps = check_steps(steps)
    para = check_strategy(strategy, strategy_para)
    dtype = parse_sampling_dtype(sampling_dtype)
    length = model.length if length is None else int(length)
    if not 1 <= length <= model.length:
        raise ValueError(f"length must be in [1, {model.length}] (the model's length), got {length}")
    if int(num_samples) < 0 or int(batch_size) < 1:
        raise ValueError(f"need num_samples >= 0 and batch_size >= 1, got {num_samples}, {batch_size}")
    if method in DIFFUSION_METHODS and noise is None:
        raise ValueError(f"method {method!r} needs the noise schedule (noise=...)")
    num_samples, batch_size = int(num_samples), int(batch_size)
    device = _device_of(model)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    generator = torch.Generator(device=device).manual_seed(int(seed))
    init = initial_state(conditioning, num_samples, length, model.mask_id, device)
    rates = update_rates(noise, steps, method, eps, device) if method in DIFFUSION_METHODS else None
    cuda_graphs = device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs) and device.type == "cuda"
    wave_size = int(wave_size or max(32 * batch_size, 4096))

    was_training, was_validating = model.training, getattr(model, "validate_inputs", False)
    model.eval()
    model.validate_inputs = False  # its check syncs; the tokens written here are valid by construction
    body = BodyRunner(model, cuda_graphs, compile)
    sampler = RevealSampler(model, strategy, para, dtype, use_kernels, generator)
    out = torch.empty(num_samples, length, dtype=torch.int64, device=device)
    totals = dict(head_rows=0, head_rows_padded=0, eval_rows=0, eval_rows_padded=0, evaluations=0)
    enfe = []
    t0 = time.perf_counter()
    bar = _Progress(progress)
    try:
        for w0 in range(0, num_samples, wave_size):
            R = min(wave_size, num_samples - w0)
            x0 = init.expand(num_samples, length)[w0:w0 + R]
            free = x0 == model.mask_id
            if rates is not None:
                group, K = group_steps(draw_reveal_steps(rates, free, generator))
            else:
                group, K = ordered_groups(free, steps, order, generator)
            out[w0:w0 + R] = _run_wave(x0, group, K, body, sampler, batch_size, buckets, seed, totals, bar)
            enfe.append(K.cpu())
    finally:
        model.train(was_training)
        model.validate_inputs = was_validating
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    if bool((out == model.mask_id).any()):
        raise RuntimeError("internal error: MASK tokens left after sampling (the plan and the schedule disagree)")
    enfe = torch.cat(enfe) if enfe else torch.zeros(0, dtype=torch.int64)
    stats = SamplingStats(enfe=enfe, enfe_theory=_theory(rates, init, model.mask_id), wall_time=wall,
                          num_samples=num_samples, length=length, steps=steps, cuda_graphs=len(body.graphs), **totals)
    if progress:
        print(f"E-NFE {stats.enfe_mean:.1f} per sample | {stats.tokens_per_s:,.0f} tokens/s | "
              f"{stats.samples_per_s:.2f} samples/s | {wall:.2f} s")
    return out, stats


def _run_wave(x0, group, K, body, sampler, batch_size, buckets, seed, totals, bar) -> torch.Tensor:
    """Sample one wave of rows: x0 [R, L] (MASK where free), group [R, L], K [R] -> tokens [R, L]."""
    R, L = x0.shape
    device = x0.device
    trash = (R + 1) * L  # the extra last cell: padded head rows write there
    x_flat = torch.empty(trash + 1, dtype=torch.int64, device=device)
    x = x_flat[:trash].view(R + 1, L)
    x[:R] = x0
    x[R] = x0[0] if R else 0  # the padding row: valid tokens, nothing revealed
    x_flat[trash] = 0
    grp = torch.full((R + 1, L), -1, dtype=torch.int32, device=device)
    grp[:R] = group
    plan = plan_ticks(K.cpu().numpy(), batch_size, pad_row=R, buckets=buckets)  # host sync 1
    if plan.ticks == 0:
        return x[:R].clone()
    rows_d = torch.from_numpy(plan.rows).to(device)
    k_d = torch.from_numpy(plan.k).to(device)
    head_n = _head_rows_per_tick(grp, K, rows_d, k_d)  # host sync 2
    head_p = np.array([1 << max(0, int(n) - 1).bit_length() for n in head_n]) if buckets else head_n
    shapes = {}
    for b in plan.batch:
        shapes[(int(b), L)] = shapes.get((int(b), L), 0) + 1
    body.prepare(shapes)
    bar.add_total(plan.ticks)
    base = totals["evaluations"]
    for t in range(plan.ticks):
        Bb, N, P = int(plan.batch[t]), int(head_n[t]), int(head_p[t])
        rows, ks = rows_d[t, :Bb], k_d[t, :Bb]
        h = body(x.index_select(0, rows))  # [Bb, L, d]
        reveal = (grp.index_select(0, rows) == ks[:, None]).view(-1)
        src, dst = compact(reveal, rows, L, P, N, trash)
        sampler(h.reshape(Bb * L, -1).index_select(0, src), dst, x_flat, tick_key(seed, base + t))
        bar.update(1)
    totals["evaluations"] += plan.ticks
    totals["eval_rows"] += int(plan.active.sum())
    totals["eval_rows_padded"] += int(plan.batch.sum())
    totals["head_rows"] += int(head_n.sum())
    totals["head_rows_padded"] += int(head_p.sum())
    return x[:R].clone()


def _head_rows_per_tick(grp, K, rows_d, k_d) -> np.ndarray:
    """Revealed positions per evaluation [T] (on the device, one copy back): group sizes gathered by the plan."""
    n_groups = int(K.max()) + 1 if K.numel() else 1
    R1 = grp.shape[0]
    idx = torch.arange(R1, device=grp.device)[:, None] * n_groups + grp.long()
    idx = torch.where(grp >= 0, idx, torch.full_like(idx, R1 * n_groups))  # fixed tokens: a dump slot
    counts = torch.zeros(R1 * n_groups + 1, dtype=torch.int64, device=grp.device)
    counts.scatter_add_(0, idx.view(-1), torch.ones_like(idx.view(-1)))
    due = k_d >= 0  # padding entries (k = -2) reveal nothing
    take = torch.where(due, rows_d * n_groups + k_d.long(), torch.zeros_like(rows_d))
    return (counts[take] * due).sum(dim=1).cpu().numpy()


def _theory(rates, init, mask_id: int) -> float | None:
    """Expected E-NFE per row under the drawn schedule, averaged over the rows' free lengths."""
    if rates is None:
        return None
    n_free, count = torch.unique((init == mask_id).sum(dim=1), return_counts=True)
    values = [expected_enfe_exact(rates, int(n)) for n in n_free.tolist()]
    return float(sum(v * c for v, c in zip(values, count.tolist())) / count.sum())


class _Progress:
    """tqdm over evaluations (rate and ETA); the total grows as each wave is planned."""

    def __init__(self, enabled: bool):
        self.total_ticks = 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, unit="eval", desc="sampling", dynamic_ncols=True)

    def add_total(self, n: int) -> None:
        self.total_ticks += n
        if self.bar is not None:
            self.bar.total = self.total_ticks
            self.bar.refresh()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
