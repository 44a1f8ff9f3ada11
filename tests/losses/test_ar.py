"""The autoregressive losses (radd_fast/losses/ar.py): each order against a direct loop of one masked
pass per position, values and gradients; the NLL is exact (a normalised distribution); ar_random's
orders are uniform permutations."""
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from radd_fast.losses import ar_nll, get_loss_fn
from radd_fast.losses.ar import random_orders
from tests.support.gradients import compare
from tests.support.models import LOSS_TOKENS, loss_model


def direct_ar(model, batch, order):
    nll = torch.zeros(batch.shape[0])
    for b in range(batch.shape[0]):
        for i in range(batch.shape[1]):
            x = batch[b:b + 1].clone()
            x[0, order[b, i:]] = model.mask_id
            nll[b] -= model(x)[0, order[b, i], batch[b, order[b, i]]]
    return nll


@pytest.mark.parametrize("loss_type", ["ar_forward", "ar_backward", "ar_random"])
def test_ar_losses_match_direct_loop(loss_type):
    model = loss_model()
    batch = torch.randint(0, LOSS_TOKENS, (2, 5))
    torch.manual_seed(7)
    value = get_loss_fn(None, model.vocab_size, train=True, loss_type=loss_type)(model, batch)
    torch.manual_seed(7)
    order = {"ar_forward": torch.arange(5).expand(2, 5), "ar_backward": torch.arange(5).flip(0).expand(2, 5),
             "ar_random": torch.rand(2, 5).argsort(-1)}[loss_type]
    compare(model, value, direct_ar(model, batch, order), loss_type)


def test_ar_nll_is_a_normalised_distribution():
    """sum over all V'^L sequences of exp(-NLL) = 1 for any fixed order: the NLL is exact."""
    model = loss_model(tokens=3, length=3)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=3)))  # [27, 3]
    for order in (torch.arange(3), torch.tensor([2, 0, 1])):
        with torch.no_grad():
            nll = ar_nll(model, seqs, order.expand(27, 3))
        assert abs(torch.exp(-nll.double()).sum().item() - 1) < 1e-5


def test_ar_random_orders_are_uniform_permutations():
    """ar_random's one random draw: every order of 3 positions equally likely."""
    torch.manual_seed(6)
    orders = random_orders(12_000, 3)
    codes = (orders * torch.tensor([9, 3, 1])).sum(-1).numpy()
    counts = np.bincount(codes, minlength=27)
    perms = [9 * a + 3 * b + c for a, b, c in itertools.permutations(range(3))]
    assert counts.sum() == counts[perms].sum() == 12_000
    assert stats.chisquare(counts[perms]).pvalue > 1e-4
