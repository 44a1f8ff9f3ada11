"""The published-API samplers (radd_fast/sampling/published_api.py).

What they sample: E-NFE against theory, conditioning, greedy top-k, the direct step in
distribution, the fast flag sharing the API, and i.i.d. uniform tokens from a uniform head. Their
plumbing against exact expectations: which rows the per-row cache re-evaluates at each step, what
reaches the schedule and the engine (eps, method, device, the seed drawn from the sampler's
generator, the caller's engine options), the published output slicing, the counters across calls,
the device fallbacks, the direct draw's ties and dtype, and the messages.
"""
from __future__ import annotations

import pytest
import torch

from radd_fast import GeometricNoise, LogLinearNoise
from radd_fast.sampling import DiffusionSampler, OrderedSampler, expected_enfe, published_api
from radd_fast.sampling.conditioning import initial_state, projection
from tests.support.models import random_head_model
from tests.support.stats import ALPHA, assert_same_counts, two_sample_chi2
from tests.support.uniform_head import LENGTH, N_REAL, SAMPLES, assert_iid_uniform, assert_rate, uniform_model


@pytest.fixture(scope="module")
def model():
    return random_head_model(tokens=8, length=16)


def test_enfe_matches_theory(model):
    """update_cnt / batch = E-NFE ~ N (1 - (1 - 1/N)^L) for loglinear tweedie (tight bound)."""
    B, L, N = 1000, 12, 16
    sampler = DiffusionSampler("tweedie", model, LogLinearNoise(), (B, L), model.vocab_size, "direct", seed=0)
    x = sampler.sample(N)
    assert not bool((x == model.mask_id).any())
    per_row = sampler.last_row_nfe.double()
    assert sampler.update_cnt == int(per_row.sum())
    theory = expected_enfe(N, L)
    assert abs(per_row.mean().item() - theory) <= 4 * per_row.std().item() / B**0.5, (per_row.mean(), theory)
    sampler.sample(N)  # the counter accumulates over calls, as published
    assert sampler.update_cnt == int(per_row.sum()) + int(sampler.last_row_nfe.sum())


@pytest.mark.parametrize("method,strategy,para", [
    ("tweedie", "direct", None), ("euler", "top_p", 0.8), ("tweedie", "top_k", 3), ("ordered", "direct", None),
    ("ordered", "top_k", 2),
])
def test_conditioning_fixed_and_no_mask_left(model, method, strategy, para):
    B, L = 64, 10
    init = initial_state({0: 1, 1: 2, 7: 3, 9: 4}, B, L, model.mask_id, "cpu")
    if method == "ordered":
        sampler = OrderedSampler(model, (B, L), model.vocab_size, strategy, para, seed=1)
    else:
        sampler = DiffusionSampler(method, model, GeometricNoise(1e-3, 10.0), (B, L), model.vocab_size, strategy, para,
                                   seed=1)
    x = sampler.sample(5, projection(init, model.mask_id))
    assert x.shape == (B, L) and x.dtype == torch.int64
    assert bool((x[:, [0, 1, 7, 9]] == torch.tensor([1, 2, 3, 4])).all())
    assert not bool((x == model.mask_id).any()) and int(x.min()) >= 0
    assert int(sampler.last_row_nfe.max()) <= 5


def test_top_k_1_is_argmax(model):
    """top_k with k = 1 is greedy: one step from all-MASK = argmax of the model; ordered = a greedy loop."""
    B, L = 4, 6
    x = DiffusionSampler("tweedie", model, LogLinearNoise(), (B, L), model.vocab_size, "top_k", 1, seed=0).sample(1)
    allmask = torch.full((B, L), model.mask_id)
    assert torch.equal(x, model(allmask)[..., :-1].argmax(-1))
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    x = OrderedSampler(model, (B, L), model.vocab_size, "top_k", 1, order=order, seed=0).sample(L)
    greedy = allmask.clone()
    for pos in order.tolist():
        greedy[:, pos] = model(greedy)[:, pos, :-1].argmax(-1)
    assert torch.equal(x, greedy)


def test_ordered_default_order_uses_the_model_length():
    model = random_head_model(tokens=5, length=7)
    sampler = OrderedSampler(model, (3, 7), model.vocab_size, "direct", seed=0)
    x = sampler.sample()  # steps default: the length; published hard-coded randperm(1024)
    assert x.shape == (3, 7) and not bool((x == model.mask_id).any())
    assert sampler.last_row_nfe.tolist() == [7, 7, 7]


def test_direct_step_is_reveal_then_draw():
    """Published direct step (Gumbel-max over [p * rate, 1 - rate]) = reveal w.p. rate, then draw from p."""
    torch.manual_seed(0)
    n, V1, rate = 60000, 6, torch.tensor(0.3, dtype=torch.float64)
    logp = torch.randn(V1).log_softmax(-1)
    model = random_head_model(tokens=V1, length=4)
    sampler = DiffusionSampler("tweedie", model, LogLinearNoise(), (1, 4), model.vocab_size, "direct", seed=3)
    published = sampler._direct_draw(logp.expand(n, V1), rate)  # V1 = MASK = stays masked
    gen = torch.Generator().manual_seed(4)
    reveal = torch.rand(n, generator=gen, dtype=torch.float64) < rate
    two_stage = torch.where(reveal, torch.multinomial(logp.exp(), n, replacement=True, generator=gen), V1)
    _, _, p = two_sample_chi2(torch.bincount(published, minlength=V1 + 1), torch.bincount(two_stage, minlength=V1 + 1))
    assert p > ALPHA
    assert abs((published == V1).double().mean().item() - 0.7) < 0.01


def test_fast_flag_shares_the_api(model):
    B, L = 200, 6
    init = initial_state({2: 5}, B, L, model.mask_id, "cpu")
    ref = DiffusionSampler("tweedie", model, LogLinearNoise(), (B, L), model.vocab_size, "direct", seed=0)
    fast = DiffusionSampler("tweedie", model, LogLinearNoise(), (B, L), model.vocab_size, "direct", seed=0, fast=True,
                            use_kernels=False)
    ref.sample(8, projection(init, model.mask_id))
    xf = fast.sample(8, projection(init, model.mask_id))
    assert xf.shape == (B, L) and bool((xf[:, 2] == 5).all()) and not bool((xf == model.mask_id).any())
    assert fast.update_cnt == int(fast.stats.enfe.sum()) == fast.stats.eval_rows
    assert_same_counts(ref.last_row_nfe, fast.last_row_nfe, "E-NFE reference vs fast")
    ordered = OrderedSampler(model, (B, L), model.vocab_size, "top_k", 2, seed=0, fast=True, use_kernels=False)
    x = ordered.sample(L)
    assert not bool((x == model.mask_id).any()) and ordered.update_cnt == B * L


def test_errors(model):
    with pytest.raises(ValueError, match="method must be one of"):
        DiffusionSampler("ddpm", model, LogLinearNoise(), (2, 4), model.vocab_size, "direct")
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        DiffusionSampler("tweedie", model, LogLinearNoise(), (2, 4), model.vocab_size, "nucleus")
    with pytest.raises(ValueError, match="top_p needs"):
        OrderedSampler(model, (2, 4), model.vocab_size, "top_p", 1.5)
    with pytest.raises(ValueError, match="steps must be"):
        DiffusionSampler("tweedie", model, LogLinearNoise(), (2, 4), model.vocab_size, "direct").sample(0)
    with pytest.raises(ValueError, match="batch_dims"):
        OrderedSampler(model, (2,), model.vocab_size, "direct")


# ---- plumbing, against exact expectations ------------------------------------------------------------------------
class RowCounter:
    """A forward hook: the batch size of every model call."""

    def __init__(self, model):
        self.rows = []
        self.handle = model.register_forward_hook(lambda m, args, out: self.rows.append(args[0].shape[0]))


def test_the_cache_re_evaluates_exactly_the_rows_that_changed(model):
    sampler = DiffusionSampler("tweedie", model, LogLinearNoise(), (6, 5), model.vocab_size, "direct", seed=2)
    changes = []
    real = sampler._count

    def count(x_old, x, row_nfe):
        changed = real(x_old, x, row_nfe)
        changes.append(int(changed.sum()))
        return changed

    sampler._count = count
    counter = RowCounter(model)
    try:
        sampler.sample(7)
    finally:
        counter.handle.remove()
    # step 0 evaluates every row; step i > 0 the rows step i - 1 changed (none: no call at all)
    assert counter.rows == [6] + [c for c in changes[:-1] if c]
    assert sampler.update_cnt == sum(changes) == int(sampler.last_row_nfe.sum())


def test_the_schedule_gets_the_samplers_eps_method_and_device(model, monkeypatch):
    asked = []
    real = published_api.update_rates
    monkeypatch.setattr(published_api, "update_rates", lambda *a: asked.append(a[1:]) or real(*a))
    noise = LogLinearNoise()
    DiffusionSampler("euler", model, noise, (2, 4), model.vocab_size, "direct", eps=0.05, seed=0).sample(3)
    assert asked == [(3, "euler", 0.05, torch.device("cpu"))]


def test_the_fast_path_passes_its_arguments_and_a_seed_from_the_samplers_generator(model, monkeypatch):
    calls = []
    real = published_api.generate

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(published_api, "generate", spy)
    noise = LogLinearNoise()
    sampler = DiffusionSampler("euler", model, noise, (3, 5), model.vocab_size, "top_k", 2, eps=0.01, seed=4,
                               fast=True, sampling_dtype="float64", use_kernels=False, rows_in_flight=2)
    sampler.sample(6)
    (args, kwargs), = calls
    assert args[:5] == (model, noise, 3, 5, 6)
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(4)))
    expected = dict(method="euler", strategy="top_k", strategy_para=2, seed=seed, sampling_dtype="float64",
                    progress=False, use_kernels=False, rows_in_flight=2, eps=0.01)
    assert {k: kwargs[k] for k in expected} == expected and kwargs["conditioning"].shape == (3, 5)
    first = sampler.update_cnt
    assert first == int(sampler.stats.enfe.sum()) and torch.equal(sampler.last_row_nfe, sampler.stats.enfe)
    sampler.sample(6)
    assert sampler.update_cnt == first + int(sampler.stats.enfe.sum())  # summed over calls
    OrderedSampler(model, (2, 4), model.vocab_size, "direct", order=torch.arange(4), fast=True, progress=True,
                   use_kernels=False).sample(4)
    assert calls[-1][1]["method"] == "ordered" and calls[-1][1]["progress"] is True  # the caller's option wins
    assert torch.equal(calls[-1][1]["order"], torch.arange(4))


def test_published_forward_slicing_and_counter_setter(model):
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.arange(x.shape[0] * x.shape[1] * 8, dtype=torch.float16).view(*x.shape, 8)

    sampler = DiffusionSampler("tweedie", Fixed(), LogLinearNoise(), (2, 3), 8, "direct")
    logp = sampler._log_probs(torch.zeros(2, 3, dtype=torch.int64))
    assert logp.dtype == torch.float32 and logp.shape == (2, 3, 7)  # the MASK column dropped
    assert torch.equal(logp, torch.arange(48, dtype=torch.float32).view(2, 3, 8)[..., :7])
    assert sampler.last_row_nfe is None and sampler.stats is None  # nothing sampled yet
    sampler.update_cnt = 5
    assert sampler.update_cnt == 5 and sampler.mask_id == 7 and sampler.token_dim == 8
    sampler.update_cnt = 2**24 + 1  # an exact count: one more than float32 holds
    assert sampler.update_cnt == 2**24 + 1


def test_the_samplers_device(model):
    assert published_api._model_device(model) == torch.device("cpu")
    assert published_api._model_device(torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")  # first parameter's
    assert published_api._model_device(torch.nn.Identity()) == torch.device("cpu")  # no parameters
    assert published_api._model_device(object()) == torch.device("cpu")  # not a module at all
    sampler = OrderedSampler(model, (2, 4), model.vocab_size, "direct", device="meta")
    assert sampler.device == torch.device("meta") and sampler._update_cnt.device == torch.device("meta")

    class Placed(torch.nn.Module):  # a model that says where it lives, before its (absent) parameters
        device = torch.device("meta")

    assert published_api._model_device(Placed()) == torch.device("meta")
    assert OrderedSampler(Placed(), (2, 4), 8, "direct").device == torch.device("meta")  # no device given


def test_a_seed_makes_the_published_api_samplers_repeatable(model):
    def draw(seed):
        return DiffusionSampler("tweedie", model, LogLinearNoise(), (4, 6), model.vocab_size, "top_p", 0.9,
                                seed=seed).sample(5)

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    ordered = [OrderedSampler(model, (4, 6), model.vocab_size, "direct", seed=3).sample() for _ in range(2)]
    assert torch.equal(*ordered)


def test_the_sampling_dtype_reaches_the_direct_draw(model, monkeypatch):
    dtypes = []
    real = published_api.gumbel
    monkeypatch.setattr(published_api, "gumbel", lambda shape, dtype, *a: dtypes.append(dtype) or real(shape, dtype, *a))
    DiffusionSampler("tweedie", model, LogLinearNoise(), (2, 4), model.vocab_size, "direct",
                     sampling_dtype="float64").sample(2)
    assert dtypes and set(dtypes) == {torch.float64}


def test_sampling_leaves_the_model_in_eval_mode(model):
    model.train()
    OrderedSampler(model, (2, 4), model.vocab_size, "direct", seed=0).sample()
    assert not model.training


def test_messages(model):
    for dims in ((2,), (0, 4), (2, 0)):
        with pytest.raises(ValueError) as err:
            OrderedSampler(model, dims, model.vocab_size, "direct")
        assert str(err.value) == f"batch_dims must be (batch, length) with both >= 1, got {dims}"
    with pytest.raises(ValueError) as err:
        DiffusionSampler("ddpm", model, LogLinearNoise(), (2, 4), model.vocab_size, "direct")
    assert str(err.value) == f"DiffusionSampler method must be one of {published_api.DIFFUSION_METHODS}, got 'ddpm'"
    with pytest.raises(NotImplementedError):
        published_api.Sampler(model, (2, 4), model.vocab_size, "direct").sample(3)


@pytest.mark.parametrize("strategy, para", [("direct", None), ("top_k", 3)])
def test_seeded_published_api_runs_do_not_depend_on_the_global_generator(model, strategy, para):
    runs = []
    for prior in (0, 99):
        torch.manual_seed(prior)
        runs.append(DiffusionSampler("tweedie", model, LogLinearNoise(), (4, 6), model.vocab_size, strategy, para,
                                     seed=1).sample(5))
    assert torch.equal(*runs)


def zero_noise(shape, dtype, device, generator=None):
    """A Gumbel stand-in: no noise at all, in the dtype asked for (the draw becomes an exact comparison)."""
    return torch.zeros(shape, dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_direct_draw_breaks_a_tie_toward_the_real_token(model, monkeypatch, dtype):
    """rate 1/2 and no noise: every real token scores log(1/2), MASK scores log1p(-1/2), the same number
    (both rounded to the sampling dtype): the tie goes to the real token, as argmax over the published
    concatenation [p * rate, 1 - rate] would."""
    monkeypatch.setattr(published_api, "gumbel", zero_noise)
    sampler = DiffusionSampler("tweedie", model, LogLinearNoise(), (1, 4), model.vocab_size, "direct",
                               sampling_dtype=dtype)
    token = sampler._direct_draw(torch.zeros(3, model.vocab_size - 1), torch.tensor(0.5, dtype=torch.float64))
    assert token.tolist() == [0, 0, 0]


def test_the_direct_draw_adds_the_noise_in_the_sampling_dtype(model, monkeypatch):
    """Two tokens tied in fp32 and noise 1e-9 apart: only scores held in fp64 tell them apart."""
    def tiny_noise(shape, dtype, device, generator=None):
        if len(shape) == 1:  # the MASK column's noise: never wins
            return torch.full(shape, -1e9, dtype=dtype)
        return torch.tensor([1e-9, 2e-9], dtype=dtype).expand(shape).clone()

    monkeypatch.setattr(published_api, "gumbel", tiny_noise)
    logp = torch.ones(1, 2)
    rate = torch.tensor(1.0, dtype=torch.float64)
    fp64 = DiffusionSampler("tweedie", model, LogLinearNoise(), (1, 4), 3, "direct", sampling_dtype="float64")
    fp32 = DiffusionSampler("tweedie", model, LogLinearNoise(), (1, 4), 3, "direct", sampling_dtype="float32")
    assert fp64._direct_draw(logp, rate).tolist() == [1]  # 1 + 2e-9 > 1 + 1e-9
    assert fp32._direct_draw(logp, rate).tolist() == [0]  # both round to 1.0: the first of the tie


def test_a_diffusion_sampler_takes_the_device_it_is_given(model):
    sampler = DiffusionSampler("tweedie", model, LogLinearNoise(), (2, 4), model.vocab_size, "direct", device="meta")
    assert sampler.device == torch.device("meta")


# ---- fresh noise on a uniform head --------------------------------------------------------------------------------
def published_api_samples(model, kind: str, seed: int) -> torch.Tensor:
    V = model.vocab_size
    if kind == "ordered":
        return OrderedSampler(model, (SAMPLES, LENGTH), V, "direct", seed=seed).sample(LENGTH)
    steps = 1 if kind == "tweedie-1" else 8
    method = "euler" if kind == "euler-8" else "tweedie"
    return DiffusionSampler(method, model, LogLinearNoise(), (SAMPLES, LENGTH), V, "direct", seed=seed).sample(steps)


class TestFreshNoiseOnAUniformHead:
    """A fresh model's head is uniform: the samplers' tokens must be i.i.d. uniform (tests.support.uniform_head)."""

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls):
        return uniform_model()

    @pytest.mark.parametrize("kind", ["tweedie-1", "euler-8", "ordered"])
    def test_published_api_samplers_uniform_head(self, model, kind):
        a = published_api_samples(model, kind, seed=1)
        assert_iid_uniform(a, kind)
        assert_rate(a == published_api_samples(model, kind, seed=2), 1 / N_REAL, f"{kind}: seeds 1 and 2 agree")
