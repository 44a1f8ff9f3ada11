"""The static-row losses (radd_fast/losses/static_rows.py): the published masking law of the planned
counts and positions, the planned loss equal to the eager one on the same masks (values and
gradients, fp32 1e-5), the capacity from the count distribution, and a loss that compiles to one
graph."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from radd_fast import LogLinearNoise
from radd_fast.losses import k_dce, lambda_dce, t_dce, t_dse
from radd_fast.losses.masking import mask_k_random
from radd_fast.losses.static_rows import PLANNED_LOSS_TYPES, MaskPlanner, planned_loss, planned_rows
from tests.support.compare import assert_close
from tests.support.models import LOSS_TOKENS, loss_model

EPS = 1e-3
EAGER = {"t_DSE": lambda m, x, n, plan, p: t_dse(m, x, n, t=plan.rate, perturbed=p),
         "t_DCE": lambda m, x, n, plan, p: t_dce(m, x, n, t=plan.rate, perturbed=p),
         "lambda_DCE": lambda m, x, n, plan, p: lambda_dce(m, x, lam=plan.rate, perturbed=p),
         "k_DCE": lambda m, x, n, plan, p: k_dce(m, x, k=plan.counts, perturbed=p)}


# ---- the masking law -----------------------------------------------------------------------------------------
def pooled_count_law(loss_type: str, length: int, noise) -> np.ndarray:
    """P(n = k), k = 0..L, for one sequence with its rate drawn by the loss's sampler.

    Every sampler's rate is marginally uniform on [0, 1) (naive: iid; vdm: a shifted grid; decoupled:
    a uniform stratum), so n ~ Binomial(L, p(u)), u ~ U[0, 1), integrated on a fine midpoint grid;
    k_DCE: uniform on 1..L."""
    k = np.arange(length + 1)
    if loss_type == "k_DCE":
        return np.where(k >= 1, 1.0 / length, 0.0)
    u = (np.arange(200_000) + 0.5) / 200_000
    if loss_type == "lambda_DCE":
        p = u
    else:
        t = torch.tensor((1 - EPS) * u + EPS)
        p = (-torch.expm1(-noise(t)[0])).numpy()
    return stats.binom.pmf(k[:, None], length, p[None, :]).mean(-1)


def chi_square_pvalue(observed: np.ndarray, expected_prob: np.ndarray) -> float:
    """Goodness of fit, cells with fewer than 5 expected draws merged into one."""
    expected = expected_prob * observed.sum()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.mark.parametrize("loss_type", PLANNED_LOSS_TYPES)
def test_masked_count_law(loss_type):
    """The host's counts follow the published law: P(n_j = k) = E_r[Binomial(k; L, p(r))]."""
    L, noise = 16, LogLinearNoise(EPS)
    planner = MaskPlanner(loss_type, noise, L, sampling_eps=EPS)
    torch.manual_seed(0)
    counts = torch.cat([planner.draw(8).counts for _ in range(4000)]).numpy()
    observed = np.bincount(counts, minlength=L + 1)
    assert counts.min() >= 0 and counts.max() <= L
    assert chi_square_pvalue(observed, pooled_count_law(loss_type, L, noise)) > 1e-4


def test_counts_given_the_rate_are_binomial():
    class FixedRate(MaskPlanner):
        def rates(self, batch_size, generator=None):
            return torch.full((batch_size,), 0.3), torch.full((batch_size,), 0.3, dtype=torch.float64)

    torch.manual_seed(1)
    planner = FixedRate("lambda_DCE", None, 20)
    counts = torch.cat([planner.draw(16).counts for _ in range(2000)]).numpy()
    law = stats.binom.pmf(np.arange(21), 20, 0.3)
    assert chi_square_pvalue(np.bincount(counts, minlength=21), law) > 1e-4


def test_positions_are_a_uniform_subset():
    """Given n, every n-subset of the L positions is equally likely (10 subsets of 5 choose 2)."""
    torch.manual_seed(2)
    D, L = 20_000, 5
    mask, _, _ = planned_rows(torch.rand(D, L, dtype=torch.float64), torch.full((D,), 2), capacity=2 * D)
    codes = (mask.long() * (2 ** torch.arange(L))).sum(-1).numpy()
    subsets = np.bincount(codes, minlength=2 ** L)
    pairs = [c for c in range(2 ** L) if bin(c).count("1") == 2]
    assert subsets.sum() == subsets[pairs].sum() == D
    assert stats.chisquare(subsets[pairs]).pvalue > 1e-4


def test_planned_rows_layout():
    """Exact counts per sequence, rows in sequence order, padding rows marked B."""
    torch.manual_seed(3)
    B, L, C = 4, 7, 24
    counts = torch.tensor([0, 7, 3, 5])
    mask, seq, flat = planned_rows(torch.rand(B, L, dtype=torch.float64), counts, C)
    assert torch.equal(mask.sum(-1), counts)
    N = int(counts.sum())
    assert torch.equal(seq[:N], torch.repeat_interleave(torch.arange(B), counts)) and (seq[N:] == B).all()
    assert torch.equal(flat[:N].sort().values, mask.flatten().nonzero().squeeze(-1))
    assert ((flat >= 0) & (flat < B * L)).all()


# ---- values: the eager losses on the same perturbed batch ----------------------------------------------------
@pytest.mark.parametrize("loss_type", PLANNED_LOSS_TYPES)
def test_planned_loss_equals_eager_loss(loss_type):
    """Same rates, same positions: the static-row loss and its gradients are the eager loss's."""
    B, L, noise = 4, 12, LogLinearNoise(EPS)
    model, twin = loss_model(), loss_model()
    planner = MaskPlanner(loss_type, noise, L, sampling_eps=EPS)
    torch.manual_seed(4)
    batch = torch.randint(0, LOSS_TOKENS, (B, L))
    plan = planner.draw(B)
    keys = torch.rand(B, L, dtype=torch.float64)
    static = planned_loss(model, loss_type, noise, batch, keys, plan.counts, plan.rate, plan.total + 5)
    eager = EAGER[loss_type](twin, batch, noise, plan, mask_k_random(batch, plan.counts, twin.mask_id, keys))
    assert static.dtype == eager.dtype
    assert_close(static, eager, rtol=1e-5, atol=1e-5, name=loss_type)
    static.sum().backward()
    eager.sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, name=name)


# ---- the capacity --------------------------------------------------------------------------------------------
def test_capacity_from_the_count_distribution():
    """lambda_DCE (decoupled): E[N] = L B / 2 and Var[N] = L^2 / (12 B) + L (B / 6 - 1 / (6 B)) in
    closed form; the capacity is mean + 8 sd up to a multiple of 128, and never overflows in 500
    draws at the published micro-batch (32 x 1024)."""
    B, L = 32, 1024
    planner = MaskPlanner("lambda_DCE", LogLinearNoise(), L)
    mean, var = planner.count_moments(B)
    exact_var = L * L / (12 * B) + L * (B / 6 - 1 / (6 * B))
    assert abs(mean - L * B / 2) < 0.01 * math.sqrt(exact_var)
    assert abs(var / exact_var - 1) < 0.1
    capacity = planner.capacity(B)
    assert capacity % 128 == 0 and mean + 8 * math.sqrt(var) <= capacity < mean + 8 * math.sqrt(var) + 128
    torch.manual_seed(5)
    assert max(planner.draw(B).total for _ in range(500)) <= capacity
    k_planner = MaskPlanner("k_DCE", None, 64)
    assert k_planner.count_moments(4) == (4 * 65 / 2, 4 * (64 * 64 - 1) / 12)
    assert k_planner.capacity(4) == 4 * 64  # mean + 8 sd is past B * L: capped


# ---- one graph -----------------------------------------------------------------------------------------------
def test_loss_compiles_to_one_graph():
    """The static-row loss traces as one graph: nothing in it needs the host."""
    B, L, noise = 2, 16, LogLinearNoise(EPS)
    model = loss_model(length=L)
    plan = MaskPlanner("lambda_DCE", noise, L).draw(B)
    model.rotary_emb(L, model.device)
    explained = torch._dynamo.explain(planned_loss)(model, "lambda_DCE", noise, torch.randint(0, LOSS_TOKENS, (B, L)),
                                                     torch.rand(B, L, dtype=torch.float64), plan.counts, plan.rate, 20)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
