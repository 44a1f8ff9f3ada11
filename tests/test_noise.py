"""Noise schedules (radd_fast/noise.py, spec 3): sigma(t), sigma'(t) and the move chance against the
formulas written out (autograd and ``math``), and every config form get_noise reads."""
from __future__ import annotations

import math
import types

import pytest
import torch

from radd_fast import (
    GeometricNoise,
    LogLinearNoise,
    NoiseConfig,
    RADDConfig,
    get_noise,
)


def test_loglinear_formulas_and_derivative():
    noise = LogLinearNoise(1e-3)
    t = torch.linspace(0.01, 0.99, 11, dtype=torch.float64)
    sigma, dsigma = noise(t)
    assert torch.allclose(sigma, -torch.log1p(-(1 - 1e-3) * t))
    t_req = t.clone().requires_grad_(True)
    noise.total_noise(t_req).sum().backward()
    assert torch.allclose(t_req.grad, dsigma)
    assert torch.allclose(noise.move_chance(t), (1 - 1e-3) * t)  # masked fraction is linear in t


def test_geometric_formulas_and_derivative():
    noise = get_noise(NoiseConfig(type="geometric", sigma_min=1e-4, sigma_max=20.0))
    assert isinstance(noise, GeometricNoise)
    t = torch.linspace(0, 1, 7, dtype=torch.float64, requires_grad=True)
    sigma, dsigma = noise(t)
    assert math.isclose(sigma[0].item(), 1e-4) and math.isclose(sigma[-1].item(), 20.0)
    sigma.sum().backward()
    assert torch.allclose(t.grad, dsigma.detach())


def test_get_noise_from_published_dict():
    assert isinstance(get_noise({"noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20}}["noise"]),
                      LogLinearNoise)


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
