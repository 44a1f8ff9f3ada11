"""The diffusion losses t_DSE, t_DCE, lambda_DCE and k_DCE (radd_fast/losses/dce.py, docs/LOSSES.md).

Each against a direct implementation of the published formulas on the full ``model(x)`` log-probs,
on the same perturbed batch (same RNG), values and gradients; expectation checks against the exact
any-order NLL. Then every loss parameter at a non-default value, against a closed form: a fresh RADD
has a zero output layer, so -log p = log(V-1) at every masked token, whatever the input. The losses
then have closed forms in the time t (or rate lambda, or k) and the number of masked tokens n of
each sequence; the tests record what the loss fed the model (the perturbed batch) and what it asked
the schedule (t), and check the value, the range of t and the masking.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from radd_fast import LogLinearNoise
from radd_fast.losses import ar_random, get_loss_fn, k_dce, lambda_dce, t_dce, t_dse
from radd_fast.losses.time_samplers import decoupled, vdm
from tests.support.compare import assert_close
from tests.support.gradients import compare
from tests.support.models import LOSS_TOKENS, loss_model, zero_head_model

EPS = 1e-3


# ---- the published formulas, written directly on the full [B, L, V] log-probs --------------------------------
def direct(loss_type, model, batch, perturbed, noise=None, t=None, lam=None, k=None):
    logp_all = model(perturbed)  # [B, L, V] published layout
    logp = logp_all.gather(-1, batch[..., None]).squeeze(-1)  # [B, L]
    M = perturbed == model.mask_id
    L = batch.shape[1]
    if loss_type in ("t_DCE", "t_DSE"):
        sigma, dsigma = noise(t)
        e = torch.expm1(sigma)[:, None]
        per_pos = (torch.log(e) - logp) / e
        if loss_type == "t_DSE":
            pos = torch.exp(logp_all[..., :-1] - torch.log(e)[..., None]).sum(-1)
            per_pos = per_pos + pos + (1 / e) * (torch.log(1 / e) - 1)
        return dsigma * torch.where(M, per_pos, 0).sum(-1)
    if loss_type == "lambda_DCE":
        return -torch.where(M, logp.double(), 0).sum(-1) / lam.double()
    if loss_type == "k_DCE":
        return -torch.where(M, logp, 0).sum(-1) * L / k.float()
    raise AssertionError(loss_type)


def draw_like_the_loss(loss_type, batch, mask_id, noise):
    """Replay the loss's random draws in the documented order: sampler, then masking."""
    B, L = batch.shape
    if loss_type in ("t_DCE", "t_DSE"):
        t = (1 - EPS) * vdm(B, batch.device) + EPS
        move = torch.rand(batch.shape) < -torch.expm1(-noise(t)[0])[:, None]
        return dict(t=t), torch.where(move, mask_id, batch)
    if loss_type == "lambda_DCE":
        lam = decoupled(B, batch.device)
        move = torch.rand(batch.shape) < lam[:, None]
        return dict(lam=lam), torch.where(move, mask_id, batch)
    k = torch.randint(1, L + 1, (B,))
    rank = torch.rand(batch.shape).argsort(-1).argsort(-1)
    return dict(k=k), torch.where(rank < k[:, None], mask_id, batch)


DCE_TYPES = ["t_DSE", "t_DCE", "lambda_DCE", "k_DCE"]


@pytest.mark.parametrize("loss_type", DCE_TYPES)
@pytest.mark.parametrize("B,L", [(1, 1), (3, 7), (4, 16)])
def test_loss_matches_published_formula_same_rng(loss_type, B, L):
    model, noise = loss_model(), LogLinearNoise(EPS)
    batch = torch.randint(0, LOSS_TOKENS, (B, L))
    loss_fn = get_loss_fn(noise, model.vocab_size, train=True, sampling_eps=EPS, loss_type=loss_type)
    torch.manual_seed(123)
    value = loss_fn(model, batch)
    torch.manual_seed(123)
    draws, perturbed = draw_like_the_loss(loss_type, batch, model.mask_id, noise)
    assert value.shape == (B,)
    compare(model, value, direct(loss_type, model, batch, perturbed, noise, **draws), loss_type)


@pytest.mark.parametrize("fn,name", [(t_dse, "t_DSE"), (t_dce, "t_DCE")])
def test_t_losses_on_fixed_perturbed_batch(fn, name):
    """Heavy masking, light masking and no masking at all (loss exactly 0, graph intact)."""
    model, noise = loss_model(), LogLinearNoise(EPS)
    batch = torch.randint(0, LOSS_TOKENS, (3, 9))
    t = torch.tensor([0.97, 0.05, 0.5])
    perturbed = batch.clone()
    perturbed[0, :8] = model.mask_id
    perturbed[1, 4] = model.mask_id
    value = fn(model, batch, noise, t=t, perturbed=perturbed)
    assert value[2] == 0
    compare(model, value, direct(name, model, batch, perturbed, noise, t=t), name)


def test_lambda_and_k_on_fixed_perturbed_batch():
    model = loss_model()
    batch = torch.randint(0, LOSS_TOKENS, (2, 13))
    perturbed = torch.where(torch.rand(2, 13) < 0.6, model.mask_id, batch)
    lam = torch.tensor([0.6, 0.3])
    compare(model, lambda_dce(model, batch, lam=lam, perturbed=perturbed),
            direct("lambda_DCE", model, batch, perturbed, lam=lam), "lambda_DCE")
    k = (perturbed == model.mask_id).sum(-1)
    compare(model, k_dce(model, batch, perturbed=perturbed), direct("k_DCE", model, batch, perturbed, k=k), "k_DCE")


def exact_any_order_nll(model, x):
    """E over orders of the AR NLL of x [L], by enumerating every masked subset S (one pass each):
    sum_S sum_{j in S} -log p(x_j | x_{S^c}) / (|S| C(L, |S|))."""
    L = x.shape[0]
    subsets = torch.tensor(list(itertools.product([0, 1], repeat=L))[1:], dtype=torch.bool)  # [2^L - 1, L]
    perturbed = torch.where(subsets, model.mask_id, x)
    with torch.no_grad():
        logp = model(perturbed).gather(-1, x.expand_as(perturbed)[..., None]).squeeze(-1).double()
    k = subsets.sum(-1)
    weight = 1.0 / (k * torch.tensor([math.comb(L, int(j)) for j in k]))
    return (weight * -torch.where(subsets, logp, 0).sum(-1)).sum().item()


def test_losses_agree_in_expectation_with_exact_any_order_nll():
    """lambda_DCE, k_DCE, t_DCE, t_DSE are unbiased for E_order[ar NLL] (t-losses up to the
    eps = 1e-3 truncation); ar_random averaged over every order equals it exactly."""
    model, noise = loss_model(tokens=5, length=5), LogLinearNoise(EPS)
    x = torch.tensor([3, 0, 4, 4, 1])
    exact = exact_any_order_nll(model, x)
    perms = torch.tensor(list(itertools.permutations(range(5))))  # [120, 5]
    with torch.no_grad():
        all_orders = ar_random(model, x.expand(120, 5), order=perms).double().mean().item()
    assert abs(all_orders - exact) < 1e-5 * exact
    batch = x.expand(4096, 5)
    torch.manual_seed(0)
    for loss_type in ("lambda_DCE", "k_DCE", "t_DCE", "t_DSE"):
        with torch.no_grad():
            est = get_loss_fn(noise, model.vocab_size, train=False, loss_type=loss_type)(model, batch).double()
        se = est.std().item() / math.sqrt(est.numel())
        assert abs(est.mean().item() - exact) < 5 * se + 2e-3 * exact, \
            f"{loss_type}: mean {est.mean().item():.4f} +- {se:.4f}, exact {exact:.4f}"


def test_sequence_length_comes_from_the_batch():
    """A model with length 16 scores L = 5 batches with L / k weights for L = 5, not 1024."""
    model = loss_model()
    batch = torch.randint(0, LOSS_TOKENS, (2, 5))
    perturbed = torch.full_like(batch, model.mask_id)  # k = L: weight 1
    value = k_dce(model, batch, perturbed=perturbed)
    assert_close(value, direct("k_DCE", model, batch, perturbed, k=torch.tensor([5, 5])), rtol=1e-5)


# ---- closed forms under a zero output layer ------------------------------------------------------------------
N_REAL = 6
V = N_REAL + 1
MASK = N_REAL
B, L = 8, 12
LOG_V1 = math.log(N_REAL)  # -log p at every masked token under the zero head


@pytest.fixture(scope="module")
def model():
    return zero_head_model(N_REAL)


@pytest.fixture
def batch():
    return torch.randint(0, N_REAL, (B, L), generator=torch.Generator().manual_seed(1))


class Recorder:
    """Wraps a model's ``hidden`` (the perturbed batch) and a schedule (the times it is asked)."""

    def __init__(self, model, noise):
        self.model, self.noise = model, noise
        self.perturbed, self.times = [], []
        real = model.hidden

        def hidden(x, *args, **kwargs):
            self.perturbed.append(x.clone())
            return real(x, *args, **kwargs)

        model.hidden = hidden  # an instance attribute: undone in close()

    def schedule(self, t):
        self.times.append(t.clone())
        return self.noise(t)

    def close(self):
        del self.model.hidden

    @property
    def n_masked(self) -> torch.Tensor:
        return (self.perturbed[-1] == MASK).sum(-1).double()


@pytest.fixture
def recorder(model):
    rec = Recorder(model, LogLinearNoise(1e-3))
    yield rec
    rec.close()


def loglinear(t: float, eps: float = 1e-3) -> tuple[float, float]:
    """sigma(t) = -log(1 - (1 - eps) t), sigma'(t) = (1 - eps) / (1 - (1 - eps) t)."""
    return -math.log(1 - (1 - eps) * t), (1 - eps) / (1 - (1 - eps) * t)


def t_dce_per_token(t: float) -> float:
    sigma, dsigma = loglinear(t)
    e = math.expm1(sigma)
    return dsigma / e * (math.log(e) + LOG_V1)


def t_dse_per_token(t: float) -> float:
    """neg + pos + const with log p = -log(V-1): (log e + log(V-1))/e + 1/e + (1/e)(-log e - 1)."""
    sigma, dsigma = loglinear(t)
    e = math.expm1(sigma)
    return dsigma * LOG_V1 / e


def expected(per_token, times: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return torch.tensor([per_token(float(t)) for t in times], dtype=torch.float64) * n


# ---- given t and perturbed -----------------------------------------------------------------------------------
@pytest.mark.parametrize("loss,per_token", [(t_dce, t_dce_per_token), (t_dse, t_dse_per_token)])
def test_t_losses_at_given_t_and_perturbed(model, batch, loss, per_token):
    t = torch.tensor([0.05, 0.2, 0.35, 0.5, 0.62, 0.8, 0.9, 0.99])
    perturbed = batch.clone()
    for j in range(B):
        perturbed[j, : j + 1] = MASK  # sequence j: j + 1 masked tokens
    n = torch.arange(1, B + 1, dtype=torch.float64)
    out = loss(model, batch, LogLinearNoise(1e-3), t=t, perturbed=perturbed)
    torch.testing.assert_close(out.double(), expected(per_token, t, n), rtol=2e-5, atol=1e-6)


def test_lambda_and_k_at_given_rate_and_perturbed(model, batch):
    perturbed = batch.clone()
    perturbed[:, ::3] = MASK  # 4 masked per sequence
    lam = torch.linspace(0.1, 0.9, B)
    out = lambda_dce(model, batch, lam=lam, perturbed=perturbed)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, 4 * LOG_V1 / lam.double(), rtol=1e-6, atol=0)
    # k given with perturbed: the given k weights the rows, not the count of MASK tokens
    k = torch.arange(1, B + 1)
    torch.testing.assert_close(k_dce(model, batch, k=k, perturbed=perturbed).double(),
                               4 * LOG_V1 * L / k.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(k_dce(model, batch, perturbed=perturbed).double(),
                               torch.full((B,), L * LOG_V1, dtype=torch.float64), rtol=1e-5, atol=0)


# ---- drawn t: sampling_eps and time_sampler ------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,per_token", [("t_DCE", t_dce_per_token), ("t_DSE", t_dse_per_token)])
@pytest.mark.parametrize("sampling_eps", [0.0, 0.4, 0.9])
@pytest.mark.parametrize("time_sampler", ["vdm", "naive", "decoupled"])
def test_t_losses_draw_t_in_eps_1_with_their_sampler(model, batch, recorder, loss_type, per_token, sampling_eps,
                                                     time_sampler):
    fn = get_loss_fn(recorder.schedule, V, train=False, sampling_eps=sampling_eps, loss_type=loss_type,
                     time_sampler=time_sampler)
    out = fn(model, batch)
    t = recorder.times[-1].double()
    assert t.shape == (B,) and bool((t >= sampling_eps).all()) and bool((t <= 1).all())
    u = ((t - sampling_eps) / (1 - sampling_eps)).sort().values  # the sampler's draw in [0, 1)
    if time_sampler == "vdm":  # one u0, then steps of 1/B (mod 1)
        gaps = (u[1:] - u[:-1]).tolist()
        assert all(abs(g - 1 / B) < 1e-5 for g in gaps), gaps
    if time_sampler == "decoupled":  # sequence j in [j/B, (j+1)/B)
        raw = (t - sampling_eps) / (1 - sampling_eps)
        assert bool(((raw * B).floor() == torch.arange(B, dtype=torch.float64)).all()), raw.tolist()
    torch.testing.assert_close(out.double(), expected(per_token, t, recorder.n_masked), rtol=2e-5, atol=1e-5)
    # masking rate (1 - eps_noise) t over the batch: binomial, 5 standard errors
    p = 1 - torch.exp(-recorder.noise(t.float())[0]).double()
    n_exp, var = float(p.sum() * L), float((p * (1 - p)).sum() * L)
    assert abs(float(recorder.n_masked.sum()) - n_exp) < 5 * math.sqrt(var) + 1


def test_sampling_eps_near_one_masks_almost_everything(model, batch, recorder):
    """t in [0.999, 1]: every sequence is almost fully masked (default eps 1e-3 would not be)."""
    fn = get_loss_fn(recorder.schedule, V, train=False, sampling_eps=0.999, loss_type="t_DCE")
    torch.manual_seed(3)
    fn(model, torch.randint(0, N_REAL, (64, 16)))
    assert float(recorder.n_masked.mean()) > 15.5


@pytest.mark.parametrize("time_sampler", ["decoupled", "vdm", "naive"])
def test_lambda_dce_draws_lambda_with_its_sampler(model, batch, recorder, time_sampler):
    """lambda_j = n_j log(V-1) / loss_j: recover the rates and check the sampler's pattern."""
    fn = get_loss_fn(None, V, train=False, loss_type="lambda_DCE", time_sampler=time_sampler)
    torch.manual_seed(5)
    big = torch.randint(0, N_REAL, (B, 16))
    out = fn(model, big)
    n = recorder.n_masked
    has = n > 0
    lam = n[has] * LOG_V1 / out[has]
    assert bool((lam > 0).all()) and bool((lam < 1).all())
    if time_sampler == "decoupled":
        assert bool(((lam * B).floor() == torch.arange(B, dtype=torch.float64)[has]).all()), lam.tolist()
    if time_sampler == "vdm":
        u = lam.sort().values
        steps = ((u[1:] - u[:-1]) * B).tolist()  # multiples of 1/B
        assert all(abs(s - round(s)) < 1e-4 for s in steps), steps
    assert bool((out[~has] == 0).all())


def test_k_dce_draws_k_in_1_to_L_and_masks_exactly_k(model, recorder):
    torch.manual_seed(2)
    batch = torch.randint(0, N_REAL, (200, 5))
    out = k_dce(model, batch)
    n = recorder.n_masked
    assert int(n.min()) >= 1 and int(n.max()) == 5 and set(n.long().tolist()) == {1, 2, 3, 4, 5}
    torch.testing.assert_close(out.double(), torch.full((200,), 5 * LOG_V1, dtype=torch.float64), rtol=1e-5, atol=0)
    fixed_k = torch.tensor([2] * 200)
    k_dce(model, batch, k=fixed_k)
    assert bool((recorder.n_masked == 2).all())


@pytest.mark.parametrize("loss,per_token", [(t_dce, t_dce_per_token), (t_dse, t_dse_per_token)])
def test_t_losses_defaults_are_eps_1e3_and_vdm(model, batch, recorder, loss, per_token):
    """Called directly (not through get_loss_fn): t = 1e-3 + (1 - 1e-3) u, u stratified (vdm)."""
    out = loss(model, batch, recorder.schedule)
    t = recorder.times[-1].double()
    assert bool((t >= 1e-3).all()) and bool((t <= 1).all())
    u = ((t - 1e-3) / (1 - 1e-3)).sort().values
    assert all(abs(g - 1 / B) < 1e-5 for g in (u[1:] - u[:-1]).tolist())
    torch.testing.assert_close(out.double(), expected(per_token, t, recorder.n_masked), rtol=2e-5, atol=1e-5)
