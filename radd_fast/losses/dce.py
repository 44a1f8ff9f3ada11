"""Denoising (score / concrete-score) losses of RADD (docs/LOSSES.md): t_DSE, t_DCE, lambda_DCE, k_DCE.

Each returns the per-sequence loss [B]. Each takes optional fixed randomness
(``t`` / ``lam`` / ``k`` and ``perturbed``) so tests and evaluation can score a
given perturbed batch; left out, they are drawn on the batch's device.
With the reference backend every value equals the published full computation
(``model(x)`` log-probs, masked, weighted, summed); only masked rows are computed.
"""
from __future__ import annotations

import torch

from .common import masked_target_log_probs, per_sequence
from .masking import mask_k_random, mask_with_prob
from .time_samplers import get_time_sampler


def _time_perturb(batch, mask_id, noise, t, perturbed, sampling_eps, time_sampler):
    """t in [eps, 1] (from the sampler), sigma(t), sigma'(t), and x_t masked w.p. 1 - exp(-sigma)."""
    if t is None:
        t = (1 - sampling_eps) * get_time_sampler(time_sampler)(batch.shape[0], batch.device) + sampling_eps
    sigma, dsigma = noise(t)
    if perturbed is None:
        perturbed = mask_with_prob(batch, -torch.expm1(-sigma), mask_id)
    return sigma, dsigma, perturbed


def t_dce(model, batch, noise, t=None, perturbed=None, sampling_eps=1e-3, time_sampler="vdm"):
    """sigma'(t) * sum_{i in M} (log e - log p_i) / e, e = expm1(sigma(t)).

    The ``log e / e`` term does not depend on the model (zero gradient); it is kept so the
    value matches the published loss. Its integral over t in (0, 1) is 0 for loglinear noise.
    """
    sigma, dsigma, perturbed = _time_perturb(batch, model.mask_id, noise, t, perturbed, sampling_eps, time_sampler)
    logp, seq = masked_target_log_probs(model, batch, perturbed)
    return per_sequence(t_dce_rows(logp, seq, sigma, dsigma), seq, batch.shape[0])


def t_dce_rows(logp, seq, sigma, dsigma):
    """t_DCE's loss at each masked row: logp, seq [N]; sigma, dsigma [B] -> [N] fp32."""
    e = torch.expm1(sigma)
    return (dsigma / e)[seq] * (torch.log(e)[seq] - logp)


def t_dse(model, batch, noise, t=None, perturbed=None, sampling_eps=1e-3, time_sampler="vdm"):
    """SEDD score entropy with RADD's score log s_v = log p_v - log e, per masked position:

        (log e - log p_i) / e                 negative term (ratio 1/e at the clean token)
      + sum_{v < V-1} exp(log p_v - log e)    positive term
      + (1/e) (log(1/e) - 1)                  constant term,       all times sigma'(t).

    The positive term is taken in closed form: p is normalised over the V-1 real tokens, so
    it equals 1/e exactly and its gradient is identically zero, whether summed or not. This
    keeps the [N, V] probabilities out of the loss (the fused head never forms them).
    """
    sigma, dsigma, perturbed = _time_perturb(batch, model.mask_id, noise, t, perturbed, sampling_eps, time_sampler)
    logp, seq = masked_target_log_probs(model, batch, perturbed)
    return per_sequence(t_dse_rows(logp, seq, sigma, dsigma), seq, batch.shape[0])


def t_dse_rows(logp, seq, sigma, dsigma):
    """t_DSE's loss at each masked row: logp, seq [N]; sigma, dsigma [B] -> [N] fp32."""
    e = torch.expm1(sigma)[seq]
    log_e = torch.log(e)
    neg = (log_e - logp) / e
    pos = 1 / e
    const = (1 / e) * (-log_e - 1)
    return dsigma[seq] * (neg + pos + const)


def lambda_dce(model, batch, noise=None, lam=None, perturbed=None, time_sampler="decoupled"):
    """-sum_{i in M} log p_i / lam, each token masked w.p. lam; float64 as published."""
    if lam is None:
        lam = get_time_sampler(time_sampler)(batch.shape[0], batch.device)
    if perturbed is None:
        perturbed = mask_with_prob(batch, lam, model.mask_id)
    logp, seq = masked_target_log_probs(model, batch, perturbed)
    return per_sequence(lambda_dce_rows(logp, seq, lam), seq, batch.shape[0])


def lambda_dce_rows(logp, seq, lam):
    """lambda_DCE's loss at each masked row: logp, seq [N]; lam [B] -> [N] float64 (as published)."""
    return -logp.double() / lam.double()[seq]


def k_dce(model, batch, noise=None, k=None, perturbed=None):
    """Any-order AR: k ~ U{1..L}, exactly k positions masked; -sum_{i in M} log p_i * L / k.

    Given ``perturbed`` without ``k``, k is its number of MASK tokens per sequence.
    """
    B, L = batch.shape
    if perturbed is None:
        if k is None:
            k = torch.randint(1, L + 1, (B,), device=batch.device)
        perturbed = mask_k_random(batch, k, model.mask_id)
    elif k is None:
        k = (perturbed == model.mask_id).sum(-1)
    logp, seq = masked_target_log_probs(model, batch, perturbed)
    return per_sequence(k_dce_rows(logp, seq, k, L), seq, B)


def k_dce_rows(logp, seq, k, length: int):
    """k_DCE's loss at each masked row: logp, seq [N]; k [B] masked counts -> [N] fp32 (weight L / k)."""
    return -logp * (length / k.float())[seq]


# -- the rows at a static-row plan (losses/static_rows.py, each entry's ``StaticRowForm.rows``) -----------------------
# rows(logp [C], seq [C], rate [B], counts [B], length, noise) -> [C]: the formulas above, given the plan's
# per-sequence rate (t, lam or k) and masked counts instead of the eager losses' own draws.
def t_dse_plan_rows(logp, seq, rate, counts, length: int, noise):
    sigma, dsigma = noise(rate)
    return t_dse_rows(logp, seq, sigma, dsigma)


def t_dce_plan_rows(logp, seq, rate, counts, length: int, noise):
    sigma, dsigma = noise(rate)
    return t_dce_rows(logp, seq, sigma, dsigma)


def lambda_dce_plan_rows(logp, seq, rate, counts, length: int, noise):
    return lambda_dce_rows(logp, seq, rate)


def k_dce_plan_rows(logp, seq, rate, counts, length: int, noise):
    return k_dce_rows(logp, seq, counts, length)
