"""log p(continuation | context) (radd_fast/integrations/likelihood.py): the exact left-to-right value is
the model's own forward revealed token by token (and ar_forward's when the continuation fills the
window); the Monte Carlo ELBO is k-DCE on the continuation, whose mean is the order-averaged likelihood."""
import itertools
import math

import pytest
import torch

from radd_fast.integrations.likelihood import (
    LikelihoodError,
    left_to_right_log_likelihood,
    monte_carlo_log_likelihood,
)
from radd_fast.losses.ar import ar_forward
from tests.support.models import loss_model

TOKENS, LENGTH = 11, 16  # the losses' model: V = 12, 2 blocks, weights moved by 0.3


@pytest.fixture
def model():
    return loss_model().eval()


def _log_probs(model, row: list[int]) -> torch.Tensor:
    """The published forward's log-probs [L, V] of one row: ``row``, then MASK up to L."""
    x = torch.full((1, LENGTH), model.mask_id, dtype=torch.int64)
    x[0, :len(row)] = torch.tensor(row, dtype=torch.int64)
    with torch.no_grad():
        return model(x)[0]


def _requests():
    g = torch.Generator().manual_seed(3)
    draw = lambda n: torch.randint(0, TOKENS, (n,), generator=g).tolist()
    # empty context, one-token continuation, a context cut to fit, a continuation filling the window
    return [([], draw(3)), (draw(5), draw(1)), (draw(20), draw(4)), (draw(7), draw(9)), ([], [])]


def test_left_to_right_reveals_the_continuation_token_by_token(model):
    requests = _requests()
    got = left_to_right_log_likelihood(model, requests, rows_per_forward=5)
    for (ctx, cont), (value, greedy) in zip(requests, got):
        ctx = ctx[max(0, len(ctx) - (LENGTH - len(cont))):]  # the oldest context tokens leave the window
        want, argmax = 0.0, True
        for j, token in enumerate(cont):
            logp = _log_probs(model, ctx + cont[:j])[len(ctx) + j]  # cont[j:] and after: MASK
            want += float(logp[token])
            argmax &= int(logp[:-1].argmax()) == token
        assert value == pytest.approx(want, abs=1e-4) and greedy == argmax
    assert got[-1] == (0.0, True)


def test_a_continuation_filling_the_window_scores_ar_forward(model):
    cont = torch.randint(0, TOKENS, (1, LENGTH), generator=torch.Generator().manual_seed(5))
    [(value, _)] = left_to_right_log_likelihood(model, [([], cont[0].tolist())])
    with torch.no_grad():
        assert value == pytest.approx(-float(ar_forward(model, cont)[0]), abs=1e-4)


def test_batching_does_not_change_a_value(model):
    requests = _requests()
    one = left_to_right_log_likelihood(model, requests, rows_per_forward=1)
    many = left_to_right_log_likelihood(model, requests, rows_per_forward=64)
    assert [g for _, g in one] == [g for _, g in many]
    torch.testing.assert_close([v for v, _ in one], [v for v, _ in many], rtol=0, atol=1e-5)
    mc = monte_carlo_log_likelihood(model, requests, draws=6, seed=1, rows_per_forward=7)
    shuffled = monte_carlo_log_likelihood(model, requests[::-1], draws=6, seed=1, rows_per_forward=3)[::-1]
    torch.testing.assert_close(mc, shuffled, rtol=0, atol=1e-5)  # each request has its own seeded draws


def test_one_token_continuations_have_one_elbo_draw_the_exact_value(model):
    requests = [(ctx, cont[:1]) for ctx, cont in _requests()[:4]]
    exact = [v for v, _ in left_to_right_log_likelihood(model, requests)]
    torch.testing.assert_close(monte_carlo_log_likelihood(model, requests, draws=3), exact, rtol=0, atol=1e-5)


def test_the_elbo_is_k_dce_on_the_continuation_and_averages_the_orders(model):
    """Its law enumerated (k uniform in 1..n, then a uniform k-subset) has the mean of the
    order-averaged likelihood; 1000 draws land within 5 standard errors of it."""
    ctx, cont = [1, 2, 3, 4], [5, 6, 7]
    c, n = len(ctx), len(cont)
    tokens = ctx + cont

    def masked_value(subset):  # n / k * sum of log p over the masked continuation positions
        logp = _log_probs(model, [model.mask_id if i - c in subset else t for i, t in enumerate(tokens)])
        return n / len(subset) * sum(float(logp[c + i, cont[i]]) for i in subset)

    law = [(masked_value(s), 1 / n / math.comb(n, k)) for k in range(1, n + 1)
           for s in itertools.combinations(range(n), k)]
    mean = sum(v * p for v, p in law)
    sd = math.sqrt(sum((v - mean) ** 2 * p for v, p in law))
    orders = []
    for order in itertools.permutations(range(n)):
        total, shown = 0.0, set()
        for i in order:
            row = [t if j < c or j - c in shown else model.mask_id for j, t in enumerate(tokens)]
            total += float(_log_probs(model, row)[c + i, cont[i]])
            shown.add(i)
        orders.append(total)
    assert mean == pytest.approx(sum(orders) / len(orders), abs=1e-4)
    [estimate] = monte_carlo_log_likelihood(model, [(ctx, cont)], draws=1000, seed=2, rows_per_forward=500)
    assert abs(estimate - mean) < 5 * sd / math.sqrt(1000)


def test_requests_the_model_cannot_score_are_named(model):
    with pytest.raises(LikelihoodError, match="request 1: the continuation has 17 tokens"):
        left_to_right_log_likelihood(model, [([], [1]), ([], [1] * 17)])
    with pytest.raises(LikelihoodError, match=r"request 0: token ids must be in \[0, 11\)"):
        left_to_right_log_likelihood(model, [([1], [11])])
    with pytest.raises(LikelihoodError, match="draws >= 1"):
        monte_carlo_log_likelihood(model, [([1], [2])], draws=0)
