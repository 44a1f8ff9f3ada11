"""Every loss parameter at a non-default value, against a closed form (issue 17).

A fresh RADD has a zero output layer, so -log p = log(V-1) at every masked token, whatever the
input. The losses then have closed forms in the time t (or rate lambda, or k) and the number of
masked tokens n of each sequence; the tests record what the loss fed the model (the perturbed
batch) and what it asked the schedule (t), and check the value, the range of t and the masking.
Noise schedules get the same treatment: sigma(t), sigma'(t) and the move chance written out with
``math``.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from radd_fast import RADD, GeometricNoise, LogLinearNoise, ModelConfig, NoiseConfig, RADDConfig, get_noise
from radd_fast.losses import get_loss_fn, k_dce, lambda_dce, t_dce, t_dse
from radd_fast.losses.masking import mask_k_random, mask_order_suffix, mask_with_prob
from radd_fast.losses.time_samplers import get_time_sampler

N_REAL = 6
V = N_REAL + 1
MASK = N_REAL
B, L = 8, 12
LOG_V1 = math.log(N_REAL)  # -log p at every masked token under the zero head


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = RADD(RADDConfig(tokens=N_REAL, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=16,
                                                          dropout=0.0, name="zero-head"))).eval()
    assert not m.output_layer.linear.weight.detach().any()
    return m


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


# ------------------------------------------------------------------ given t and perturbed
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


# ------------------------------------------------------------------ drawn t: sampling_eps and time_sampler
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


def test_get_loss_fn_checks_and_defaults(model, batch):
    with pytest.raises(ValueError, match=r"sampling_eps must be in \[0, 1\)"):
        get_loss_fn(LogLinearNoise(), V, train=False, sampling_eps=1.0)
    with pytest.raises(ValueError, match="takes no time sampler"):
        get_loss_fn(LogLinearNoise(), V, train=False, loss_type="k_DCE", time_sampler="vdm")
    with pytest.raises(ValueError, match="unknown time sampler 'uniform'"):
        get_loss_fn(LogLinearNoise(), V, train=False, loss_type="t_DCE", time_sampler="uniform")
    fn = get_loss_fn(LogLinearNoise(), V, train=True, loss_type="k_DCE")
    fn(model, batch)
    assert model.training and fn.loss_type == "k_DCE"
    model.eval()


# ------------------------------------------------------------------ masking and time samplers
def test_mask_with_prob_rates_and_extremes():
    torch.manual_seed(0)
    x = torch.zeros(4, 20000, dtype=torch.int64)
    out = mask_with_prob(x, torch.tensor([0.0, 0.25, 0.7, 1.0]), mask_id=9)
    frac = (out == 9).double().mean(-1).tolist()
    assert frac[0] == 0.0 and frac[3] == 1.0
    assert abs(frac[1] - 0.25) < 0.02 and abs(frac[2] - 0.7) < 0.02
    assert bool((out[out != 9] == 0).all())


def test_mask_k_random_and_suffix():
    torch.manual_seed(0)
    x = torch.arange(10).repeat(3, 1)
    out = mask_k_random(x, torch.tensor([0, 3, 10]), mask_id=99)
    assert (out == 99).sum(-1).tolist() == [0, 3, 10]
    assert bool((out[out != 99] == x[out != 99]).all())
    rank = torch.tensor([[2, 0, 1]])
    assert mask_order_suffix(torch.tensor([[5, 6, 7]]), rank, 1, 9).tolist() == [[9, 6, 9]]
    assert mask_order_suffix(torch.tensor([[5, 6, 7]]), rank, 0, 9).tolist() == [[9, 9, 9]]


@pytest.mark.parametrize("name", ["naive", "vdm", "decoupled"])
def test_time_samplers_are_uniform_on_0_1(name):
    torch.manual_seed(0)
    draws = torch.cat([get_time_sampler(name)(16, "cpu") for _ in range(500)])
    assert draws.dtype == torch.float32 and bool((draws >= 0).all()) and bool((draws < 1).all())
    counts = torch.histc(draws, bins=10, min=0, max=1)
    assert bool(((counts - 800).abs() < 5 * math.sqrt(800)).all()), counts.tolist()


# ------------------------------------------------------------------ noise schedules in closed form
@pytest.mark.parametrize("eps", [1e-3, 0.1, 0.5])
def test_loglinear_noise_closed_form(eps):
    noise = LogLinearNoise(eps)
    t = torch.tensor([0.0, 0.25, 0.5, 0.999], dtype=torch.float64)
    sigma, dsigma = noise(t)
    for i, ti in enumerate(t.tolist()):
        s, ds = -math.log(1 - (1 - eps) * ti), (1 - eps) / (1 - (1 - eps) * ti)
        assert sigma[i].item() == pytest.approx(s, rel=1e-12, abs=1e-15)
        assert dsigma[i].item() == pytest.approx(ds, rel=1e-12)
        assert noise.move_chance(t)[i].item() == pytest.approx((1 - eps) * ti, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("smin,smax", [(1e-3, 1.0), (1e-4, 20.0), (0.5, 2.0)])
def test_geometric_noise_closed_form(smin, smax):
    noise = GeometricNoise(smin, smax)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    sigma, dsigma = noise(t)
    for i, ti in enumerate(t.tolist()):
        s = smin ** (1 - ti) * smax ** ti
        assert sigma[i].item() == pytest.approx(s, rel=1e-12)
        assert dsigma[i].item() == pytest.approx(s * math.log(smax / smin), rel=1e-12)
        assert noise.move_chance(t)[i].item() == pytest.approx(1 - math.exp(-s), rel=1e-12)


def test_get_noise_reads_every_config_form():
    assert get_noise({"type": "loglinear", "eps": 0.2, "sigma_min": 1}).eps == 0.2
    geo = get_noise({"type": "geometric", "sigma_min": 0.01, "sigma_max": 7.0, "other": 1})
    assert isinstance(geo, GeometricNoise) and (geo.sigma_min, geo.sigma_max) == (0.01, 7.0)
    assert isinstance(get_noise(NoiseConfig(type="loglinear")), LogLinearNoise)
    cfg = RADDConfig(tokens=4)
    assert isinstance(get_noise(cfg), type(get_noise(cfg.noise)))


@pytest.mark.parametrize("loss,per_token", [(t_dce, t_dce_per_token), (t_dse, t_dse_per_token)])
def test_t_losses_defaults_are_eps_1e3_and_vdm(model, batch, recorder, loss, per_token):
    """Called directly (not through get_loss_fn): t = 1e-3 + (1 - 1e-3) u, u stratified (vdm)."""
    out = loss(model, batch, recorder.schedule)
    t = recorder.times[-1].double()
    assert bool((t >= 1e-3).all()) and bool((t <= 1).all())
    u = ((t - 1e-3) / (1 - 1e-3)).sort().values
    assert all(abs(g - 1 / B) < 1e-5 for g in (u[1:] - u[:-1]).tolist())
    torch.testing.assert_close(out.double(), expected(per_token, t, recorder.n_masked), rtol=2e-5, atol=1e-5)


def test_noise_defaults_and_other_config_forms():
    assert LogLinearNoise().eps == 1e-3
    geo = GeometricNoise()
    assert (geo.sigma_min, geo.sigma_max) == (1e-3, 1.0)
    # a read-only mapping (as a Hydra / OmegaConf section behaves) is read like a dict
    section = types.MappingProxyType({"type": "geometric", "sigma_min": 0.02, "sigma_max": 3.0})
    geo = get_noise(section)
    assert isinstance(geo, GeometricNoise) and (geo.sigma_min, geo.sigma_max) == (0.02, 3.0)
    cfg = NoiseConfig()
    cfg.type = "cosine"  # past validation: the last line of defence still names it
    with pytest.raises(ValueError, match="unknown noise type 'cosine'"):
        get_noise(cfg)


@pytest.mark.parametrize("name", ["naive", "vdm", "decoupled"])
def test_time_samplers_draw_from_the_generator_given(name):
    sampler = get_time_sampler(name)
    a = sampler(8, "cpu", generator=torch.Generator().manual_seed(7))
    torch.manual_seed(99)  # the global generator must not matter
    assert torch.equal(a, sampler(8, "cpu", generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, sampler(8, "cpu", generator=torch.Generator().manual_seed(8)))


def test_vdm_steps_up_by_one_over_b_from_sequence_to_sequence():
    t = get_time_sampler("vdm")(8, "cpu", generator=torch.Generator().manual_seed(0)).double()
    steps = ((t - t[0]) % 1 * 8).tolist()  # sequence j sits j/B above sequence 0 (mod 1)
    assert steps == pytest.approx([float(j) for j in range(8)], abs=1e-4)
