"""The reveal schedule (docs/SAMPLING.md): which position of which row is revealed at which step.

A masked token's chance to be revealed at step i (the "update rate") depends only
on the noise schedule, never on the model output (docs/SAMPLING.md). So the whole
schedule can be drawn up front: each free token draws its reveal step from the
categorical P(step i) = rate_i * prod_{j<i} (1 - rate_j) (the last step reveals
everything left). A row needs a model evaluation only at its distinct reveal
steps, numbered here 0..K-1 ("groups"); K is the row's E-NFE.

Example::

    rates = update_rates(noise, steps=1024, method="tweedie")         # [1024] float64
    step = draw_reveal_steps(rates, free)                              # [R, L], -1 where fixed
    group, K = group_steps(step)                                       # group ranks, E-NFE per row
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def _tweedie_rate(noise, t: torch.Tensor, dt: float, sigma: torch.Tensor, move: torch.Tensor) -> torch.Tensor:
    """Exact reveal probability over [t - dt, t): (e^{-sigma(t-dt)} - e^{-sigma(t)}) / (1 - e^{-sigma(t)})."""
    sigma_next = noise(t - dt)[0]
    return (torch.exp(-sigma_next) - torch.exp(-sigma)) / move


def _euler_rate(noise, t: torch.Tensor, dt: float, sigma: torch.Tensor, move: torch.Tensor) -> torch.Tensor:
    """First-order reveal probability: dt * sigma'(t) e^{-sigma(t)} / (1 - e^{-sigma(t)})."""
    dsigma = noise(t)[1]
    return dt * dsigma * torch.exp(-sigma) / move


@dataclass(frozen=True)
class MethodSpec:
    """One sampling method. rate: ``(noise, t, dt, sigma, move) -> [steps]`` reveal probability of a
    still-masked token (a diffusion method, needs the noise schedule); None: a fixed order of
    positions instead (any-order AR, no noise)."""

    name: str
    rate: Callable | None

    @property
    def needs_noise(self) -> bool:
        return self.rate is not None


# Adding a method is one entry here (and, for an order-based one, its plan in ``ordered_groups``).
METHOD_SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("tweedie", _tweedie_rate),
    MethodSpec("euler", _euler_rate),
    MethodSpec("ordered", None),
)}
METHODS = tuple(METHOD_SPECS)
DIFFUSION_METHODS = tuple(name for name, spec in METHOD_SPECS.items() if spec.needs_noise)


def check_method(method: str) -> str:
    if method not in METHOD_SPECS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
    return method


def check_steps(steps) -> int:
    if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def update_rates(noise, steps: int, method: str, eps: float = 1e-5, device=None) -> torch.Tensor:
    """Per-step reveal probability of a still-masked token: [steps] float64, last entry 1.

    t_i = linspace(1, eps, steps + 1)[i], dt = (1 - eps) / steps (published). Rates are clamped
    to [0, 1]: a rate above 1 (euler with few steps) reveals every token, as in the published code.
    """
    steps = check_steps(steps)
    spec = METHOD_SPECS.get(method)
    if spec is None or not spec.needs_noise:
        raise ValueError(f"update rates exist for {DIFFUSION_METHODS}, got method {method!r}")
    t = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64, device=device)[:-1]
    dt = (1.0 - eps) / steps
    sigma = noise(t)[0]
    move = -torch.expm1(-sigma)  # 1 - exp(-sigma(t)): probability of being masked at t
    rate = spec.rate(noise, t, dt, sigma, move).to(torch.float64).clamp(0.0, 1.0)
    rate[-1] = 1.0
    return rate


def step_distribution(rates: torch.Tensor) -> torch.Tensor:
    """P(a token is revealed at step i) for every step: [steps] float64, sums to 1."""
    survive = torch.cumprod(1.0 - rates, dim=0)
    before = torch.cat([survive.new_ones(1), survive[:-1]])
    return before * rates


def draw_reveal_steps(rates: torch.Tensor, free: torch.Tensor, generator: torch.Generator | None = None,
                      u: torch.Tensor | None = None) -> torch.Tensor:
    """Reveal step of every free token by inverse-CDF sampling: free [R, L] bool -> [R, L] int64, -1 where fixed.

    u: the uniforms [R, L] float64 in [0, 1) (the engine's are keyed per sample); default: drawn from generator."""
    cdf = torch.cumsum(step_distribution(rates), dim=0)
    cdf[-1] = 1.0  # rounding: u < 1 always lands on a step
    if u is None:
        u = torch.rand(free.shape, dtype=torch.float64, device=free.device, generator=generator)
    step = torch.searchsorted(cdf, u, right=True).clamp_(max=rates.numel() - 1)
    return torch.where(free, step, torch.full_like(step, -1))


def group_steps(step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each token's reveal step among its row's distinct reveal steps.

    step [R, L] int (-1 = never revealed) -> group [R, L] int32 (-1 kept), K [R] int64
    (the number of distinct steps = the evaluations the row needs, its E-NFE).
    """
    if step.numel() == 0:
        return step.to(torch.int32), step.new_zeros(step.shape[0])
    sorted_step, order = step.sort(dim=1)
    new = torch.ones_like(sorted_step, dtype=torch.bool)
    new[:, 1:] = sorted_step[:, 1:] != sorted_step[:, :-1]
    new &= sorted_step >= 0
    rank = new.cumsum(dim=1, dtype=torch.int32) - 1  # -1 for the fixed tokens sorted first
    group = torch.empty_like(rank).scatter_(1, order, rank)
    return group, new.sum(dim=1)


def group_sizes(grp: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Positions in each (row, group): grp [R1, L] (-1 fixed), K [R1 or fewer] -> (counts [R1 * G + 1]
    int64 on the device, row r's group g at r * G + g, the last entry a dump for fixed tokens; G).
    One host sync (G = K.max() + 1)."""
    n_groups = int(K.max()) + 1 if K.numel() else 1
    R1 = grp.shape[0]
    idx = torch.arange(R1, device=grp.device)[:, None] * n_groups + grp.long()
    idx = torch.where(grp >= 0, idx, torch.full_like(idx, R1 * n_groups))  # fixed tokens: the dump slot
    counts = torch.zeros(R1 * n_groups + 1, dtype=torch.int64, device=grp.device)
    counts.scatter_add_(0, idx.view(-1), torch.ones_like(idx.view(-1)))
    return counts, n_groups


def ordered_groups(free: torch.Tensor, steps: int, order: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, shared: bool = False,
                   u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Any-order AR schedule (docs/SAMPLING.md): free positions revealed in ``order``, in ``steps`` chunks.

    free [R, L] bool; order: a permutation of range(L) shared by all rows (fixed positions in it are
    skipped), or None for a random one (per row, or one for all rows when ``shared``, as published),
    the positions sorted by uniforms ``u`` [R, L] when given (the engine's, keyed per sample), else
    drawn from ``generator``.
    The n free positions of a row are split into K = min(steps, n) contiguous chunks of the order
    (one position per step when steps >= n). Returns (group [R, L] int32, -1 where fixed; K [R]).
    """
    R, L = free.shape
    device = free.device
    if order is None and u is not None:
        keys = u
    elif order is None:
        keys = torch.rand(1 if shared else R, L, device=device, generator=generator).expand(R, L)
    else:
        order = torch.as_tensor(order, device=device).long().flatten()
        if order.numel() != L or not torch.equal(order.sort().values, torch.arange(L, device=device)):
            raise ValueError(f"order must be a permutation of range({L}), got {order.numel()} entries")
        keys = torch.empty(L, device=device).scatter_(0, order, torch.arange(L, device=device, dtype=torch.float32))
        keys = keys.expand(R, L)
    keys = keys.masked_fill(~free, float("inf"))
    rank = torch.empty(R, L, dtype=torch.int64, device=device)
    rank.scatter_(1, keys.argsort(dim=1), torch.arange(L, device=device).expand(R, L).contiguous())
    n_free = free.sum(dim=1, keepdim=True)
    K = n_free.clamp(max=check_steps(steps))
    group = (rank * K) // n_free.clamp(min=1)
    group = torch.where(free, group, torch.full_like(group, -1)).to(torch.int32)
    return group, K.squeeze(1)


def expected_enfe(steps: int, n_free: int) -> float:
    """E-NFE of a row with n_free masked tokens and loglinear noise: N (1 - (1 - 1/N)^L) (docs/SAMPLING.md)."""
    return steps * (1.0 - (1.0 - 1.0 / steps) ** n_free)


def expected_enfe_exact(rates: torch.Tensor, n_free) -> float | np.ndarray:
    """E-NFE for any rates: sum_i 1 - (1 - P(step i))^n_free (the loglinear formula up to O(eps)).

    n_free: an int (returns a float) or an array of ints (returns an array); one host copy of P.
    """
    p = step_distribution(rates).cpu().numpy()
    n = np.asarray(n_free, dtype=np.float64)
    values = (1.0 - (1.0 - p[None, :]) ** n.reshape(-1, 1)).sum(axis=1)
    return float(values[0]) if n.ndim == 0 else values
