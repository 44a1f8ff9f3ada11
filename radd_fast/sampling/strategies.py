"""Sampling strategies as data: which tokens a revealed position may take.

Every strategy is "filter the logits, then Gumbel-max": ``direct`` keeps all
real tokens, ``top_k`` the k largest, ``top_p`` the smallest sorted prefix whose
probability mass exceeds p (a token is dropped once the mass before it is above p;
the first token always kept: the published rule), all tokens for p = 1.
The MASK column is never part of the logits here (the published top-p / top-k
included it in the softmax; we exclude it, so a revealed token is never MASK).

Adding a strategy is one ``StrategySpec`` entry in ``STRATEGY_SPECS``: its
parameter check and its filter. ``make_strategy(name, para)`` binds one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..model.head import gumbel

SAMPLING_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _no_para(para) -> None:
    return None


def _probability(para) -> float:
    p = float(para)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p needs strategy_para p in (0, 1], got {para}")
    return p


def _whole_number(para) -> int:
    value = float(para)
    if value != int(value) or int(value) < 1:
        raise ValueError(f"top_k needs a whole-number strategy_para k >= 1, got {para}")
    return int(value)


def _keep_all(logits: torch.Tensor, para) -> torch.Tensor:
    return logits.clone()


def _keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(int(k), logits.shape[-1])
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep.scatter_(-1, logits.topk(k, dim=-1).indices, True)  # exactly k, even with ties
    return logits.masked_fill(~keep, float("-inf"))


def _keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:  # the whole distribution: a float cumsum can round above 1 and would drop tail tokens
        return logits.clone()
    probs = logits.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    remove = sorted_probs.cumsum(dim=-1) > p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses p
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


@dataclass(frozen=True)
class StrategySpec:
    """One strategy: the published library default of its parameter, its check, its filter.

    parse: ``para -> para`` (raises ValueError on a bad value); keep: ``(logits [N, C] fp32, para)
    -> logits with removed tokens at -inf`` (a new tensor)."""

    name: str
    default_para: Any
    parse: Callable[[Any], Any]
    keep: Callable[[torch.Tensor, Any], torch.Tensor]


# Two published top-p defaults, both kept, each where it applies: the library's
# catsample.top_p_sampling(p=0.9) is the default of the library API here (StrategySpec,
# generate, DiffusionSampler); the published run_sample.py's --strategy_para default 0.8 is
# sample.py's (sampling/cli.py). top_k has one: the library's top_k_sampling(k=400).
PUBLISHED_LIBRARY_TOP_P = 0.9
PUBLISHED_CLI_TOP_P = 0.8
PUBLISHED_LIBRARY_TOP_K = 400
STRATEGY_SPECS: dict[str, StrategySpec] = {spec.name: spec for spec in (
    StrategySpec("direct", None, _no_para, _keep_all),
    StrategySpec("top_p", PUBLISHED_LIBRARY_TOP_P, _probability, _keep_top_p),
    StrategySpec("top_k", PUBLISHED_LIBRARY_TOP_K, _whole_number, _keep_top_k),
)}
STRATEGIES = tuple(STRATEGY_SPECS)
DEFAULT_PARA = {name: spec.default_para for name, spec in STRATEGY_SPECS.items() if spec.default_para is not None}


@dataclass(frozen=True)
class Strategy:
    """A strategy with its parameter checked: what the head's ``sample_at`` takes."""

    spec: StrategySpec
    para: Any

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_direct(self) -> bool:
        """No filtering: the fused head kernel can draw from the full distribution."""
        return self.spec.name == "direct"

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [N, C] over real tokens -> fp32 logits with removed tokens at -inf (new tensor)."""
        logits = logits.float()
        if logits.shape[0] == 0:
            return logits.clone()
        return self.spec.keep(logits, self.para)


def _spec(strategy: str) -> StrategySpec:
    if strategy not in STRATEGY_SPECS:
        raise ValueError(f"unknown sampling strategy {strategy!r}; expected one of {STRATEGIES}")
    return STRATEGY_SPECS[strategy]


def check_strategy(strategy: str, strategy_para=None):
    """Validate and return the strategy's parameter (None for direct, a float p, or an int k)."""
    spec = _spec(strategy)
    return spec.parse(spec.default_para if strategy_para is None else strategy_para)


def make_strategy(strategy: str, strategy_para=None) -> Strategy:
    """The named strategy bound to its checked parameter (the published default when None)."""
    return Strategy(_spec(strategy), check_strategy(strategy, strategy_para))


def sampling_dtype(name) -> torch.dtype:
    """'float32' / 'float64' (or the torch dtype) -> the dtype of the Gumbel noise and scores."""
    if isinstance(name, torch.dtype) and name in SAMPLING_DTYPES.values():
        return name
    if name not in SAMPLING_DTYPES:
        raise ValueError(f"sampling_dtype must be one of {sorted(SAMPLING_DTYPES)}, got {name!r}")
    return SAMPLING_DTYPES[name]


def filter_logits(logits: torch.Tensor, strategy: str, para=None) -> torch.Tensor:
    """logits [N, C] over real tokens -> fp32 logits with removed tokens at -inf (new tensor)."""
    return Strategy(_spec(strategy), para).filter(logits)


def sample_logits(logits: torch.Tensor, strategy: str, para=None, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One token per row of ``logits`` [N, C] (real tokens only) with the strategy: [N] int64."""
    scores = filter_logits(logits, strategy, para).to(dtype)
    return (scores + gumbel(scores.shape, dtype, scores.device, generator)).argmax(dim=-1)
