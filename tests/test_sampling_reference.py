"""The published-API samplers (reference path): E-NFE, conditioning, strategies, the direct-step identity."""
import pytest
import torch

from radd_fast import GeometricNoise, LogLinearNoise
from radd_fast.sampling import DiffusionSampler, OrderedSampler, expected_enfe
from radd_fast.sampling.conditioning import initial_state, projection

from .test_sampling_utils import ALPHA, assert_same_counts, tiny_model, two_sample_chi2


@pytest.fixture(scope="module")
def model():
    return tiny_model(tokens=8, length=16)


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
    model = tiny_model(tokens=5, length=7)
    sampler = OrderedSampler(model, (3, 7), model.vocab_size, "direct", seed=0)
    x = sampler.sample()  # steps default: the length; published hard-coded randperm(1024)
    assert x.shape == (3, 7) and not bool((x == model.mask_id).any())
    assert sampler.last_row_nfe.tolist() == [7, 7, 7]


def test_direct_step_is_reveal_then_draw():
    """Published direct step (Gumbel-max over [p * rate, 1 - rate]) = reveal w.p. rate, then draw from p."""
    torch.manual_seed(0)
    n, V1, rate = 60000, 6, torch.tensor(0.3, dtype=torch.float64)
    logp = torch.randn(V1).log_softmax(-1)
    model = tiny_model(tokens=V1, length=4)
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
