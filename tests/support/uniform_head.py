"""A uniform-head model and the rates that i.i.d. uniform tokens must show.

A fresh RADD zero-initialises its output layer, so it gives log p = -log(V-1) for every real token
and must produce i.i.d. uniform tokens whatever the schedule: the token frequencies, the
equal-neighbour rate and the cross-sample agreement are all known (1/(V-1)). Noise reused between
evaluations, rows or seeds moves them. Used by the engine, the published-API samplers and the
reveal schedule's tests.
"""
from __future__ import annotations

import math

import torch

from radd_fast import RADD, ModelConfig, RADDConfig
from tests.support.stats import ALPHA, chi2_sf

N_REAL = 8  # real tokens; V = 9 with MASK
LENGTH = 12
SAMPLES = 64
Z_MAX = 5.0  # binomial rates within 5 standard errors (seeded: a pass is reproducible)


def uniform_model() -> RADD:
    """A fresh tiny RADD: its output layer is zero, so every real token has probability 1/N_REAL."""
    torch.manual_seed(0)
    model = RADD(RADDConfig(tokens=N_REAL, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=LENGTH,
                                                              dropout=0.0, name="uniform-head")))
    head = model.output_layer.linear
    assert not head.weight.detach().any() and not head.bias.detach().any()
    return model.eval()


def assert_rate(hits: torch.Tensor, p: float, name: str) -> None:
    """A Bernoulli(p) rate over the entries of the bool tensor ``hits``, within Z_MAX standard errors."""
    n = hits.numel()
    rate = float(hits.double().mean())
    z = (rate - p) / math.sqrt(p * (1 - p) / n)
    assert abs(z) < Z_MAX, f"{name}: rate {rate:.4f} vs {p:.4f} over {n} (z = {z:.1f})"


def assert_iid_uniform(x: torch.Tensor, name: str) -> None:
    """Tokens x [R, L] look i.i.d. uniform over N_REAL: frequencies, neighbours, rows."""
    assert x.min() >= 0 and x.max() < N_REAL, f"{name}: a token outside the real vocabulary"
    counts = torch.bincount(x.flatten(), minlength=N_REAL).double()
    expected = x.numel() / N_REAL
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert chi2_sf(stat, N_REAL - 1) > ALPHA, f"{name}: token counts {counts.tolist()} are not uniform"
    # Adjacent cells are pairwise independent under i.i.d. uniform tokens, so these are binomial rates.
    assert_rate(x[:, 1:] == x[:, :-1], 1 / N_REAL, f"{name}: equal neighbours")
    assert_rate(x[1:] == x[:-1], 1 / N_REAL, f"{name}: agreement of consecutive samples")
    assert_rate(x[:, ::2] == x[:, 1::2].flip(1), 1 / N_REAL, f"{name}: agreement of mirrored positions")


def assert_independent_pairs(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    """Samples x, y [R, L] of a uniform head (R * L at least a few hundred), cell by cell independent: the
    counts of the N_REAL^2 pairs (x[r, j], y[r, j]) against the product of the uniform marginals (a
    chi-square), and no sample of x equal to one of y (two independent samples agree with
    probability N_REAL^-L). Noise repeated between the runs (or waves) of x and y shows in both."""
    assert x.shape == y.shape, f"{name}: shapes {tuple(x.shape)} and {tuple(y.shape)}"
    counts = torch.bincount((x * N_REAL + y).flatten(), minlength=N_REAL ** 2).double()
    expected = x.numel() / N_REAL ** 2
    stat = float(((counts - expected) ** 2 / expected).sum())
    p = chi2_sf(stat, N_REAL ** 2 - 1)
    assert p > ALPHA, f"{name}: pairs not independent (chi2 {stat:.0f}, df {N_REAL ** 2 - 1}, p {p:.2g}; " \
                      f"equal cells {float((x == y).double().mean()):.3f}, independent: {1 / N_REAL:.3f})"
    same = (x[:, None, :] == y[None, :, :]).all(-1)
    assert not same.any(), f"{name}: sample pairs equal token for token: {same.nonzero()[:5].tolist()}"
