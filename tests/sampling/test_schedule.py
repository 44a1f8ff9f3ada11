"""The reveal schedule (radd_fast/sampling/schedule.py): update rates, step distribution, reveal steps,
E-NFE, ordered groups and the method table.

Rates are checked against closed forms written here with ``math``, the reveal draws against the
step distribution (chi-square) and degenerate schedules that pin every draw, E-NFE against theory
and small exact cases.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radd_fast import GeometricNoise, LogLinearNoise
from radd_fast.sampling import schedule
from radd_fast.sampling.schedule import (
    draw_reveal_steps,
    expected_enfe,
    expected_enfe_exact,
    group_steps,
    ordered_groups,
    step_distribution,
    update_rates,
)
from tests.support.stats import ALPHA, chi2_sf
from tests.support.uniform_head import assert_rate


@pytest.mark.parametrize("method", ["tweedie", "euler"])
def test_loglinear_rates_are_dt_over_t(method):
    steps, eps = 50, 1e-5
    rates = update_rates(LogLinearNoise(), steps, method, eps)
    t = torch.linspace(1, eps, steps + 1, dtype=torch.float64)[:-1]
    expected = (1 - eps) / steps / t
    expected[-1] = 1.0
    torch.testing.assert_close(rates, expected, rtol=1e-9, atol=1e-12)
    p = step_distribution(rates)
    assert abs(float(p.sum()) - 1) < 1e-12
    torch.testing.assert_close(p[:-1], torch.full((steps - 1,), (1 - eps) / steps, dtype=torch.float64))


@pytest.mark.parametrize("method", ["tweedie", "euler"])
@pytest.mark.parametrize("steps", [1, 3, 64])
def test_geometric_rates_are_probabilities(method, steps):
    rates = update_rates(GeometricNoise(1e-4, 20.0), steps, method)
    assert rates.shape == (steps,) and rates.dtype == torch.float64
    assert bool(((rates >= 0) & (rates <= 1)).all()) and rates[-1] == 1


def test_reveal_steps_follow_the_step_distribution():
    rates = update_rates(GeometricNoise(1e-3, 5.0), 12, "tweedie")
    free = torch.ones(4000, 16, dtype=torch.bool)
    free[:, :3] = False
    step = draw_reveal_steps(rates, free, torch.Generator().manual_seed(0))
    assert bool((step[:, :3] == -1).all()) and int(step[:, 3:].min()) >= 0 and int(step.max()) <= 11
    counts = torch.bincount(step[:, 3:].flatten(), minlength=12).double()
    expected = step_distribution(rates) * counts.sum()
    stat = float(((counts - expected) ** 2 / expected.clamp_min(1e-9)).sum())
    assert chi2_sf(stat, 11) > ALPHA


def test_group_steps_ranks_distinct_steps():
    step = torch.tensor([[5, -1, 2, 5, 9], [-1, -1, -1, -1, -1], [0, 0, 0, 0, 0], [4, 3, 2, 1, 0]])
    group, K = group_steps(step)
    assert group.tolist() == [[1, -1, 0, 1, 2], [-1] * 5, [0] * 5, [4, 3, 2, 1, 0]]
    assert K.tolist() == [3, 0, 1, 5]


@pytest.mark.parametrize("steps,length", [(64, 64), (128, 32), (16, 100), (1, 7)])
def test_enfe_matches_theory(steps, length):
    """E-NFE per row = distinct reveal steps; mean N (1 - (1 - 1/N)^L) for loglinear (docs/SAMPLING.md)."""
    R = 20000
    rates = update_rates(LogLinearNoise(), steps, "tweedie", eps=1e-5)
    _, K = group_steps(draw_reveal_steps(rates, torch.ones(R, length, dtype=torch.bool), torch.Generator().manual_seed(1)))
    mean, sd = K.double().mean().item(), K.double().std().item()
    theory = expected_enfe(steps, length)
    assert abs(expected_enfe_exact(rates, length) - theory) < 1e-3
    assert abs(mean - theory) <= 4 * sd / R**0.5 + 1e-9, (mean, theory, sd)


def test_ordered_groups_cover_free_positions_in_order():
    free = torch.ones(3, 6, dtype=torch.bool)
    free[1, 2] = False
    order = torch.tensor([5, 2, 0, 1, 4, 3])
    group, K = ordered_groups(free, steps=100, order=order)
    assert group[0].tolist() == [2, 3, 1, 5, 4, 0] and K.tolist() == [6, 5, 6]
    assert group[1].tolist() == [1, 2, -1, 4, 3, 0]
    chunks, K = ordered_groups(free, steps=2, order=order)
    assert K.tolist() == [2, 2, 2] and chunks[0].tolist() == [0, 1, 0, 1, 1, 0]
    rand, K = ordered_groups(free, steps=6, generator=torch.Generator().manual_seed(0))
    assert sorted(rand[0].tolist()) == list(range(6)) and sorted(rand[1].tolist()) == [-1, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="permutation"):
        ordered_groups(free, 6, order=torch.tensor([0, 0, 1, 2, 3, 4]))


# ---- rates in closed form, small exact cases ---------------------------------------------------------------------
def geometric_rate_oracle(method: str, steps: int, eps: float, smin: float, smax: float) -> list[float]:
    """Per-step reveal probabilities for sigma(t) = smin^(1-t) smax^t, written with math only."""
    dt = (1 - eps) / steps
    out = []
    for i in range(steps):
        t = 1 - i * (1 - eps) / steps
        sigma = smin ** (1 - t) * smax ** t
        if method == "tweedie":
            s_next = smin ** (1 - (t - dt)) * smax ** (t - dt)
            rate = (math.exp(-s_next) - math.exp(-sigma)) / (1 - math.exp(-sigma))
        else:
            dsigma = sigma * math.log(smax / smin)
            rate = dt * dsigma * math.exp(-sigma) / (1 - math.exp(-sigma))
        out.append(min(max(rate, 0.0), 1.0))
    out[-1] = 1.0
    return out


@pytest.mark.parametrize("method", ["tweedie", "euler"])
@pytest.mark.parametrize("steps,eps", [(7, 1e-5), (40, 1e-2), (2, 0.3)])
def test_geometric_rates_match_their_closed_form(method, steps, eps):
    rates = schedule.update_rates(GeometricNoise(0.05, 6.0), steps, method, eps)
    assert rates.dtype == torch.float64 and rates.shape == (steps,)
    expected = torch.tensor(geometric_rate_oracle(method, steps, eps, 0.05, 6.0), dtype=torch.float64)
    torch.testing.assert_close(rates, expected, rtol=1e-10, atol=1e-12)


def test_euler_rate_is_clamped_to_one_with_few_steps():
    rates = schedule.update_rates(GeometricNoise(1e-3, 50.0), 2, "euler")
    raw = geometric_rate_oracle("euler", 2, 1e-5, 1e-3, 50.0)
    assert rates.tolist() == raw and rates.max() == 1.0


@pytest.mark.parametrize("eps", [1e-5, 0.2])
def test_loglinear_step_distribution_is_dt_then_the_rest(eps):
    """Loglinear: rate_i = dt / t_i, so P(step i) = dt for i < N-1 and P(last) = dt + eps(1 - 1/N)... in closed form."""
    steps = 9
    rates = schedule.update_rates(LogLinearNoise(), steps, "tweedie", eps)
    dt = (1 - eps) / steps
    t = [1 - i * dt for i in range(steps)]
    torch.testing.assert_close(rates[:-1], torch.tensor([dt / ti for ti in t[:-1]], dtype=torch.float64), rtol=1e-9, atol=0)
    p = schedule.step_distribution(rates)
    torch.testing.assert_close(p, torch.tensor([dt] * (steps - 1) + [t[-1]], dtype=torch.float64), rtol=1e-9, atol=1e-15)


def test_step_distribution_closed_form():
    rates = torch.tensor([0.5, 0.25, 0.0, 1.0], dtype=torch.float64)
    assert schedule.step_distribution(rates).tolist() == [0.5, 0.125, 0.0, 0.375]


def test_draw_reveal_steps_inverts_the_cdf():
    """u < cdf[0] -> step 0, cdf[i-1] <= u < cdf[i] -> step i: a degenerate schedule pins every draw."""
    rates = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # every token revealed at step 2
    free = torch.tensor([[True, False, True], [False, True, True]])
    step = schedule.draw_reveal_steps(rates, free, torch.Generator().manual_seed(0))
    assert step.tolist() == [[2, -1, 2], [-1, 2, 2]] and step.dtype == torch.int64
    first = schedule.draw_reveal_steps(torch.tensor([1.0, 1.0], dtype=torch.float64), torch.ones(50, 4, dtype=torch.bool))
    assert bool((first == 0).all())
    free = torch.ones(6000, 4, dtype=torch.bool)
    step = schedule.draw_reveal_steps(torch.tensor([0.25, 0.0, 1.0], dtype=torch.float64), free, torch.Generator().manual_seed(1))
    assert set(step.unique().tolist()) == {0, 2}
    assert_rate(step == 0, 0.25, "P(step 0)")


def test_ordered_groups_chunks_in_closed_form():
    """n free positions, K = min(steps, n) chunks: the j-th position of the order goes to chunk j K // n."""
    free = torch.ones(2, 6, dtype=torch.bool)
    free[1, 2] = False
    order = torch.tensor([5, 4, 3, 2, 1, 0])
    group, K = schedule.ordered_groups(free, steps=3, order=order)
    assert group.dtype == torch.int32 and K.tolist() == [3, 3]
    assert group[0].tolist() == [(5 - p) * 3 // 6 for p in range(6)]
    ranks = {5: 0, 4: 1, 3: 2, 1: 3, 0: 4}  # position -> place in the order, position 2 fixed
    assert group[1].tolist() == [ranks[p] * 3 // 5 if p in ranks else -1 for p in range(6)]
    shared, _ = schedule.ordered_groups(torch.ones(5, 6, dtype=torch.bool), 6, generator=torch.Generator().manual_seed(0),
                               shared=True)
    assert all(torch.equal(shared[0], row) for row in shared)
    own, _ = schedule.ordered_groups(torch.ones(50, 6, dtype=torch.bool), 6, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in own}) > 25  # a permutation per row
    none_free, K0 = schedule.ordered_groups(torch.zeros(2, 3, dtype=torch.bool), 4)
    assert none_free.tolist() == [[-1] * 3] * 2 and K0.tolist() == [0, 0]


def test_expected_enfe_closed_forms():
    assert schedule.expected_enfe(4, 2) == pytest.approx(4 * (1 - 0.75 ** 2))
    assert schedule.expected_enfe(1, 10) == 1.0
    rates = torch.tensor([0.5, 1.0], dtype=torch.float64)  # P = [0.5, 0.5]
    assert schedule.expected_enfe_exact(rates, 3) == pytest.approx(2 * (1 - 0.5 ** 3))
    values = schedule.expected_enfe_exact(rates, np.array([1, 3, 0]))  # one row length each
    assert isinstance(values, np.ndarray) and values.tolist() == pytest.approx([1.0, 1.75, 0.0])
    assert isinstance(schedule.expected_enfe_exact(rates, 1), float)
    group, K = schedule.group_steps(torch.zeros(0, 4, dtype=torch.int64))
    assert group.shape == (0, 4) and K.shape == (0,) and group.dtype == torch.int32
    group, K = schedule.group_steps(torch.tensor([[3]]))  # one token: its own group
    assert group.tolist() == [[0]] and K.tolist() == [1]
    group, K = schedule.group_steps(torch.tensor([[7, -1, 7, 2]]))
    assert group.dtype == torch.int32 and group.tolist() == [[1, -1, 1, 0]] and K.tolist() == [2]


def test_method_table_and_checks():
    assert list(schedule.METHOD_SPECS) == ["tweedie", "euler", "ordered"]
    assert schedule.METHOD_SPECS["tweedie"].needs_noise and not schedule.METHOD_SPECS["ordered"].needs_noise
    assert schedule.check_method("euler") == "euler"
    with pytest.raises(ValueError, match=r"unknown sampling method 'analytic'; expected one of"):
        schedule.check_method("analytic")
    assert schedule.check_steps(3) == 3 and schedule.check_steps(2.0) == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            schedule.check_steps(bad)
    with pytest.raises(ValueError, match="update rates exist for"):
        schedule.update_rates(LogLinearNoise(), 4, "ordered")
    assert schedule.update_rates(LogLinearNoise(), 1, "euler").tolist() == [1.0]


def test_schedule_draws_use_the_generator_they_are_given():
    rates = schedule.update_rates(LogLinearNoise(), 6, "tweedie")
    free = torch.ones(40, 10, dtype=torch.bool)
    a = schedule.draw_reveal_steps(rates, free, torch.Generator().manual_seed(4))
    torch.manual_seed(123)  # the global generator must not matter
    assert torch.equal(a, schedule.draw_reveal_steps(rates, free, torch.Generator().manual_seed(4)))
    assert not torch.equal(a, schedule.draw_reveal_steps(rates, free, torch.Generator().manual_seed(5)))
    g1, _ = schedule.ordered_groups(free, 10, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(321)
    assert torch.equal(g1, schedule.ordered_groups(free, 10, generator=torch.Generator().manual_seed(4))[0])


def test_rates_of_a_schedule_that_unmasks_are_clamped_at_zero():
    """A (user-written) schedule whose sigma falls in time gives negative raw rates: clamped to 0."""
    def falling(t):
        return 2.0 - t, -torch.ones_like(t)

    rates = schedule.update_rates(falling, 5, "tweedie")
    assert rates[:-1].tolist() == [0.0] * 4 and rates[-1] == 1.0
    assert schedule.update_rates(falling, 5, "euler")[:-1].tolist() == [0.0] * 4


def test_ordered_groups_one_step_per_position_at_a_long_length():
    """K = n: group = place in the order, exactly, even where rank * K exceeds float32's integers."""
    L = 20000
    order = torch.randperm(L, generator=torch.Generator().manual_seed(0))
    group, K = schedule.ordered_groups(torch.ones(1, L, dtype=torch.bool), steps=L, order=order)
    expected = torch.empty(L, dtype=torch.int32).scatter_(0, order, torch.arange(L, dtype=torch.int32))
    assert K.tolist() == [L] and torch.equal(group[0], expected)
    chunks, K = schedule.ordered_groups(torch.ones(1, L, dtype=torch.bool), steps=16001, order=torch.arange(L))
    assert K.tolist() == [16001]
    assert torch.equal(chunks[0].long(), torch.arange(L) * 16001 // L)  # integer floor, not a rounded float
