"""``SamplerConfig``: every option of a sampling run, typed and validated once.

Shared by ``generate``, ``sample.py`` and the training snapshot, so a flag means
the same thing everywhere and a bad value fails before any model work.

Example::

    cfg = SamplerConfig(steps=1024, strategy="top_p", strategy_para=0.9, rows_in_flight=64)
    tokens, stats = generate(model, noise, num_samples=64, config=cfg, seed=0)
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from .decoders import DECODERS, Decoder, make_decoder
from .schedule import METHOD_SPECS, check_method, check_steps
from .strategies import Strategy, make_strategy, sampling_dtype


@dataclass(frozen=True)
class SamplerConfig:
    """What to sample and how.

    steps: discretisation steps; method: 'tweedie' | 'euler' (need the noise schedule) | 'ordered'
    (any-order AR: ``order``, a permutation of range(length) shared by all rows, or None for a
    random order per row; ``steps`` chunks of it; the diffusion methods ignore it); strategy / strategy_para: 'direct' | 'top_p' (p)
    | 'top_k' (k), the published default parameter when None; sampling_dtype: 'float64' (default, the
    paper's protocol) | 'float32' (the published code's noise: it lowers the effective temperature and
    flatters generative perplexity) for the Gumbel noise and scores; eps: the last time of the schedule, in (0, 1).
    Execution (results do not depend on these, except ``use_kernels``, whose noise differs):
    rows_in_flight: rows per evaluation (None: ``auto_rows_in_flight``, from the free device memory);
    buckets: pad evaluation shapes to powers of two (False:
    exact shapes); wave_size: rows planned at once (memory bound; default max(32 x rows, 4096));
    cuda_graphs: replay the body (and the approximate sampler's evaluations) from CUDA graphs
    (None: on for CUDA; True off CUDA is an error); compile: torch.compile them (True / False /
    "auto": on for CUDA); both resolved by ``radd_fast.acceleration``; use_kernels: override the head's backend policy (None: kernels on the fast backend);
    prune_last_block: the last block's attention output, MLP and residual adds only at the revealed
    positions (exact: every position still gives keys and values).
    Approximate (opt-in, changes the samples): refresh_every: None (exact, the default) or R >= 1: a
    row's every R-th evaluation is exact and fills a cache of its keys and values, the R - 1 between
    push only the positions changed since then and those revealed now (sampling/cached.py;
    docs/SAMPLING.md, "Beyond exact"); R = 1 gives the exact samples. decoder / decoder_para: None (the
    method's schedule, the default) or an adaptive decoder that reveals what the model is confident of
    (sampling/decoders.py: 'confidence' tau, 'entropy_bound' gamma, 'low_confidence' with the method's
    reveal counts; the knob's default when None); decoder_check_every: its rows in flight are checked
    for finished ones every this many evaluations (one host sync each, adaptive.py).
    """

    steps: int = 1024
    method: str = "tweedie"
    strategy: str = "direct"
    strategy_para: Any = None
    sampling_dtype: str = "float64"
    eps: float = 1e-5
    order: Any = None
    rows_in_flight: int | None = None
    buckets: bool = True
    wave_size: int | None = None
    cuda_graphs: bool | None = None
    compile: bool | str = False
    use_kernels: bool | None = None
    prune_last_block: bool = True
    refresh_every: int | None = None
    decoder: str | None = None
    decoder_para: Any = None
    decoder_check_every: int = 4
    _strategy: Strategy = field(init=False, repr=False, compare=False)
    _decoder: Decoder | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "steps", check_steps(self.steps))
        check_method(self.method)
        object.__setattr__(self, "_strategy", make_strategy(self.strategy, self.strategy_para))
        object.__setattr__(self, "strategy_para", self._strategy.para)
        sampling_dtype(self.sampling_dtype)
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and 0.0 < self.eps < 1.0):
            raise ValueError(f"eps (the schedule's last time) must be in (0, 1), got {self.eps!r}")
        if self.rows_in_flight is not None and (isinstance(self.rows_in_flight, bool) or int(self.rows_in_flight) < 1):
            raise ValueError(f"rows_in_flight (batch_size) must be >= 1, got {self.rows_in_flight!r}")
        if self.wave_size is not None and int(self.wave_size) < 1:
            raise ValueError(f"wave_size must be >= 1, got {self.wave_size!r}")
        if self.refresh_every is not None:
            object.__setattr__(self, "refresh_every", _check_refresh_every(self.refresh_every))
        if self.decoder is None and self.decoder_para is not None:
            raise ValueError(f"decoder_para {self.decoder_para!r} needs a decoder (one of {DECODERS})")
        object.__setattr__(self, "_decoder", None if self.decoder is None else make_decoder(self.decoder,
                                                                                              self.decoder_para))
        if self._decoder is not None:
            object.__setattr__(self, "decoder_para", self._decoder.para)
        if not _whole(self.decoder_check_every) or int(self.decoder_check_every) < 1:
            raise ValueError(f"decoder_check_every must be a whole number >= 1, got {self.decoder_check_every!r}")
        object.__setattr__(self, "decoder_check_every", int(self.decoder_check_every))
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be true, false or 'auto', got {self.compile!r}")

    @property
    def strategy_fn(self) -> Strategy:
        """The strategy bound to its checked parameter (what the head's ``sample_at`` takes)."""
        return self._strategy

    @property
    def decoder_fn(self) -> Decoder | None:
        """The adaptive decoder bound to its checked parameter (None: the method's schedule)."""
        return self._decoder

    @property
    def uses_schedule(self) -> bool:
        """Whether the method's reveal schedule is drawn (not for confidence / entropy_bound)."""
        return self._decoder is None or self._decoder.uses_schedule

    @property
    def needs_noise(self) -> bool:
        return METHOD_SPECS[self.method].needs_noise and self.uses_schedule

    @property
    def noise_dtype(self) -> torch.dtype:
        return sampling_dtype(self.sampling_dtype)

    def planned_wave_size(self, rows_in_flight: int) -> int:
        return int(self.wave_size or max(32 * rows_in_flight, 4096))

    def replace(self, **changes) -> "SamplerConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for summaries and JSONL records: what was sampled, and how the noise was drawn."""
        para = "" if self.strategy_para is None else f"={self.strategy_para}"
        approximate = "" if self._decoder is None else f", {self._decoder.label}"
        approximate += "" if self.refresh_every is None else f", approximate (refresh every {self.refresh_every})"
        schedule = f"{self.method}, {self.steps} steps, " if self.uses_schedule else ""  # a decoder's own pace
        return f"{schedule}{self.strategy}{para}, {self.sampling_dtype.replace('float', 'fp')} Gumbel{approximate}"

    @property
    def approximate(self) -> bool:
        """True when the samples do not follow the model exactly (key/value caching or a decoder is on)."""
        return self.refresh_every is not None or self._decoder is not None


def _whole(value) -> bool:
    """A whole number (bools and fractions refused: a typo must not silently round)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and value == int(value)


def _check_refresh_every(value) -> int:
    """A whole number >= 1."""
    if not _whole(value) or int(value) < 1:
        raise ValueError(f"refresh_every must be a whole number >= 1 (or None for the exact sampler), got {value!r}")
    return int(value)


# Rows in flight when not given: enough to fill a GPU's SMs with RADD-small-sized matmuls (an estimate
# until the throughput curve is measured on a card, see docs/BENCHMARKS.md), few on a CPU.
MAX_AUTO_ROWS = {"cuda": 256, "cpu": 16}
ACTIVATION_BYTES_PER_TOKEN_DIM = 64  # transient inference activations per token and model dim (2x margin)


def auto_rows_in_flight(num_samples: int, length: int, hidden_size: int, device: torch.device,
                        cache_bytes_per_row: int = 0) -> int:
    """Rows per evaluation: at most ``MAX_AUTO_ROWS`` for the device type and ``num_samples``, and on CUDA
    what half of the free memory holds at about 64 bytes per token and model dim (no gradients kept),
    plus ``cache_bytes_per_row`` (the approximate sampler's key/value cache, ``KVCache.bytes_per_row``)."""
    cap = MAX_AUTO_ROWS.get(device.type, MAX_AUTO_ROWS["cpu"])
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_row = ACTIVATION_BYTES_PER_TOKEN_DIM * length * hidden_size + int(cache_bytes_per_row)
        cap = min(cap, max(1, int(0.5 * free // per_row)))
    return max(1, min(cap, int(num_samples)))


FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig) if f.init)


def sampler_config(config: SamplerConfig | None = None, **options) -> SamplerConfig:
    """``config`` (default: the defaults) with ``options`` applied; ``batch_size`` is ``rows_in_flight``."""
    if "batch_size" in options:  # the engine's historical name for rows in flight
        options["rows_in_flight"] = options.pop("batch_size")
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling option(s) {unknown}; expected some of {list(FIELDS)}")
    base = config or SamplerConfig()
    return base.replace(**options) if options else base
