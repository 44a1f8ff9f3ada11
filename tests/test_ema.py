"""The exponential moving average of the weights (radd_fast/ema.py, spec 6.3): the published update rule
and its decay schedule in closed form, the swaps in and out, the state round trip and its errors."""
from __future__ import annotations

import math

import pytest
import torch

from radd_fast import (
    ExponentialMovingAverage,
)


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


def test_ema_update_closed_form_and_swaps():
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    frozen = torch.nn.Parameter(torch.tensor([7.0]), requires_grad=False)
    ema = ExponentialMovingAverage([p, frozen], decay=0.5)
    assert len(ema.shadow_params) == 1  # only trainable parameters are averaged
    shadow = torch.tensor([0.0, 10.0])
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        ema.update([p, frozen])
        decay = min(0.5, (1 + n) / (10 + n))
        shadow = shadow - (1 - decay) * (shadow - value)
        torch.testing.assert_close(ema.shadow_params[0], shadow, rtol=1e-6, atol=1e-6)
    assert ema.num_updates == 5
    with torch.no_grad():
        p.copy_(torch.tensor([-1.0, -2.0]))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.average_parameters([p]):
            torch.testing.assert_close(p.detach(), shadow)
            raise RuntimeError("boom")
    torch.testing.assert_close(p.detach(), torch.tensor([-1.0, -2.0]))  # restored after the error
    ema.copy_to([p, frozen])
    torch.testing.assert_close(p.detach(), shadow)
    assert frozen.item() == 7.0


def test_ema_decay_schedule_caps_at_the_configured_decay():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = ExponentialMovingAverage([p], decay=0.9999)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])  # n = 1: decay (1 + 1) / (10 + 1) = 2/11
    assert ema.shadow_params[0].item() == pytest.approx(1 - 2 / 11, rel=1e-6)
    full = ExponentialMovingAverage([p], decay=1.0)
    for _ in range(3):
        full.update([p])
    assert full.shadow_params[0].item() == pytest.approx(1.0)  # (1+n)/(10+n) < 1 still moves it
    still = ExponentialMovingAverage([torch.nn.Parameter(torch.zeros(1))], decay=0.0)
    still.update([p])
    assert still.shadow_params[0].item() == 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\]"):
            ExponentialMovingAverage([p], decay=bad)


def test_ema_state_round_trip_and_errors():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = ExponentialMovingAverage([p], decay=0.75)
    ema.update([p])
    state = ema.state_dict()
    assert set(state) == {"decay", "num_updates", "shadow_params"} and state["num_updates"] == 1
    other = ExponentialMovingAverage([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], decay=0.1)
    other.load_state_dict({"decay": 0.75, "num_updates": 4, "shadow_params": [torch.tensor([5.0, 6.0])]})
    assert other.decay == 0.75 and other.num_updates == 4
    assert other.shadow_params[0].dtype == torch.float64 and other.shadow_params[0].tolist() == [5.0, 6.0]
    for key in ("decay", "num_updates", "shadow_params"):
        broken = {k: v for k, v in state.items() if k != key}
        with pytest.raises(KeyError, match=f"EMA state has no '{key}'"):
            ema.load_state_dict(broken)
    with pytest.raises(ValueError, match="EMA state holds 2 tensors, the model has 1 trainable parameters"):
        ema.load_state_dict({**state, "shadow_params": [torch.zeros(2), torch.zeros(2)]})
    assert math.isfinite(ema.shadow_params[0].sum().item())


def test_ema_restore_before_any_store_leaves_the_weights():
    p = torch.nn.Parameter(torch.tensor([3.0]))
    ema = ExponentialMovingAverage([p], decay=0.5)
    ema.restore([p])  # nothing stored yet: a no-op, not an error
    assert p.item() == 3.0
