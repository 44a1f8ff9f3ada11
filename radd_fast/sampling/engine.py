"""The fast sampling engine: ``generate`` (the product's default path).

1. Draw the whole reveal schedule up front on the device (schedule.py): each free
   token's reveal step; a row's evaluations are its distinct reveal steps (E-NFE).
2. Plan the evaluations on the host (batching.py): a fixed batch of rows in
   flight, a finished row replaced by the next, so every evaluation has the
   same shape (buckets in the tail).
3. Each evaluation (``Wave.evaluate``): the transformer body on the rows in
   flight (evaluator.py, a CUDA graph per bucket), then the model's output head
   (``radd_fast.model.head``) with the strategy, Gumbel-max and write, only at the
   positions revealed by that evaluation.

Host syncs: two per wave (the plan needs K and the per-evaluation head counts),
one at the end (the no-MASK-left check); none inside the loop. Rows are processed
in waves of ``wave_size`` (default max(32 x rows in flight, 4096)) to bound memory.
``on_rows`` streams finished rows out in sample order while a wave runs (one sync per
hand-over, at most one every ``on_rows_every`` seconds).

Every random number of sample i is keyed by (seed, i) (``radd_fast.philox``): its reveal
schedule by (seed, i) and position, its Gumbel noise by (seed, i, position, class). So a
sample is the same whatever the rows in flight, the wave size, or which call or rank makes
it: ``generate(n, seed=s, first_index=k)`` makes samples k .. k + n - 1 of the run seeded s.
Every option lives in ``SamplerConfig`` (config.py). ``refresh_every=R`` (opt-in, approximate)
swaps ``Wave`` for ``cached.CachedWave``, which reuses each row's keys and values between
full evaluations (docs/SAMPLING.md, "Beyond exact"); None (the default) is this exact engine.

Example::

    model, noise = radd_fast.load_model("JingyangOu/radd-t-dce", device="cuda", backend="fast")
    cfg = SamplerConfig(steps=1024, rows_in_flight=64)
    tokens, stats = generate(model, noise, num_samples=64, length=1024, config=cfg, seed=0)
    print(stats.enfe_mean, stats.tokens_per_s)   # ~647 evaluations per row (docs/SAMPLING.md)
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from ..acceleration import resolve_acceleration
from ..model.head import noise_key
from ..model.kv_cache import KVCache
from ..philox import keyed_uniforms
from ..progress import progress_bar
from .adaptive import DecoderWave
from .batching import NO_CAP, PlannedWave, bucket, plan_ticks
from .cached import CachedWave
from .conditioning import initial_state
from .config import SamplerConfig, auto_rows_in_flight, sampler_config
from .decoders import max_samples
from .evaluator import BodyRunner, body_shape, compact, token_buffers
from .schedule import draw_reveal_steps, expected_enfe_exact, group_sizes, group_steps, ordered_groups, update_rates

# A run's random streams, each keyed by noise_key(seed, stream); within a stream every number is keyed by
# the sample's index (and position, and class; a decoder's candidates also by the row's evaluation): nothing
# depends on how the samples are split into work.
HEAD_NOISE, REVEAL_SCHEDULE, DECODER_NOISE = 0, 1, 2


@dataclass
class SamplingStats:
    enfe: torch.Tensor  # [num_samples] int64 (CPU): evaluations of each row = its distinct reveal steps
    enfe_theory: float | None  # expected E-NFE per row under the schedule (None for "ordered")
    head_rows: int  # positions the output head ran at (exact samplers: the tokens revealed; decoders: every masked one)
    head_rows_padded: int  # the same, with the padding of the static shapes
    eval_rows: int  # rows through the transformer body (= enfe.sum())
    eval_rows_padded: int
    evaluations: int  # body calls
    wall_time: float  # seconds, synchronised
    num_samples: int
    length: int
    steps: int
    cuda_graphs: int  # graphs captured
    capture_time: float = 0.0  # seconds spent capturing CUDA graphs (warm-up included), not in wall_time
    sampler: str = ""  # SamplerConfig.describe(): method, steps, strategy, Gumbel dtype
    rows_in_flight: int = 0  # rows per evaluation (the batch of the body)
    body_token_rows: int = 0  # positions pushed through the blocks (exact engine: L per row evaluation)
    body_token_rows_padded: int = 0  # the same, with the padding of the static shapes
    body_token_rows_exact: int = 0  # what the exact engine computes for the same evaluations (L per row evaluation)
    refresh_every: int | None = None  # None: exact; R: the approximate sampler (cached.py)
    acceleration: str = ""  # the policy's decision: "eager", "CUDA graphs", "compiled (inductor) + CUDA graphs"
    tokens_revealed: int = 0  # positions sampled (free positions of the rows)
    decoder: str | None = None  # None: the method's schedule; else the adaptive decoder's label (decoders.py)

    @property
    def body_fraction(self) -> float:
        """Body token-rows computed as a fraction of the exact engine's (1.0 when exact)."""
        return self.body_token_rows / max(self.body_token_rows_exact, 1)

    @property
    def enfe_mean(self) -> float:
        return float(self.enfe.double().mean()) if self.enfe.numel() else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.num_samples / max(self.wall_time, 1e-12)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_revealed / max(self.wall_time, 1e-12)

    @property
    def head_rows_per_evaluation(self) -> float:
        """Head rows per row evaluation (exact samplers: the tokens it reveals; decoders: its masked positions)."""
        return self.head_rows / max(self.eval_rows, 1)

    def summary(self) -> str:
        """The one summary line of a run (``sampler`` says what was sampled, ``approximate (...)`` when not exact)."""
        body = "" if self.refresh_every is None else f" | body token-rows {100 * self.body_fraction:.0f}% of exact"
        head = "" if self.decoder is None else f" | head rows {self.head_rows_per_evaluation:.1f} per evaluation"
        return (f"{self.sampler} | E-NFE {self.enfe_mean:.1f} per sample{body}{head} | "
                f"{self.tokens_per_s:,.0f} tokens/s"
                f" | {self.samples_per_s:.2f} samples/s | {self.wall_time:.2f} s")

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "enfe"}
        out.update(enfe_mean=self.enfe_mean, samples_per_s=self.samples_per_s, tokens_per_s=self.tokens_per_s,
                   body_fraction=self.body_fraction, head_rows_per_evaluation=self.head_rows_per_evaluation)
        return out


def _check_model(model) -> None:
    for name in ("hidden", "output_head", "mask_id", "vocab_size", "length", "device"):
        if not hasattr(model, name):
            raise TypeError(f"the fast engine needs a radd_fast.RADD model (missing {name!r}); "
                            "use the published-API samplers (DiffusionSampler / OrderedSampler) for other models")


@torch.no_grad()
def generate(model, noise, num_samples: int, length: int | None = None, steps: int | None = None,
             config: SamplerConfig | None = None, *, conditioning=None, seed: int | None = None,
             first_index: int = 0, on_rows: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
             on_rows_every: float = 1.0, progress: bool = True, summary: bool | None = None,
             **options) -> tuple[torch.Tensor, SamplingStats]:
    """Sample ``num_samples`` sequences: returns (tokens [num_samples, length] int64 on the model's device, stats).

    config: a ``SamplerConfig`` (method, steps, strategy, noise dtype, rows in flight, ...); keyword
    ``options`` override its fields (``batch_size`` is accepted for ``rows_in_flight``), and ``steps``
    overrides ``config.steps``. conditioning: fixed tokens, never changed (see conditioning.py);
    seed: sample i's randomness is keyed by (seed, i), so the output does not depend on the rows in
    flight or the wave size; first_index: the index of the first sample (``generate(n, first_index=k)``
    makes samples k .. k + n - 1 of the same seed's run); on_rows: called as ``on_rows(index of the
    first row, tokens [n, length] on the CPU, E-NFE [n])`` with the finished rows in sample order
    while the run goes (at most once every ``on_rows_every`` seconds; one host sync each, and the
    rest of a wave when it ends); progress: a tqdm bar over evaluations; summary: print one summary
    line at the end (default: with ``progress``). ``refresh_every=R`` (an option) samples
    approximately, reusing keys and values for R - 1 evaluations of a row out of R (cached.py);
    ``decoder="confidence" | "entropy_bound" | "low_confidence"`` (with ``decoder_para``) picks the
    positions each evaluation reveals from the model's confidence instead (decoders.py, adaptive.py):
    approximate too, and combinable with ``refresh_every``.
    """
    _check_model(model)
    cfg = sampler_config(config, **options, **({} if steps is None else {"steps": steps}))
    length = model.length if length is None else int(length)
    if not 1 <= length <= model.length:
        raise ValueError(f"length must be in [1, {model.length}] (the model's length), got {length}")
    if int(num_samples) < 0:
        raise ValueError(f"need num_samples >= 0, got {num_samples}")
    if int(first_index) < 0:
        raise ValueError(f"need first_index >= 0, got {first_index}")
    if cfg.needs_noise and noise is None:
        raise ValueError(f"method {cfg.method!r} needs the noise schedule (noise=...)")
    num_samples = int(num_samples)
    device = model.device
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    head_key, schedule_key = noise_key(seed, HEAD_NOISE), noise_key(seed, REVEAL_SCHEDULE)
    first_index = int(first_index)
    decoder = cfg.decoder_fn
    if decoder is not None:
        head_key = noise_key(seed, DECODER_NOISE)
        if first_index + num_samples > max_samples(length):
            raise ValueError(f"a decoder run keys samples 0 .. {max_samples(length) - 1} at length {length}; "
                             f"got up to {first_index + num_samples - 1}")
    init = initial_state(conditioning, num_samples, length, model.mask_id, device)
    rates = update_rates(noise, cfg.steps, cfg.method, cfg.eps, device) if cfg.needs_noise else None
    cache_bytes = 0 if cfg.refresh_every is None else KVCache.bytes_per_row(model, length)
    rows = cfg.rows_in_flight or auto_rows_in_flight(num_samples, length, model.config.model.hidden_size, device,
                                                     cache_bytes)
    wave_size = cfg.planned_wave_size(rows)
    acceleration = resolve_acceleration(device, cfg.compile, cfg.cuda_graphs)

    was_training, was_validating = model.training, getattr(model, "validate_inputs", False)
    model.eval()
    model.validate_inputs = False  # its check syncs; the tokens written here are valid by construction
    cache = None if cfg.refresh_every is None else KVCache.allocate(model, rows, length)  # approximate: per row in flight
    body = BodyRunner(model, acceleration, cache)
    head = model.output_head().sampler(cfg.noise_dtype, cfg.use_kernels)
    out = torch.empty(num_samples, length, dtype=torch.int64, device=device)
    stream = None if on_rows is None else RowStream(on_rows, on_rows_every)
    counters = Counters()
    enfe = []
    t0 = time.perf_counter()
    bar = None  # made with the first wave's evaluation count: no empty bar before any work
    try:
        for w0 in range(0, num_samples, wave_size):
            x0 = init.expand(num_samples, length)[w0:w0 + wave_size]
            first = first_index + w0  # the wave's first sample
            ids = torch.arange(first, first + x0.shape[0], device=device)
            group, K = (None, None) if decoder is not None and not decoder.uses_schedule else \
                _reveal_groups(x0 == model.mask_id, rates, cfg, schedule_key, ids)
            if decoder is not None:
                wave = DecoderWave(x0, group, rows, cfg.buckets, decoder, cfg.decoder_check_every, model.mask_id, cache,
                                   cfg.refresh_every)
            elif cache is None:
                wave = Wave(x0, group, K, rows, cfg.buckets)
            else:
                wave = CachedWave(x0, group, K, rows, cfg.buckets, cfg.refresh_every, cache)
            bar = _grow(bar, wave.ticks, progress)
            after = None if stream is None else stream.start(wave, first)
            out[w0:w0 + x0.shape[0]] = wave.run(body, head, cfg.strategy_fn, head_key, first * length, bar,
                                                cfg.prune_last_block, after)
            if stream is not None:
                stream.finish()
            counters.add(wave)
            enfe.append(torch.from_numpy(wave.K_host))
    finally:
        model.train(was_training)
        model.validate_inputs = was_validating
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0 - body.capture_seconds  # graph capture is timed apart
    if bool((out == model.mask_id).any()):
        raise RuntimeError("internal error: MASK tokens left after sampling (the plan and the schedule disagree)")
    enfe = torch.cat(enfe) if enfe else torch.zeros(0, dtype=torch.int64)
    stats = SamplingStats(enfe=enfe, enfe_theory=_theory(rates, init, model.mask_id), wall_time=wall,
                          num_samples=num_samples, length=length, steps=cfg.steps, cuda_graphs=body.captured,
                          sampler=cfg.describe(), rows_in_flight=rows, refresh_every=cfg.refresh_every,
                          capture_time=body.capture_seconds, acceleration=acceleration.describe(),
                          decoder=None if decoder is None else decoder.label, **counters.as_dict())
    if progress if summary is None else summary:
        print(stats.summary())
    return out, stats


def _grow(bar, ticks: int, enabled: bool):
    """The progress bar over evaluations, made at the first wave and grown by each later one."""
    if bar is None:
        return progress_bar(enabled, total=ticks, desc="sampling", unit="eval")
    bar.total += ticks
    bar.refresh()
    return bar


def _reveal_groups(free: torch.Tensor, rates, cfg: SamplerConfig, key: int,
                   ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each free token's evaluation index in its row (group [R, L], -1 where fixed) and E-NFE per row K [R].

    Row r's uniforms (its reveal steps, or its random order) are keyed by (key, ids[r]) alone."""
    if rates is None and cfg.order is not None:
        return ordered_groups(free, cfg.steps, cfg.order)  # a fixed order: nothing random
    u = keyed_uniforms(key, ids, free.shape[1])
    if rates is not None:
        return group_steps(draw_reveal_steps(rates, free, u=u))
    return ordered_groups(free, cfg.steps, u=u)


class RowStream:
    """Hands a wave's finished rows to ``on_rows(index, tokens [n, L] CPU, E-NFE [n])`` in sample order.

    After an evaluation (``after(t)``), at most once every ``every`` seconds: the rows whose every
    row before them is done too (the plan says when, on the host), copied in one sync; ``finish``
    sends the rest when the wave ends. A row is sent once.
    """

    def __init__(self, on_rows: Callable, every: float):
        self.on_rows, self.every = on_rows, float(every)
        self.last = time.monotonic()

    def start(self, wave, first: int) -> Callable[[int], None]:
        """Follow ``wave`` (its first sample is ``first``); returns the per-evaluation hook."""
        self.wave, self.first, self.sent = wave, first, 0
        return self.after

    def after(self, t: int) -> None:
        if time.monotonic() - self.last < self.every:
            return
        n = self.wave.leading_rows_done(t)  # rows 0 .. n-1 are done after evaluation t (known on the host)
        if n > self.sent:
            self._send(n)

    def finish(self) -> None:
        if self.wave.R > self.sent:
            self._send(self.wave.R)

    def _send(self, n: int) -> None:
        a = self.sent
        self.on_rows(self.first + a, *self.wave.rows_out(a, n))
        self.sent, self.last = n, time.monotonic()


# The exact work counts of a run (SamplingStats fields of the same names).
WORK_COUNTS = ("evaluations", "eval_rows", "eval_rows_padded", "head_rows", "head_rows_padded", "tokens_revealed",
               "body_token_rows", "body_token_rows_padded", "body_token_rows_exact")


class Counters:
    """``WORK_COUNTS`` summed over a run's waves."""

    def __init__(self):
        self.totals = dict.fromkeys(WORK_COUNTS, 0)

    @property
    def evaluations(self) -> int:
        return self.totals["evaluations"]

    def add(self, wave) -> None:
        """A finished wave: a ``Wave``, a ``cached.CachedWave`` or an ``adaptive.DecoderWave`` (all give these
        counts; ``evaluations`` is a wave's ``ticks``)."""
        for name in WORK_COUNTS:
            self.totals[name] += int(wave.ticks if name == "evaluations" else getattr(wave, name))

    def as_dict(self) -> dict:
        return dict(self.totals)


class Wave(PlannedWave):
    """One wave of rows: its token buffer, reveal groups and evaluation plan.

    x0 [R, L] (MASK where free), group [R, L] (evaluation index of each free token, -1 fixed),
    K [R] (evaluations per row). Buffers: ``x_flat`` holds the R rows, a padding row (valid tokens,
    nothing revealed) and one trash cell that padded head rows write to. Planning makes the wave's
    two host syncs (the plan needs K; the head's static shapes need the per-evaluation counts).
    """

    def __init__(self, x0: torch.Tensor, group: torch.Tensor, K: torch.Tensor, rows_in_flight: int, buckets: bool):
        R, L = x0.shape
        device = x0.device
        self.R, self.L = R, L
        self.x_flat, self.x, self.grp, self.trash = token_buffers(x0, group)
        self.K_host = K.cpu().numpy()  # host sync 1
        self.plan = plan_ticks(self.K_host, rows_in_flight, pad_row=R, buckets=buckets)
        self.rows_d = torch.from_numpy(self.plan.rows).to(device)
        self.k_d = torch.from_numpy(self.plan.k).to(device)
        self.head_n = _head_rows_per_tick(self.grp, K, self.rows_d, self.k_d) if self.ticks else np.zeros(0, np.int64)
        self.head_p = bucket(self.head_n, NO_CAP) if buckets else self.head_n

    @property
    def ticks(self) -> int:
        return self.plan.ticks

    @property
    def eval_rows(self) -> int:
        return int(self.plan.active.sum())

    @property
    def eval_rows_padded(self) -> int:
        return int(self.plan.batch.sum())

    @property
    def body_token_rows(self) -> int:
        """Every evaluation pushes all L positions of its rows through the blocks."""
        return self.eval_rows * self.L

    @property
    def body_token_rows_padded(self) -> int:
        return self.eval_rows_padded * self.L

    body_token_rows_exact = body_token_rows

    def body_shapes(self, prune: bool) -> dict[tuple[int, ...], int]:
        """How often each evaluation shape occurs, (batch, length) or (batch, length, head rows) when the
        last block is pruned: the CUDA graphs worth capturing."""
        return Counter(body_shape(b, self.L, p, prune) for b, p in zip(self.plan.batch, self.head_p))

    def evaluate(self, t: int, body, head, strategy, key: int, first_id: int, prune: bool) -> None:
        """Evaluation t: the body on its rows, the head + strategy at the positions it reveals.

        key: the run's head-noise key; first_id: the noise id of the wave's first token (a revealed
        token's id is first_id + its flat index row * L + position). prune: the body computes its last
        block at the revealed rows only (exact)."""
        Bb, N, P = int(self.plan.batch[t]), int(self.head_n[t]), int(self.head_p[t])
        rows, ks = self.rows_d[t, :Bb], self.k_d[t, :Bb]
        reveal = (self.grp.index_select(0, rows) == ks[:, None]).view(-1)
        src, dst = compact(reveal, rows, self.L, P, N, self.trash)
        x = self.x.index_select(0, rows)
        h_rows = body(x, src) if prune else body(x).reshape(Bb * self.L, -1).index_select(0, src)
        head.sample_at(h_rows, dst, self.x_flat, strategy, key, dst + first_id)

    def run(self, body, head, strategy, key: int, first_id: int, bar, prune: bool, after=None) -> torch.Tensor:
        """Every evaluation of the wave, in plan order: tokens [R, L]. after: called with t after evaluation t."""
        if self.ticks:
            body.prepare(self.body_shapes(prune))
        for t in range(self.ticks):
            self.evaluate(t, body, head, strategy, key, first_id, prune)
            bar.update(1)
            if after is not None:
                after(t)
        return self.x[:self.R].clone()


def _head_rows_per_tick(grp, K, rows_d, k_d) -> np.ndarray:
    """Revealed positions per evaluation [T] (on the device, one copy back): group sizes gathered by the plan."""
    counts, n_groups = group_sizes(grp, K)
    due = k_d >= 0  # padding entries (k = -2) reveal nothing
    take = torch.where(due, rows_d * n_groups + k_d.long(), torch.zeros_like(rows_d))
    return (counts[take] * due).sum(dim=1).cpu().numpy()


def _theory(rates, init, mask_id: int) -> float | None:
    """Expected E-NFE per row under the drawn schedule, averaged over the rows' free lengths."""
    if rates is None:
        return None
    n_free = (init == mask_id).sum(dim=1).cpu().numpy()  # [1] (shared conditioning) or [num_samples]
    sizes, count = np.unique(n_free, return_counts=True)  # a few distinct free lengths, not one per row
    return float((expected_enfe_exact(rates, sizes) * count).sum() / count.sum())
