"""Sampling strategies (spec 5.1, 5.2): which tokens a revealed position may take.

Every strategy is "filter the logits, then Gumbel-max": ``direct`` keeps all
real tokens, ``top_k`` the k largest, ``top_p`` the smallest sorted prefix whose
probability mass reaches p (the first token always kept, published rule).
The MASK column is never part of the logits here (the published top-p / top-k
included it in the softmax; we exclude it, so a revealed token is never MASK).
"""
from __future__ import annotations

import torch

STRATEGIES = ("direct", "top_p", "top_k")
# Published defaults of top_p_sampling(p=0.9) / top_k_sampling(k=10).
DEFAULT_PARA = {"top_p": 0.9, "top_k": 10}
SAMPLING_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_strategy(strategy: str, strategy_para=None):
    """Validate and return the strategy's parameter (None for direct, a float p, or an int k)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "direct":
        return None
    para = DEFAULT_PARA[strategy] if strategy_para is None else strategy_para
    if strategy == "top_p":
        para = float(para)
        if not 0.0 < para <= 1.0:
            raise ValueError(f"top_p needs strategy_para p in (0, 1], got {para}")
        return para
    if float(para) != int(float(para)) or int(float(para)) < 1:
        raise ValueError(f"top_k needs an integer strategy_para k >= 1, got {para}")
    return int(float(para))


def sampling_dtype(name) -> torch.dtype:
    """'float32' / 'float64' (or the torch dtype) -> the dtype of the Gumbel noise and scores."""
    if isinstance(name, torch.dtype) and name in SAMPLING_DTYPES.values():
        return name
    if name not in SAMPLING_DTYPES:
        raise ValueError(f"sampling_dtype must be one of {sorted(SAMPLING_DTYPES)}, got {name!r}")
    return SAMPLING_DTYPES[name]


def filter_logits(logits: torch.Tensor, strategy: str, para=None) -> torch.Tensor:
    """logits [N, C] over real tokens -> fp32 logits with removed tokens at -inf (new tensor)."""
    logits = logits.float()
    if strategy == "direct" or logits.shape[0] == 0:
        return logits.clone()
    if strategy == "top_k":
        k = min(int(para), logits.shape[-1])
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(k, dim=-1).indices, True)  # exactly k, even with ties
        return logits.masked_fill(~keep, float("-inf"))
    if strategy == "top_p":
        probs = logits.softmax(dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        remove = sorted_probs.cumsum(dim=-1) > para
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses p
        remove[..., 0] = False
        return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    raise ValueError(f"unknown sampling strategy {strategy!r}; expected one of {STRATEGIES}")


def gumbel(shape, dtype: torch.dtype, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise, drawn on ``device`` (never on the host and copied)."""
    u = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    return u.clamp_min_(torch.finfo(dtype).tiny).log_().neg_().log_().neg_()  # in place: one buffer


def sample_logits(logits: torch.Tensor, strategy: str, para=None, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One token per row of ``logits`` [N, C] (real tokens only) with the strategy: [N] int64."""
    scores = filter_logits(logits, strategy, para).to(dtype)
    return (scores + gumbel(scores.shape, dtype, scores.device, generator)).argmax(dim=-1)
