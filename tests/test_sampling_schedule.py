"""Reveal schedule, batching plan, conditioning and strategies: the model-free parts of sampling."""
import numpy as np
import pytest
import torch

from radd_fast import GeometricNoise, LogLinearNoise
from radd_fast.sampling.batching import plan_ticks
from radd_fast.sampling.conditioning import initial_state, text_conditioning
from radd_fast.sampling.schedule import (
    draw_reveal_steps,
    expected_enfe,
    expected_enfe_exact,
    group_steps,
    ordered_groups,
    step_distribution,
    update_rates,
)
from radd_fast.sampling.strategies import check_strategy, filter_logits, sample_logits

from .test_sampling_utils import ALPHA, two_sample_chi2


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
    from .test_sampling_utils import chi2_sf

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


@pytest.mark.parametrize("buckets", [True, False])
def test_plan_runs_every_evaluation_once_in_order(buckets):
    rng = np.random.default_rng(0)
    K = rng.integers(0, 9, size=57)
    plan = plan_ticks(K, batch_size=8, pad_row=57, buckets=buckets)
    seen = {}
    for t in range(plan.ticks):
        rows, ks = plan.rows[t], plan.k[t]
        active = rows != 57
        assert active.sum() == plan.active[t] and active[: plan.active[t]].all()  # active first
        assert plan.batch[t] >= plan.active[t] and plan.batch[t] <= 8
        if buckets:
            assert plan.batch[t] in (1, 2, 4, 8)
        assert len(set(rows[active].tolist())) == active.sum()  # a row once per tick
        for r, k in zip(rows[active], ks[active]):
            assert seen.get(int(r), -1) == k - 1  # its evaluations in order, one per tick
            seen[int(r)] = int(k)
    assert {r: k + 1 for r, k in seen.items()} == {r: int(k) for r, k in enumerate(K) if k > 0}
    assert plan.active.sum() == K.sum() and (plan.active[: plan.ticks - 10] == 8).all()  # full until the tail


def test_text_conditioning_and_errors():
    assert text_conditioning(6, prefix=[1, 2], suffix=[3], infill={3: [4]}) == {0: 1, 1: 2, 5: 3, 3: 4}
    with pytest.raises(ValueError, match="longer than the sequence length"):
        text_conditioning(3, prefix=[1, 2], suffix=[3, 4])
    with pytest.raises(ValueError, match="outside the sequence"):
        text_conditioning(6, infill={5: [1, 2]})
    with pytest.raises(ValueError, match="already fixed"):
        text_conditioning(6, prefix=[1, 2], infill={1: [3]})
    x = initial_state({1: 4, 3: [5, 6]}, 2, 6, mask_id=8, device="cpu")
    assert x.tolist() == [[8, 4, 8, 5, 6, 8]]
    assert initial_state(None, 2, 3, 8, "cpu").tolist() == [[8, 8, 8]]
    assert initial_state(torch.tensor([[-1, 2], [3, -1]]), 2, 2, 8, "cpu").tolist() == [[8, 2], [3, 8]]
    with pytest.raises(ValueError, match="outside the sequence"):
        initial_state({6: 1}, 1, 6, 8, "cpu")
    with pytest.raises(ValueError, match="not a real token"):
        initial_state([(0, 8)], 1, 6, 8, "cpu")
    with pytest.raises(ValueError, match="conditioning tensor"):
        initial_state(torch.zeros(3, 6), 2, 6, 8, "cpu")


def test_strategies():
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        check_strategy("greedy")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"top_p needs"):
            check_strategy("top_p", bad)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="top_k needs"):
            check_strategy("top_k", bad)
    assert check_strategy("top_k", 3.0) == 3 and check_strategy("top_p", None) == 0.9
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, "top_k", 2))
    assert kept.sum(1).tolist() == [2, 2] and kept[0, 1] and kept[0, 3] and kept[1, 0]
    probs = logits.softmax(-1)
    kept = torch.isfinite(filter_logits(logits, "top_p", 0.5))
    assert kept[0].tolist() == [False, True, False, True, False] or kept[0].sum() == 1  # ties: 1 or both
    assert kept[1].tolist() == [True, False, False, False, False] and probs[1, 0] > 0.5
    kept = torch.isfinite(filter_logits(logits, "top_p", 1.0))
    assert kept.all()
    top1 = sample_logits(torch.randn(100, 7), "top_k", 1)
    assert top1.shape == (100,)
    x = torch.randn(100, 7)
    assert torch.equal(sample_logits(x, "top_k", 1), x.argmax(-1))
    # Gumbel-max draws from the softmax of the kept logits
    draws = sample_logits(logits[0:1].expand(20000, 5), "top_k", 3, torch.Generator().manual_seed(0))
    p = torch.softmax(filter_logits(logits[0:1], "top_k", 3), -1)[0]
    _, _, pval = two_sample_chi2(torch.bincount(draws, minlength=5), (p * 20000).round().long())
    assert pval > ALPHA
