"""Adaptive decoders as data (opt-in, approximate): which masked positions an evaluation reveals.

The exact samplers reveal the positions the noise schedule picks, whatever the model says
(schedule.py). A decoder looks at the model's own statistics instead: at each evaluation of a
row, the head draws a candidate token at EVERY masked position with the strategy and reports its
log-probability and the entropy of its distribution (``RevealSampler.token_stats``, one pass over
the vocabulary); the decoder's rule keeps some of the candidates, the rest stay masked:

- ``confidence`` (knob tau): every candidate whose probability is >= tau, at least the most
  confident one (Fast-dLLM's threshold rule; tau > 1 reveals exactly one per evaluation: a
  greedy-by-confidence order);
- ``entropy_bound`` (knob gamma): the masked positions sorted by entropy, the longest prefix whose
  summed entropy is <= gamma, at least one (the EB-sampler's bound, in this simple form);
- ``low_confidence`` (no knob): the exact method's number of reveals per evaluation (its schedule,
  drawn as the exact engine draws it), but the most confident positions instead of random ones
  (MaskGIT / LLaDA low-confidence remasking).

None of them samples the model's distribution: every summary and record says
``approximate (<decoder> <knob>)``. Ties go to the lower position everywhere.

A rule has two forms: ``select`` on dense [E, L] tensors (the engine's, adaptive.py, no host
sync) and ``choose`` on one row's Python lists (the reference, ``decode_ref``: a plain loop, one
row and one evaluation at a time). Adding a decoder is one ``DecoderSpec`` entry here.

Noise: the candidate at position p of sample i at its evaluation k is drawn with the noise id
``(i * L + p) * L + k`` (``noise_ids``): fresh noise at every evaluation, and a sample the same
whichever rows share its evaluations. Example::

    tokens, stats = generate(model, noise, 16, 128, config=SamplerConfig(decoder="confidence", decoder_para=0.9))
    stats.sampler   # 'direct, fp64 Gumbel, approximate (confidence tau=0.9)'
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..philox import keyed_gumbel


# -- the rules, dense (the engine's): conf / entropy / masked [E, L], count [E] -> reveal [E, L] bool --------------
def _select_confidence(log_prob: torch.Tensor, entropy: torch.Tensor, masked: torch.Tensor, count, tau: float):
    conf = torch.where(masked, log_prob, float("-inf"))
    best = torch.zeros_like(masked).scatter_(1, conf.argmax(dim=1, keepdim=True), True)  # first maximum
    return masked & ((log_prob >= math.log(tau)) | best)


def _select_entropy_bound(log_prob: torch.Tensor, entropy: torch.Tensor, masked: torch.Tensor, count, gamma: float):
    ent = torch.where(masked, entropy.double(), float("inf"))
    sorted_ent, order = ent.sort(dim=1, stable=True)  # stable: equal entropies keep position order
    keep = (sorted_ent.cumsum(dim=1) <= gamma).long().cumprod(dim=1).bool()  # a prefix, even with rounding < 0
    keep[:, 0] = True  # at least one (a row with nothing masked keeps nothing: masked below)
    return masked & torch.zeros_like(masked).scatter_(1, order, keep)


def _select_low_confidence(log_prob: torch.Tensor, entropy: torch.Tensor, masked: torch.Tensor, count, para):
    conf = torch.where(masked, log_prob, float("-inf"))
    order = conf.sort(dim=1, descending=True, stable=True).indices  # most confident first, ties by position
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, places)  # each position's place in that order
    return masked & (rank < count[:, None])


# -- the rules, per row (the reference's): lists over the row's masked positions, in position order -----------------
def _choose_confidence(log_prob: list[float], entropy: list[float], count: int, tau: float) -> list[int]:
    best = max(range(len(log_prob)), key=lambda i: (log_prob[i], -i))
    return sorted({best} | {i for i, lp in enumerate(log_prob) if math.exp(lp) >= tau})


def _choose_entropy_bound(log_prob: list[float], entropy: list[float], count: int, gamma: float) -> list[int]:
    chosen, total = [], 0.0
    for i in sorted(range(len(entropy)), key=lambda i: (entropy[i], i)):
        if chosen and total + entropy[i] > gamma:
            break
        chosen.append(i)
        total += entropy[i]
    return sorted(chosen)


def _choose_low_confidence(log_prob: list[float], entropy: list[float], count: int, para) -> list[int]:
    return sorted(sorted(range(len(log_prob)), key=lambda i: (-log_prob[i], i))[:count])


# -- knobs -----------------------------------------------------------------------------------------------------------
def _real(value) -> float | None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _tau(value) -> float:
    tau = _real(value)
    if tau is None or tau <= 0:
        raise ValueError(f"confidence needs decoder_para tau > 0 (a probability threshold; tau > 1 reveals one "
                         f"position per evaluation), got {value!r}")
    return tau


def _gamma(value) -> float:
    gamma = _real(value)
    if gamma is None or gamma < 0:
        raise ValueError(f"entropy_bound needs decoder_para gamma >= 0 (nats of summed entropy per evaluation), "
                         f"got {value!r}")
    return gamma


def _no_knob(value) -> None:
    if value is not None:
        raise ValueError(f"low_confidence has no decoder_para (it reveals as many positions per evaluation as the "
                         f"exact method's schedule: set steps), got {value!r}")
    return None


@dataclass(frozen=True)
class DecoderSpec:
    """One decoder. knob: the name of its parameter (None: it has none); default: the parameter when
    none is given; parse: ``para -> para`` (ValueError on a bad one); select: the dense rule
    ``(log_prob, entropy, masked [E, L], count [E], para) -> reveal [E, L]``; choose: the same rule
    on one row's lists (the reference); uses_schedule: it needs the exact method's reveal schedule
    (``count`` = the positions the exact sampler reveals at this evaluation)."""

    name: str
    knob: str | None
    default: Any
    parse: Callable[[Any], Any]
    select: Callable
    choose: Callable
    uses_schedule: bool = False


DECODER_SPECS: dict[str, DecoderSpec] = {spec.name: spec for spec in (
    # tau 0.9: the threshold Fast-dLLM reports for LLaDA; gamma 1.0: ours (a starting point: sweep it)
    DecoderSpec("confidence", "tau", 0.9, _tau, _select_confidence, _choose_confidence),
    DecoderSpec("entropy_bound", "gamma", 1.0, _gamma, _select_entropy_bound, _choose_entropy_bound),
    DecoderSpec("low_confidence", None, None, _no_knob, _select_low_confidence, _choose_low_confidence,
                uses_schedule=True),
)}
DECODERS = tuple(DECODER_SPECS)


@dataclass(frozen=True)
class Decoder:
    """A decoder bound to its checked parameter."""

    spec: DecoderSpec
    para: Any

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def uses_schedule(self) -> bool:
        return self.spec.uses_schedule

    @property
    def label(self) -> str:
        """What every summary, stats object and record says: ``approximate (confidence tau=0.9)``."""
        knob = "" if self.spec.knob is None else f" {self.spec.knob}={self.para:g}"
        return f"approximate ({self.name}{knob})"

    def select(self, log_prob: torch.Tensor, entropy: torch.Tensor, masked: torch.Tensor,
               count: torch.Tensor | None = None) -> torch.Tensor:
        """The positions revealed: log_prob, entropy [E, L] fp32 (any value where not masked), masked [E, L]
        bool, count [E] (uses_schedule) -> [E, L] bool, at least one per row with a masked position."""
        return self.spec.select(log_prob, entropy, masked, count, self.para)

    def choose(self, log_prob: list[float], entropy: list[float], count: int = 0) -> list[int]:
        """The reference rule on one row's masked positions (lists in position order) -> the indices kept."""
        return self.spec.choose(log_prob, entropy, count, self.para)


def make_decoder(name: str, para=None) -> Decoder:
    """The named decoder with its checked parameter (the default when None)."""
    if name not in DECODER_SPECS:
        raise ValueError(f"unknown decoder {name!r}; expected one of {DECODERS}")
    spec = DECODER_SPECS[name]
    return Decoder(spec, spec.parse(spec.default if para is None else para))


def noise_ids(sample_and_position: torch.Tensor, evaluation: torch.Tensor, length: int) -> torch.Tensor:
    """The noise id of a candidate: ``(i * L + p) * L + k`` from i * L + p [N] and its row's evaluation k [N]
    (k < L: every evaluation reveals at least one of at most L positions)."""
    return sample_and_position * length + evaluation


def max_samples(length: int) -> int:
    """Sample indices a decoder run can key: noise ids stay below 2^63."""
    return (2**63 - 1) // (length * length)


@torch.no_grad()
def decode_ref(model, x0: torch.Tensor, decoder: Decoder, strategy, key: int, first_index: int = 0,
               sampling_dtype: torch.dtype = torch.float64, group: torch.Tensor | None = None):
    """The reference decoder: each row alone, one evaluation at a time, in plain PyTorch and Python.

    x0: [R, L] int64 (MASK at the free positions); strategy: a ``strategies.Strategy``; key: the
    run's decoder noise key; first_index: the index of row 0; group: [R, L] the exact schedule's
    reveal group of each free position (``uses_schedule``). Each evaluation: the unpruned
    ``model.hidden`` of the row, the head's logits at its masked positions, the strategy's filter, the
    keyed Gumbel-max draw, log-probabilities and entropies from an fp64 log-softmax (returned as fp32,
    as the head's are), then ``decoder.choose``. Returns (tokens [R, L], evaluations per row [R]).
    """
    head, mask_id = model.output_head(), model.mask_id
    R, L = x0.shape
    out, evals = x0.clone(), torch.zeros(R, dtype=torch.int64)
    for r in range(R):
        x, k = out[r], 0
        while bool((x == mask_id).any()):
            pos = torch.nonzero(x == mask_id).squeeze(1)
            h = model.hidden(x[None])[0].index_select(0, pos)
            logits = strategy.filter(head.logits(h)[:, :head.n_vocab])
            ids = noise_ids((first_index + r) * L + pos, torch.full_like(pos, k), L)
            noise = keyed_gumbel(key, ids, head.n_vocab, sampling_dtype)
            tokens = (logits.to(sampling_dtype) + noise).argmax(dim=-1)
            logp = logits.double().log_softmax(dim=-1)
            log_prob = logp.gather(1, tokens[:, None]).squeeze(1).float()
            entropy = (-torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(dim=1)).float()
            count = int((group[r] == k).sum()) if decoder.uses_schedule else 0
            keep = torch.tensor(decoder.choose(log_prob.tolist(), entropy.tolist(), count), dtype=torch.int64)
            x[pos[keep]] = tokens[keep]
            k += 1
        evals[r] = k
    return out, evals
