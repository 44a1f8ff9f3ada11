"""Forward (absorbing) processes: which positions of a clean batch become MASK.

All vectorised over the batch; randomness is drawn on the batch's device. ``MaskingLaw`` gives
the same laws in the two parts the static-row step draws (host counts, device positions).
"""
from __future__ import annotations

import torch


def mask_with_prob(x: torch.Tensor, p: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Mask each token of x [B, L] independently with probability p [B] (one rate per sequence)."""
    move = torch.rand(x.shape, device=x.device) < p[:, None]
    return torch.where(move, mask_id, x)


def mask_k_random(x: torch.Tensor, k: torch.Tensor, mask_id: int, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Mask exactly k [B] uniformly chosen positions of each sequence of x [B, L].

    The rank of each position in a random permutation is below k for exactly k positions,
    so no Python loop over the batch and no ties (unlike thresholding the uniforms).
    keys: the uniforms [B, L] that rank the positions (drawn here when None).
    """
    if keys is None:
        keys = torch.rand(x.shape, device=x.device)
    rank = keys.argsort(-1).argsort(-1)  # [B, L]
    return torch.where(rank < k[:, None], mask_id, x)


def mask_order_suffix(x: torch.Tensor, rank: torch.Tensor, i: int, mask_id: int) -> torch.Tensor:
    """Any-order AR state before step i: positions generated at step >= i are masked.

    rank [B, L]: the step at which each position is generated (the inverse of the order).
    """
    return torch.where(rank >= i, mask_id, x)


# -- the same laws in two parts, as the static-row step draws them (losses/static_rows.py) ---------------------------
class MaskingLaw:
    """A loss's masking law as the static-row step draws it: on the host, per sequence a rate r_j
    (what the loss's rows are weighted by) with each position's masking probability p_j, and the
    number n_j of masked positions; on the device, which n_j positions (a uniform subset).

    A loss's registry entry names its law (``StaticRowForm.masking``). ``planner`` is the
    ``static_rows.MaskPlanner`` that asks: its ``length`` L, ``noise``, ``sampler`` (the loss's
    time sampler, None when it takes none) and ``sampling_eps``. Every draw is on the CPU, from
    ``generator``. takes_time_sampler: its rates come from the loss's time sampler.
    """

    takes_time_sampler = True

    def rates(self, planner, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rate [B] fp32, masking probability p [B] float64) of ``batch_size`` sequences."""
        raise NotImplementedError

    def counts(self, rate: torch.Tensor, p: torch.Tensor, length: int,
               generator: torch.Generator | None) -> torch.Tensor:
        """Masked positions per sequence [B] int64: n_j ~ Binomial(L, p_j), the count of L
        independent coins (masking each token w.p. p_j is this count, then a uniform subset)."""
        trials = torch.full((rate.shape[0],), float(length), dtype=torch.float64)
        return torch.binomial(trials, p.clamp(0.0, 1.0), generator=generator).long()

    def count_moments(self, batch_size: int, length: int) -> tuple[float, float] | None:
        """Mean and variance of N = sum_j n_j in closed form, or None: the planner estimates them."""
        return None


class TimeMasking(MaskingLaw):
    """t_DSE / t_DCE: t = (1 - eps) u + eps from the time sampler, each token masked w.p.
    1 - exp(-sigma(t)) (``noise.move_chance``); the rate is t."""

    def rates(self, planner, batch_size, generator):
        r = planner.sampler(batch_size, "cpu", generator)
        t = (1 - planner.sampling_eps) * r + planner.sampling_eps  # as the eager t-losses draw t
        return t, planner.noise.move_chance(t.double())


class RateMasking(MaskingLaw):
    """lambda_DCE: lam from the time sampler, each token masked w.p. lam; the rate is lam."""

    def rates(self, planner, batch_size, generator):
        r = planner.sampler(batch_size, "cpu", generator)
        return r, r.double()


class CountMasking(MaskingLaw):
    """k_DCE: k ~ U{1..L}, exactly k positions masked; the rate is k (as fp32), p = k / L."""

    takes_time_sampler = False

    def rates(self, planner, batch_size, generator):
        k = torch.randint(1, planner.length + 1, (batch_size,), generator=generator)
        return k.float(), k.double() / planner.length

    def counts(self, rate, p, length, generator):
        return rate.long()

    def count_moments(self, batch_size, length):
        return batch_size * (length + 1) / 2, batch_size * (length * length - 1) / 12


TIME_MASKING, RATE_MASKING, COUNT_MASKING = TimeMasking(), RateMasking(), CountMasking()
