"""The loss table (radd_fast/losses/registry.py) and get_loss_fn, the published entry point that reads
it: unknown names and bad arguments are refused with the valid choices, and the ``train`` flag sets
the model's mode."""
from __future__ import annotations

import pytest
import torch

from radd_fast import LogLinearNoise
from radd_fast.losses import get_loss_fn
from tests.support.models import loss_model, perturbed_model

N_REAL = 6
V = N_REAL + 1
B, L = 8, 12


@pytest.fixture(scope="module")
def model():
    m = perturbed_model(N_REAL, 16, zero_head=True).eval()  # the published init: a zero output layer
    assert not m.output_layer.linear.weight.detach().any()
    return m


@pytest.fixture
def batch():
    return torch.randint(0, N_REAL, (B, L), generator=torch.Generator().manual_seed(1))


def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown loss_type 'dce'.*lambda_DCE"):
        get_loss_fn(LogLinearNoise(), 12, train=True, loss_type="dce")
    with pytest.raises(ValueError, match="unknown time sampler"):
        get_loss_fn(LogLinearNoise(), 12, train=True, loss_type="t_DCE", time_sampler="sobol")
    with pytest.raises(ValueError, match="takes no time sampler"):
        get_loss_fn(LogLinearNoise(), 12, train=True, loss_type="k_DCE", time_sampler="vdm")
    with pytest.raises(ValueError, match="sampling_eps"):
        get_loss_fn(LogLinearNoise(), 12, train=True, loss_type="t_DCE", sampling_eps=1.5)


def test_get_loss_fn_checks_and_defaults(model, batch):
    with pytest.raises(ValueError, match=r"sampling_eps must be in \[0, 1\)"):
        get_loss_fn(LogLinearNoise(), V, train=False, sampling_eps=1.0)
    with pytest.raises(ValueError, match="takes no time sampler"):
        get_loss_fn(LogLinearNoise(), V, train=False, loss_type="k_DCE", time_sampler="vdm")
    with pytest.raises(ValueError, match="unknown time sampler 'uniform'"):
        get_loss_fn(LogLinearNoise(), V, train=False, loss_type="t_DCE", time_sampler="uniform")
    fn = get_loss_fn(LogLinearNoise(), V, train=True, loss_type="k_DCE")
    fn(model, batch)
    assert model.training and fn.loss_type == "k_DCE"
    model.eval()


def test_train_flag_sets_model_mode():
    model = loss_model()
    get_loss_fn(LogLinearNoise(), model.vocab_size, train=False)(model, torch.zeros(1, 3, dtype=torch.long))
    assert not model.training
    get_loss_fn(LogLinearNoise(), model.vocab_size, train=True)(model, torch.zeros(1, 3, dtype=torch.long))
    assert model.training
