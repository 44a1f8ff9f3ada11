"""Losses (docs/LOSSES.md): each against a direct implementation of the published formulas on the
full ``model(x)`` log-probs, on the same perturbed batch (same RNG), values and gradients;
expectation checks against exact any-order NLLs; bad inputs."""
import importlib.util
import itertools
import math

import pytest
import torch

from radd_fast import RADD, LogLinearNoise, ModelConfig, RADDConfig
from radd_fast.losses import LOSS_TYPES, ar_nll, ar_random, get_loss_fn, k_dce, lambda_dce, t_dce, t_dse
from radd_fast.losses.time_samplers import decoupled, naive, vdm
from tests.helpers import assert_close, rel_err

TOKENS = 11  # V = 12, mask id 11
EPS = 1e-3


def make_model(tokens=TOKENS, length=16, d=32, seed=0):
    cfg = RADDConfig(tokens=tokens, model=ModelConfig(hidden_size=d, n_heads=2, n_blocks=2, length=length, dropout=0.0))
    torch.manual_seed(seed)
    model = RADD(cfg)
    with torch.no_grad():  # fresh models have a zero head (uniform p): make every weight matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


# ---- the published formulas, written directly on the full [B, L, V] log-probs -----------------
def direct(loss_type, model, batch, perturbed, noise=None, t=None, lam=None, k=None):
    logp_all = model(perturbed)  # [B, L, V] published layout
    logp = logp_all.gather(-1, batch[..., None]).squeeze(-1)  # [B, L]
    M = perturbed == model.mask_id
    L = batch.shape[1]
    if loss_type in ("t_DCE", "t_DSE"):
        sigma, dsigma = noise(t)
        e = torch.expm1(sigma)[:, None]
        per_pos = (torch.log(e) - logp) / e
        if loss_type == "t_DSE":
            pos = torch.exp(logp_all[..., :-1] - torch.log(e)[..., None]).sum(-1)
            per_pos = per_pos + pos + (1 / e) * (torch.log(1 / e) - 1)
        return dsigma * torch.where(M, per_pos, 0).sum(-1)
    if loss_type == "lambda_DCE":
        return -torch.where(M, logp.double(), 0).sum(-1) / lam.double()
    if loss_type == "k_DCE":
        return -torch.where(M, logp, 0).sum(-1) * L / k.float()
    raise AssertionError(loss_type)


def direct_ar(model, batch, order):
    nll = torch.zeros(batch.shape[0])
    for b in range(batch.shape[0]):
        for i in range(batch.shape[1]):
            x = batch[b:b + 1].clone()
            x[0, order[b, i:]] = model.mask_id
            nll[b] -= model(x)[0, order[b, i], batch[b, order[b, i]]]
    return nll


def draw_like_the_loss(loss_type, batch, mask_id, noise):
    """Replay the loss's random draws in the documented order: sampler, then masking."""
    B, L = batch.shape
    if loss_type in ("t_DCE", "t_DSE"):
        t = (1 - EPS) * vdm(B, batch.device) + EPS
        move = torch.rand(batch.shape) < -torch.expm1(-noise(t)[0])[:, None]
        return dict(t=t), torch.where(move, mask_id, batch)
    if loss_type == "lambda_DCE":
        lam = decoupled(B, batch.device)
        move = torch.rand(batch.shape) < lam[:, None]
        return dict(lam=lam), torch.where(move, mask_id, batch)
    k = torch.randint(1, L + 1, (B,))
    rank = torch.rand(batch.shape).argsort(-1).argsort(-1)
    return dict(k=k), torch.where(rank < k[:, None], mask_id, batch)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def compare(model, value, expected, name):
    """Values to 1e-5 relative; then every parameter gradient to 1e-5 relative (norm-wise)."""
    assert value.dtype == expected.dtype, f"{name}: dtype {value.dtype} != {expected.dtype}"
    assert_close(value, expected, atol=1e-6, rtol=1e-5, name=name)
    model.zero_grad()
    value.sum().backward()
    g_loss = grads(model)
    model.zero_grad()
    expected.sum().backward()
    g_ref = grads(model)
    for n in g_ref:
        assert rel_err(g_loss[n], g_ref[n]) < 1e-5, f"{name}: grad {n} rel err {rel_err(g_loss[n], g_ref[n]):.3g}"


DCE_TYPES = ["t_DSE", "t_DCE", "lambda_DCE", "k_DCE"]


@pytest.mark.parametrize("loss_type", DCE_TYPES)
@pytest.mark.parametrize("B,L", [(1, 1), (3, 7), (4, 16)])
def test_loss_matches_published_formula_same_rng(loss_type, B, L):
    model, noise = make_model(), LogLinearNoise(EPS)
    batch = torch.randint(0, TOKENS, (B, L))
    loss_fn = get_loss_fn(noise, model.vocab_size, train=True, sampling_eps=EPS, loss_type=loss_type)
    torch.manual_seed(123)
    value = loss_fn(model, batch)
    torch.manual_seed(123)
    draws, perturbed = draw_like_the_loss(loss_type, batch, model.mask_id, noise)
    assert value.shape == (B,)
    compare(model, value, direct(loss_type, model, batch, perturbed, noise, **draws), loss_type)


@pytest.mark.parametrize("fn,name", [(t_dse, "t_DSE"), (t_dce, "t_DCE")])
def test_t_losses_on_fixed_perturbed_batch(fn, name):
    """Heavy masking, light masking and no masking at all (loss exactly 0, graph intact)."""
    model, noise = make_model(), LogLinearNoise(EPS)
    batch = torch.randint(0, TOKENS, (3, 9))
    t = torch.tensor([0.97, 0.05, 0.5])
    perturbed = batch.clone()
    perturbed[0, :8] = model.mask_id
    perturbed[1, 4] = model.mask_id
    value = fn(model, batch, noise, t=t, perturbed=perturbed)
    assert value[2] == 0
    compare(model, value, direct(name, model, batch, perturbed, noise, t=t), name)


def test_lambda_and_k_on_fixed_perturbed_batch():
    model = make_model()
    batch = torch.randint(0, TOKENS, (2, 13))
    perturbed = torch.where(torch.rand(2, 13) < 0.6, model.mask_id, batch)
    lam = torch.tensor([0.6, 0.3])
    compare(model, lambda_dce(model, batch, lam=lam, perturbed=perturbed),
            direct("lambda_DCE", model, batch, perturbed, lam=lam), "lambda_DCE")
    k = (perturbed == model.mask_id).sum(-1)
    compare(model, k_dce(model, batch, perturbed=perturbed), direct("k_DCE", model, batch, perturbed, k=k), "k_DCE")


@pytest.mark.parametrize("loss_type", ["ar_forward", "ar_backward", "ar_random"])
def test_ar_losses_match_direct_loop(loss_type):
    model = make_model()
    batch = torch.randint(0, TOKENS, (2, 5))
    torch.manual_seed(7)
    value = get_loss_fn(None, model.vocab_size, train=True, loss_type=loss_type)(model, batch)
    torch.manual_seed(7)
    order = {"ar_forward": torch.arange(5).expand(2, 5), "ar_backward": torch.arange(5).flip(0).expand(2, 5),
             "ar_random": torch.rand(2, 5).argsort(-1)}[loss_type]
    compare(model, value, direct_ar(model, batch, order), loss_type)


def test_ar_nll_is_a_normalised_distribution():
    """sum over all V'^L sequences of exp(-NLL) = 1 for any fixed order: the NLL is exact."""
    model = make_model(tokens=3, length=3)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=3)))  # [27, 3]
    for order in (torch.arange(3), torch.tensor([2, 0, 1])):
        with torch.no_grad():
            nll = ar_nll(model, seqs, order.expand(27, 3))
        assert abs(torch.exp(-nll.double()).sum().item() - 1) < 1e-5


def exact_any_order_nll(model, x):
    """E over orders of the AR NLL of x [L], by enumerating every masked subset S (one pass each):
    sum_S sum_{j in S} -log p(x_j | x_{S^c}) / (|S| C(L, |S|))."""
    L = x.shape[0]
    subsets = torch.tensor(list(itertools.product([0, 1], repeat=L))[1:], dtype=torch.bool)  # [2^L - 1, L]
    perturbed = torch.where(subsets, model.mask_id, x)
    with torch.no_grad():
        logp = model(perturbed).gather(-1, x.expand_as(perturbed)[..., None]).squeeze(-1).double()
    k = subsets.sum(-1)
    weight = 1.0 / (k * torch.tensor([math.comb(L, int(j)) for j in k]))
    return (weight * -torch.where(subsets, logp, 0).sum(-1)).sum().item()


def test_losses_agree_in_expectation_with_exact_any_order_nll():
    """lambda_DCE, k_DCE, t_DCE, t_DSE are unbiased for E_order[ar NLL] (t-losses up to the
    eps = 1e-3 truncation); ar_random averaged over every order equals it exactly."""
    model, noise = make_model(tokens=5, length=5), LogLinearNoise(EPS)
    x = torch.tensor([3, 0, 4, 4, 1])
    exact = exact_any_order_nll(model, x)
    perms = torch.tensor(list(itertools.permutations(range(5))))  # [120, 5]
    with torch.no_grad():
        all_orders = ar_random(model, x.expand(120, 5), order=perms).double().mean().item()
    assert abs(all_orders - exact) < 1e-5 * exact
    batch = x.expand(4096, 5)
    torch.manual_seed(0)
    for loss_type in ("lambda_DCE", "k_DCE", "t_DCE", "t_DSE"):
        with torch.no_grad():
            est = get_loss_fn(noise, model.vocab_size, train=False, loss_type=loss_type)(model, batch).double()
        se = est.std().item() / math.sqrt(est.numel())
        assert abs(est.mean().item() - exact) < 5 * se + 2e-3 * exact, \
            f"{loss_type}: mean {est.mean().item():.4f} +- {se:.4f}, exact {exact:.4f}"


def test_time_samplers_cover_unit_interval():
    for sampler in (naive, vdm, decoupled):
        t = sampler(1000, "cpu")
        assert t.shape == (1000,) and (t >= 0).all() and (t < 1).all()
    # stratified: exactly one draw per stratum [j/B, (j+1)/B)
    for sampler in (vdm, decoupled):
        t = sampler(64, "cpu")
        assert torch.equal((t * 64).floor().long().sort().values, torch.arange(64))


def test_k_dce_masks_exactly_k_vectorised():
    from radd_fast.losses.masking import mask_k_random

    x = torch.zeros(500, 37, dtype=torch.long)
    k = torch.randint(1, 38, (500,))
    assert torch.equal((mask_k_random(x, k, 99) == 99).sum(-1), k)


def test_sequence_length_comes_from_the_batch():
    """A model with length 16 scores L = 5 batches with L / k weights for L = 5, not 1024."""
    model = make_model()
    batch = torch.randint(0, TOKENS, (2, 5))
    perturbed = torch.full_like(batch, model.mask_id)  # k = L: weight 1
    value = k_dce(model, batch, perturbed=perturbed)
    assert_close(value, direct("k_DCE", model, batch, perturbed, k=torch.tensor([5, 5])), rtol=1e-5)


# ---- bad inputs ---------------------------------------------------------------------------------
def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown loss_type 'dce'.*lambda_DCE"):
        get_loss_fn(LogLinearNoise(), 12, train=True, loss_type="dce")
    with pytest.raises(ValueError, match="unknown time sampler"):
        get_loss_fn(LogLinearNoise(), 12, train=True, loss_type="t_DCE", time_sampler="sobol")
    with pytest.raises(ValueError, match="takes no time sampler"):
        get_loss_fn(LogLinearNoise(), 12, train=True, loss_type="k_DCE", time_sampler="vdm")
    with pytest.raises(ValueError, match="sampling_eps"):
        get_loss_fn(LogLinearNoise(), 12, train=True, loss_type="t_DCE", sampling_eps=1.5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bad_batches_raise_clear_errors(loss_type):
    model = make_model()
    fn = get_loss_fn(LogLinearNoise(), model.vocab_size, train=True, loss_type=loss_type)
    ok = torch.randint(0, TOKENS, (2, 4))
    with pytest.raises(ValueError, match="mask id is 11"):
        fn(model, ok.clone().fill_(model.mask_id))  # == mask id
    with pytest.raises(ValueError, match="clean tokens must be in"):
        fn(model, ok + 100)  # >= V
    with pytest.raises(ValueError, match="clean tokens must be in"):
        fn(model, ok - 100)
    with pytest.raises(ValueError, match="exceeds the model's length 16"):
        fn(model, torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        fn(model, ok.float())
    with pytest.raises(ValueError, match="does not match the model's vocab_size"):
        get_loss_fn(LogLinearNoise(), 50258, train=True, loss_type=loss_type)(model, ok)


def test_train_flag_sets_model_mode():
    model = make_model()
    get_loss_fn(LogLinearNoise(), model.vocab_size, train=False)(model, torch.zeros(1, 3, dtype=torch.long))
    assert not model.training
    get_loss_fn(LogLinearNoise(), model.vocab_size, train=True)(model, torch.zeros(1, 3, dtype=torch.long))
    assert model.training


# ---- the fused head ----------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("radd_fast.kernels.linear_log_softmax") is None,
                    reason="radd_fast/kernels/linear_log_softmax.py (fused head) not present yet")
@pytest.mark.parametrize("loss_type,whole_model", [("t_DSE", False), ("lambda_DCE", False), ("k_DCE", False),
                                                   ("lambda_DCE", True)])
def test_fast_backend_loss_matches_reference(loss_type, whole_model):
    """backend='fast' routes the masked rows through the fused linear + log-softmax kernel
    (Triton interpreter on CPU): same values and gradients as the reference, fp32. First the
    head alone (blocks stay reference), then the whole fast model (Triton blocks too)."""
    ref, noise = make_model(tokens=50, length=8), LogLinearNoise(EPS)
    fast = make_model(tokens=50, length=8)
    if whole_model:
        fast.set_backend("fast")
    else:
        fast.backend = "fast"  # the head only: the loss head is what is under test
    batch = torch.randint(0, 50, (3, 8))
    values, gs = [], []
    for model in (ref, fast):
        torch.manual_seed(5)
        value = get_loss_fn(noise, model.vocab_size, train=True, loss_type=loss_type)(model, batch)
        model.zero_grad()
        value.sum().backward()
        values.append(value.detach())
        gs.append(grads(model))
    assert_close(values[1], values[0], atol=1e-5, rtol=1e-5, name=loss_type)
    for n in gs[0]:
        assert rel_err(gs[1][n], gs[0][n]) < 1e-5, f"grad {n}: rel err {rel_err(gs[1][n], gs[0][n]):.3g}"
