"""Sampling blind spots that parity tests cannot see (issue 17).

- Fresh noise: a model whose head is uniform (RADD zero-initialises its output layer, so a fresh
  model gives log p = -log(V-1) for every real token) must produce i.i.d. uniform tokens: token
  frequencies, the equal-neighbour rate and the cross-sample agreement are all known (1/(V-1)),
  whatever the schedule. Noise reused between evaluations, rows or seeds moves them.
- Filtering boundaries: top-p / top-k kept sets written out by hand.
- Shared code with its own oracle: schedule rates in closed form (computed here with ``math``),
  the Gumbel noise against its CDF (Kolmogorov-Smirnov), the strategy table.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radd_fast import RADD, GeometricNoise, LogLinearNoise, ModelConfig, RADDConfig
from radd_fast.kernels.sampling_update import gumbel_noise
from radd_fast.model.head import gumbel
from radd_fast.sampling import DiffusionSampler, OrderedSampler, generate, schedule
from radd_fast.sampling.batching import bucket, plan_ticks
from radd_fast.sampling.conditioning import initial_state, projection, text_conditioning
from radd_fast.sampling.strategies import (
    DEFAULT_PARA,
    STRATEGIES,
    check_strategy,
    filter_logits,
    make_strategy,
    sample_logits,
    sampling_dtype,
)

from .test_sampling_utils import ALPHA, chi2_sf

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


@pytest.fixture(scope="module")
def model():
    return uniform_model()


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


# ------------------------------------------------------------------ fresh noise: the engine
ENGINE_CASES = {  # name: (method, steps, use_kernels, sampling dtype)
    "tweedie-1-step-torch": ("tweedie", 1, False, "float64"),
    "tweedie-16-steps-torch": ("tweedie", 16, False, "float32"),
    "tweedie-1-step-kernel": ("tweedie", 1, True, "float32"),
    "euler-6-steps-kernel": ("euler", 6, True, "float64"),
    "ordered-torch": ("ordered", LENGTH, False, "float64"),
    "ordered-3-chunks-kernel": ("ordered", 3, True, "float32"),
}


def engine_samples(model, case: str, seed: int) -> torch.Tensor:
    method, steps, kernels, sdtype = ENGINE_CASES[case]
    x, _ = generate(model, LogLinearNoise(), SAMPLES, LENGTH, steps, method=method, use_kernels=kernels,
                    sampling_dtype=sdtype, rows_in_flight=16, seed=seed, progress=False)
    return x


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_uniform_head_gives_iid_uniform_tokens(model, case):
    """One evaluation reveals many positions of many rows (1 step) or few at a time (16 steps):
    noise shared by rows of an evaluation, or by evaluations, shows up in one of the rates."""
    assert_iid_uniform(engine_samples(model, case, seed=3), case)


@pytest.mark.parametrize("kernels", [False, True])
def test_engine_different_seeds_and_waves_are_independent(model, kernels):
    def run(seed, n=SAMPLES, **kw):
        return generate(model, LogLinearNoise(), n, LENGTH, 3, use_kernels=kernels, rows_in_flight=16, seed=seed,
                        progress=False, **kw)[0]

    a, b = run(5), run(6)
    assert_rate(a == b, 1 / N_REAL, f"kernels={kernels}: seeds 5 and 6 agree")
    assert torch.equal(a, run(5)), f"kernels={kernels}: seed 5 twice differs"
    x = run(7, 2 * SAMPLES, wave_size=SAMPLES)  # the second wave's noise is not the first's
    assert_rate(x[:SAMPLES] == x[SAMPLES:], 1 / N_REAL, f"kernels={kernels}: two waves agree")


# ------------------------------------------------------------------ fresh noise: the reference samplers
def reference_samples(model, kind: str, seed: int) -> torch.Tensor:
    V = model.vocab_size
    if kind == "ordered":
        return OrderedSampler(model, (SAMPLES, LENGTH), V, "direct", seed=seed).sample(LENGTH)
    steps = 1 if kind == "tweedie-1" else 8
    method = "euler" if kind == "euler-8" else "tweedie"
    return DiffusionSampler(method, model, LogLinearNoise(), (SAMPLES, LENGTH), V, "direct", seed=seed).sample(steps)


@pytest.mark.parametrize("kind", ["tweedie-1", "euler-8", "ordered"])
def test_reference_samplers_uniform_head(model, kind):
    a = reference_samples(model, kind, seed=1)
    assert_iid_uniform(a, kind)
    assert_rate(a == reference_samples(model, kind, seed=2), 1 / N_REAL, f"{kind}: seeds 1 and 2 agree")


# ------------------------------------------------------------------ filtering boundaries
def kept(logits: torch.Tensor, strategy: str, para) -> list[set[int]]:
    """The token sets a strategy keeps, one per row of logits [N, C]."""
    finite = torch.isfinite(filter_logits(logits, strategy, para))
    return [set(torch.nonzero(row).flatten().tolist()) for row in finite]


def log_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()[None]


@pytest.mark.parametrize("p,expected", [
    (0.30, {1}),  # the first token alone reaches p
    (0.44, {1}),
    (0.50, {1, 3}),  # 0.45 < p: the token that crosses p is kept
    (0.69, {1, 3}),
    (0.71, {1, 3, 0}),
    (0.89, {1, 3, 0}),
    (0.96, {1, 3, 0, 2}),
    (0.999, {1, 3, 0, 2, 4}),
])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p, expected):
    """probs sorted: token 1 (0.45), 3 (0.25), 0 (0.2), 2 (0.08), 4 (0.02); margins >= 0.005 to p."""
    logits = log_of([0.20, 0.45, 0.08, 0.25, 0.02])
    assert kept(logits, "top_p", p) == [expected]
    assert kept(logits * 1.0 + 3.0, "top_p", p) == [expected]  # a shift of the logits changes nothing


def test_top_p_rows_are_filtered_independently_and_ties_keep_one_of_them():
    logits = torch.cat([log_of([0.4, 0.2, 0.2, 0.2]), log_of([0.1, 0.1, 0.1, 0.7]), log_of([0.25] * 4)])
    rows = kept(logits, "top_p", 0.55)
    assert 0 in rows[0] and len(rows[0]) == 2 and rows[0] <= {0, 1, 2, 3}  # 0.4 + one of the tied 0.2s
    assert rows[1] == {3}
    assert len(rows[2]) == 3  # three of four equal tokens: 0.5 < 0.55 <= 0.75
    out = filter_logits(logits, "top_p", 0.55)
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # kept logits unchanged
    assert bool((out[~torch.isfinite(out)] == float("-inf")).all())


def test_top_p_exact_hit_follows_the_published_rule():
    """Published rule: token j is kept iff the mass ranked before it is <= p. An exact hit (mass
    0.75 of tokens 0, 1 equal to p, exact in binary) therefore keeps the next token too."""
    logits = log_of([0.5, 0.25, 0.125, 0.125])
    assert kept(logits, "top_p", 0.75)[0] == {0, 1, 2}
    assert kept(logits, "top_p", 0.5)[0] == {0, 1}


def test_top_p_at_one_keeps_every_token():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 3
    assert bool(torch.isfinite(filter_logits(logits, "top_p", 1.0)).all())


def test_top_p_at_one_keeps_every_token_of_a_small_vocabulary():
    logits = torch.randn(256, 7, generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(filter_logits(logits, "top_p", 1.0)).all())


@pytest.mark.parametrize("k,expected", [(1, {2}), (2, {2, 0}), (3, {2, 0, 4}), (5, set(range(5))),
                                        (6, set(range(5))), (400, set(range(5)))])
def test_top_k_exact_sets(k, expected):
    logits = torch.tensor([[1.0, -2.0, 3.0, -1.0, 0.5]])
    assert kept(logits, "top_k", k) == [expected]


def test_top_k_keeps_exactly_k_among_ties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    rows = kept(logits, "top_k", 2)
    assert 4 in rows[0] and len(rows[0]) == 2 and rows[0] <= {0, 1, 2, 4}
    assert len(rows[1]) == 2
    assert kept(logits, "top_k", 3.0)[0] == {4, 0, 1} or len(kept(logits, "top_k", 3)[0]) == 3


def test_direct_keeps_everything_and_copies():
    logits = torch.randn(3, 5)
    out = filter_logits(logits, "direct")
    assert torch.equal(out, logits) and out.data_ptr() != logits.data_ptr()
    empty = make_strategy("top_p", 0.5).filter(torch.zeros(0, 5, dtype=torch.float64))
    assert empty.shape == (0, 5) and empty.dtype == torch.float32


def test_filters_return_fp32_for_any_input_dtype():
    for strategy, para in (("direct", None), ("top_k", 2), ("top_p", 0.5)):
        out = filter_logits(torch.randn(4, 6, dtype=torch.float64), strategy, para)
        assert out.dtype == torch.float32, strategy


# ------------------------------------------------------------------ the strategy table
def test_strategy_table_and_parameters():
    assert STRATEGIES == ("direct", "top_p", "top_k")
    assert DEFAULT_PARA == {"top_p": 0.9, "top_k": 400}
    assert check_strategy("direct", 5) is None
    assert check_strategy("top_p", 1) == 1.0 and check_strategy("top_p", "0.25") == 0.25
    assert check_strategy("top_k", 1) == 1 and isinstance(check_strategy("top_k", 2.0), int)
    for bad in (0, -0.1, 1.0001):
        with pytest.raises(ValueError, match=r"top_p needs strategy_para p in \(0, 1\]"):
            check_strategy("top_p", bad)
    for bad in (0, 0.5, 2.5, -3):
        with pytest.raises(ValueError, match="top_k needs a whole-number strategy_para k >= 1"):
            check_strategy("top_k", bad)
    s = make_strategy("top_k", 3.0)
    assert s.name == "top_k" and s.para == 3 and not s.is_direct
    assert make_strategy("top_p").para == 0.9 and make_strategy("top_k").para == 400
    assert make_strategy("direct").is_direct and make_strategy("direct").para is None
    with pytest.raises(ValueError, match=r"unknown sampling strategy 'greedy'; expected one of"):
        make_strategy("greedy")


def test_sampling_dtype_names():
    assert sampling_dtype("float32") is torch.float32 and sampling_dtype("float64") is torch.float64
    assert sampling_dtype(torch.float64) is torch.float64
    for bad in ("float16", torch.float16, "fp64"):
        with pytest.raises(ValueError, match=r"sampling_dtype must be one of \['float32', 'float64'\]"):
            sampling_dtype(bad)


def test_sample_logits_draws_from_the_filtered_softmax_with_its_generator():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]]).expand(30000, 4)
    for dtype in (torch.float32, torch.float64):
        draws = sample_logits(logits, "top_k", 3, torch.Generator().manual_seed(0), dtype)
        assert draws.shape == (30000,) and draws.dtype == torch.int64
        counts = torch.bincount(draws, minlength=4).double()
        assert counts[3] == 0
        p = torch.tensor([2.0, 0.0, 1.0]).softmax(0).double()
        stat = float(((counts[:3] - 30000 * p) ** 2 / (30000 * p)).sum())
        assert chi2_sf(stat, 2) > ALPHA
        again = sample_logits(logits, "top_k", 3, torch.Generator().manual_seed(0), dtype)
        assert torch.equal(draws, again)  # the generator passed is the one used


# ------------------------------------------------------------------ Gumbel noise against its CDF
def ks_gumbel(x: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the sample x to the standard Gumbel CDF exp(-exp(-x))."""
    x = x.double().flatten().sort().values
    n = x.numel()
    cdf = torch.exp(-torch.exp(-x))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def ks_critical(n: int, alpha: float = ALPHA) -> float:
    return math.sqrt(-0.5 * math.log(alpha / 2)) / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_gumbel_is_standard_gumbel_and_fresh(dtype):
    gen = torch.Generator().manual_seed(0)
    x = gumbel((100, 200), dtype, "cpu", gen)
    assert x.dtype == dtype and x.shape == (100, 200) and bool(torch.isfinite(x).all())
    assert ks_gumbel(x) < ks_critical(x.numel())
    y = gumbel((100, 200), dtype, "cpu", gen)  # the next draw from the same generator
    assert ks_gumbel(torch.cat([x, y])) < ks_critical(2 * x.numel())
    assert abs(float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]).double())[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(torch.stack([x[:, 1:].flatten(), x[:, :-1].flatten()]).double())[0, 1])) < 0.03


@pytest.mark.parametrize("fp64", [False, True])
def test_kernel_gumbel_noise_is_standard_gumbel_and_fresh(fp64):
    """The Philox noise of the sampling kernels (interpreter on CPU): distribution, rows, keys."""
    x = gumbel_noise(64, 300, seed=11, device="cpu", fp64=fp64)
    assert x.dtype == (torch.float64 if fp64 else torch.float32) and bool(torch.isfinite(x).all())
    assert ks_gumbel(x) < ks_critical(x.numel())
    rows = torch.corrcoef(torch.stack([x[1:].flatten(), x[:-1].flatten()]).double())[0, 1]
    assert abs(float(rows)) < 0.03
    other = gumbel_noise(64, 300, seed=12, device="cpu", fp64=fp64)
    assert abs(float(torch.corrcoef(torch.stack([x.flatten(), other.flatten()]).double())[0, 1])) < 0.03
    assert torch.equal(x, gumbel_noise(64, 300, seed=11, device="cpu", fp64=fp64))


# ------------------------------------------------------------------ schedule rates in closed form
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


# ------------------------------------------------------------------ the batching plan, by hand
def test_bucket_is_the_next_power_of_two_capped():
    assert bucket(np.array([1, 2, 3, 4, 5, 8, 9]), 8).tolist() == [1, 2, 4, 4, 8, 8, 8]
    assert int(bucket(0, 4)) == 1 and int(bucket(3, 2)) == 2 and int(bucket(17, 64)) == 32


def test_plan_ticks_small_cases_by_hand():
    plan = plan_ticks(np.array([3, 1, 2]), batch_size=2, pad_row=3)  # the docstring's example
    assert plan.ticks == 3 and plan.rows.tolist() == [[0, 1], [0, 2], [0, 2]]
    assert plan.k.tolist() == [[0, 0], [1, 0], [2, 1]] and plan.k.dtype == np.int32
    assert plan.active.tolist() == [2, 2, 2] and plan.batch.tolist() == [2, 2, 2]
    # slots free at ticks 1, 1, 1, 1: rows 4 and 5 take slots 0 and 1, then the tail shrinks
    plan = plan_ticks(np.array([1, 1, 1, 1, 1, 3]), batch_size=4, pad_row=9)
    assert plan.rows.tolist() == [[0, 1, 2, 3], [4, 5, 9, 9], [5, 9, 9, 9], [5, 9, 9, 9]]
    assert plan.k.tolist() == [[0, 0, 0, 0], [0, 0, -2, -2], [1, -2, -2, -2], [2, -2, -2, -2]]
    assert plan.active.tolist() == [4, 2, 1, 1] and plan.batch.tolist() == [4, 2, 1, 1]
    plan = plan_ticks(np.array([1, 1, 1, 2]), batch_size=8, pad_row=4, buckets=True)  # B = 4 rows
    assert plan.rows.shape == (2, 4) and plan.active.tolist() == [4, 1] and plan.batch.tolist() == [4, 1]
    plan = plan_ticks(np.array([2, 2, 2, 1]), batch_size=4, pad_row=5, buckets=False)
    assert plan.active.tolist() == [4, 3] and plan.batch.tolist() == [4, 3]
    plan = plan_ticks(np.array([2, 2, 2, 1]), batch_size=4, pad_row=5, buckets=True)
    assert plan.batch.tolist() == [4, 4]


def test_plan_ticks_skips_rows_without_evaluations():
    plan = plan_ticks(np.array([0, 2, 0, 1]), batch_size=4, pad_row=7)
    assert plan.rows.tolist() == [[1, 3], [1, 7]] and plan.k.tolist() == [[0, 0], [1, -2]]
    assert plan.active.tolist() == [2, 1] and plan.batch.tolist() == [2, 1]
    empty = plan_ticks(np.zeros(5, dtype=np.int64), batch_size=4, pad_row=5)
    assert empty.ticks == 0 and empty.rows.shape == (0, 1) and empty.k.dtype == np.int32
    assert empty.active.shape == (0,) and empty.batch.shape == (0,)
    assert empty.rows.dtype == empty.active.dtype == empty.batch.dtype == np.int64


def test_plan_ticks_defaults_to_buckets_and_takes_float_counts():
    plan = plan_ticks(np.array([2, 2, 2, 1]), batch_size=4, pad_row=5)  # active [4, 3] -> bucket 4
    assert plan.batch.tolist() == [4, 4]
    as_float = plan_ticks(np.array([3.0, 1.0, 2.0]), batch_size=2, pad_row=3)  # counts from a float tensor
    assert as_float.rows.tolist() == [[0, 1], [0, 2], [0, 2]] and as_float.rows.dtype == np.int64


# ------------------------------------------------------------------ conditioning forms
def test_initial_state_forms_and_errors():
    x = initial_state({2: torch.tensor(5), 4: torch.tensor([1, 2])}, 3, 7, mask_id=9, device="cpu")
    assert x.tolist() == [[9, 9, 5, 9, 1, 2, 9]] and x.dtype == torch.int64
    assert initial_state([(0, 3), (6, 0)], 3, 7, 9, "cpu").tolist() == [[3, 9, 9, 9, 9, 9, 0]]
    rows = initial_state(torch.tensor([[-1, 4, 9], [2, -1, -1]]), 2, 3, 9, "cpu")
    assert rows.tolist() == [[9, 4, 9], [2, 9, 9]] and rows.is_contiguous()
    assert initial_state(torch.tensor([1, -1, 2]), 5, 3, 9, "cpu").tolist() == [[1, 9, 2]]
    with pytest.raises(ValueError, match=r"conditioning tokens must be in \[0, 9\)"):
        initial_state(torch.tensor([10, -1, 2]), 1, 3, 9, "cpu")
    with pytest.raises(ValueError, match=r"conditioning tensor must be \[L=3\] or \[num_samples=2, L\]"):
        initial_state(torch.zeros(3, 3, dtype=torch.int64), 2, 3, 9, "cpu")
    with pytest.raises(ValueError, match="conditioning tensor"):
        initial_state(torch.zeros(1, 4, dtype=torch.int64), 1, 3, 9, "cpu")
    with pytest.raises(ValueError, match="conditioning tensor"):
        initial_state(torch.zeros(1, 1, 3, dtype=torch.int64), 1, 3, 9, "cpu")
    with pytest.raises(ValueError, match=r"conditioning position -1 is outside the sequence \[0, 3\)"):
        initial_state({-1: 2}, 1, 3, 9, "cpu")
    with pytest.raises(ValueError, match=r"conditioning token -2 at position 1 is not a real token id \[0, 9\)"):
        initial_state([(1, -2)], 1, 3, 9, "cpu")
    with pytest.raises(ValueError, match=r"^conditioning must be None, a \{position: token\(s\)\} dict.*; got int$"):
        initial_state(5, 1, 3, 9, "cpu")
    assert initial_state(None, 2, 3, 9, "cpu").dtype == torch.int64
    assert initial_state({0: 1}, 2, 3, 9, "cpu").dtype == torch.int64
    from_int32 = initial_state(torch.tensor([0, -1, 3], dtype=torch.int32), 2, 3, 9, "cpu")
    assert from_int32.dtype == torch.int64 and from_int32.tolist() == [[0, 9, 3]]  # token 0 is a token
    with pytest.raises(ValueError, match="conditioning must be None"):
        initial_state(["ab", "c"], 1, 3, 9, "cpu")


def test_projection_writes_the_fixed_tokens():
    proj = projection(torch.tensor([[9, 4, 9, 1]]), mask_id=9)
    assert proj(torch.tensor([[0, 0, 0, 0], [5, 5, 5, 5]])).tolist() == [[0, 4, 0, 1], [5, 4, 5, 1]]


def test_text_conditioning_boundaries():
    assert text_conditioning(4, prefix=[1, 2], suffix=[3, 4]) == {0: 1, 1: 2, 2: 3, 3: 4}  # exactly full
    assert text_conditioning(4, suffix=[7]) == {3: 7}
    assert text_conditioning(4, infill={9: []}) == {}  # an empty span may sit anywhere
    assert text_conditioning(4, infill={0: [5], 3: [6]}) == {0: 5, 3: 6}
    with pytest.raises(ValueError, match=r"infill at -1: positions \[-1, 0\) fall outside the sequence \[0, 4\)"):
        text_conditioning(4, infill={-1: [1]})
    with pytest.raises(ValueError, match=r"infill at 3: positions \[3, 5\)"):
        text_conditioning(4, infill={3: [1, 2]})
    with pytest.raises(ValueError, match=r"prefix \(3 tokens\) \+ suffix \(2 tokens\) is longer than the sequence length 4"):
        text_conditioning(4, prefix=[1, 2, 3], suffix=[4, 5])
    with pytest.raises(ValueError, match="infill at 1: position 1 is already fixed to token 2"):
        text_conditioning(3, prefix=[1, 2], infill={1: [3]})
    assert text_conditioning(3, prefix=[1, 2], infill={1: [2]}) == {0: 1, 1: 2}  # the same token twice is fine
    with pytest.raises(ValueError, match=r"^infill at 0: position 1 is already fixed to token 2$"):
        text_conditioning(4, prefix=[1, 2], infill={0: [1, 5]})  # the span's second token collides
