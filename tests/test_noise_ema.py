"""Noise schedules (spec 3) and EMA (spec 6.3)."""
import math

import pytest
import torch

from radd_fast import ExponentialMovingAverage, GeometricNoise, LogLinearNoise, NoiseConfig, get_noise


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


def test_ema_follows_published_update_rule():
    p = torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    ema = ExponentialMovingAverage([p, frozen], decay=0.9)
    assert len(ema.shadow_params) == 1  # only trainable parameters are tracked
    expected = torch.zeros(3)
    for n in range(1, 6):
        with torch.no_grad():
            p.add_(1.0)
        ema.update([p, frozen])
        d = min(0.9, (1 + n) / (10 + n))
        expected -= (1 - d) * (expected - p.detach())
        assert torch.allclose(ema.shadow_params[0], expected)
    state = ema.state_dict()
    assert set(state) == {"decay", "num_updates", "shadow_params"} and state["num_updates"] == 5
    other = ExponentialMovingAverage([p], decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and torch.equal(other.shadow_params[0], ema.shadow_params[0])
    with ema.average_parameters([p]):
        assert torch.equal(p.detach(), expected)
    assert torch.equal(p.detach(), torch.full((3,), 5.0))
    with pytest.raises(ValueError, match="trainable"):
        other.load_state_dict({"decay": 0.9, "num_updates": 1, "shadow_params": []})
