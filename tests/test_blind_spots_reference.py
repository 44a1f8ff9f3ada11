"""The published-API samplers' plumbing, against exact expectations (issue 17).

tests/test_sampling_reference.py checks what they sample (E-NFE against theory, conditioning,
greedy top-k, the direct step in distribution). These pin the rest: which rows the per-row
cache re-evaluates at each step, what reaches the schedule and the engine (eps, method, device,
the seed drawn from the sampler's generator, the caller's engine options), the published
output slicing, the counters across calls, the device fallbacks and the messages.
"""
from __future__ import annotations

import pytest
import torch

from radd_fast import LogLinearNoise
from radd_fast.sampling import DiffusionSampler, OrderedSampler
from radd_fast.sampling import reference as ref_module

from .test_sampling_utils import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(tokens=8, length=16)


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
    real = ref_module.update_rates
    monkeypatch.setattr(ref_module, "update_rates", lambda *a: asked.append(a[1:]) or real(*a))
    noise = LogLinearNoise()
    DiffusionSampler("euler", model, noise, (2, 4), model.vocab_size, "direct", eps=0.05, seed=0).sample(3)
    assert asked == [(3, "euler", 0.05, torch.device("cpu"))]


def test_the_fast_path_passes_its_arguments_and_a_seed_from_the_samplers_generator(model, monkeypatch):
    calls = []
    real = ref_module.generate

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(ref_module, "generate", spy)
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
    assert ref_module._model_device(model) == torch.device("cpu")
    assert ref_module._model_device(torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")  # first parameter's
    assert ref_module._model_device(torch.nn.Identity()) == torch.device("cpu")  # no parameters
    assert ref_module._model_device(object()) == torch.device("cpu")  # not a module at all
    sampler = OrderedSampler(model, (2, 4), model.vocab_size, "direct", device="meta")
    assert sampler.device == torch.device("meta") and sampler._update_cnt.device == torch.device("meta")

    class Placed(torch.nn.Module):  # a model that says where it lives, before its (absent) parameters
        device = torch.device("meta")

    assert ref_module._model_device(Placed()) == torch.device("meta")
    assert OrderedSampler(Placed(), (2, 4), 8, "direct").device == torch.device("meta")  # no device given


def test_a_seed_makes_the_reference_samplers_repeatable(model):
    def draw(seed):
        return DiffusionSampler("tweedie", model, LogLinearNoise(), (4, 6), model.vocab_size, "top_p", 0.9,
                                seed=seed).sample(5)

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    ordered = [OrderedSampler(model, (4, 6), model.vocab_size, "direct", seed=3).sample() for _ in range(2)]
    assert torch.equal(*ordered)


def test_the_sampling_dtype_reaches_the_direct_draw(model, monkeypatch):
    dtypes = []
    real = ref_module.gumbel
    monkeypatch.setattr(ref_module, "gumbel", lambda shape, dtype, *a: dtypes.append(dtype) or real(shape, dtype, *a))
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
    assert str(err.value) == f"DiffusionSampler method must be one of {ref_module.DIFFUSION_METHODS}, got 'ddpm'"
    with pytest.raises(NotImplementedError):
        ref_module.Sampler(model, (2, 4), model.vocab_size, "direct").sample(3)


@pytest.mark.parametrize("strategy, para", [("direct", None), ("top_k", 3)])
def test_seeded_reference_runs_do_not_depend_on_the_global_generator(model, strategy, para):
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
    monkeypatch.setattr(ref_module, "gumbel", zero_noise)
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

    monkeypatch.setattr(ref_module, "gumbel", tiny_noise)
    logp = torch.ones(1, 2)
    rate = torch.tensor(1.0, dtype=torch.float64)
    fp64 = DiffusionSampler("tweedie", model, LogLinearNoise(), (1, 4), 3, "direct", sampling_dtype="float64")
    fp32 = DiffusionSampler("tweedie", model, LogLinearNoise(), (1, 4), 3, "direct", sampling_dtype="float32")
    assert fp64._direct_draw(logp, rate).tolist() == [1]  # 1 + 2e-9 > 1 + 1e-9
    assert fp32._direct_draw(logp, rate).tolist() == [0]  # both round to 1.0: the first of the tie


def test_a_diffusion_sampler_takes_the_device_it_is_given(model):
    sampler = DiffusionSampler("tweedie", model, LogLinearNoise(), (2, 4), model.vocab_size, "direct", device="meta")
    assert sampler.device == torch.device("meta")
