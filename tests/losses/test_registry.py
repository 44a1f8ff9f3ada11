"""The loss table (radd_fast/losses/registry.py) and get_loss_fn, the published entry point that reads
it: unknown names and bad arguments are refused with the valid choices, and the ``train`` flag sets
the model's mode. Each entry is the whole truth about its loss: its static-row form (the masking law and
the loss per masked row that the static-shape training step and ``static_rows`` evaluation run) or, in
``no_static_rows``, why it has none; the planned list is read from the table; a new entry reaches the
static-row path without an edit to ``losses/static_rows.py``; the static-row path refuses an entry
without a form by name (``NoStaticRowForm``)."""
from __future__ import annotations

import re

import pytest
import torch

from radd_fast import LogLinearNoise
from radd_fast.acceleration import Acceleration
from radd_fast.evaluation.ppl import make_loss_fn
from radd_fast.losses import get_loss_fn, registry, static_rows
from radd_fast.losses.dce import lambda_dce, lambda_dce_plan_rows
from radd_fast.losses.masking import RATE_MASKING, MaskingLaw
from radd_fast.losses.registry import LOSSES, PLANNED_LOSS_TYPES, LossSpec, NoStaticRowForm, StaticRowForm
from radd_fast.losses.static_rows import MaskPlanner, StaticRowLoss, StaticRows, planned_loss
from radd_fast.training.step import ExactLossModule, PlannedLossModule, TrainStep
from tests.support.models import LOSS_TOKENS, loss_model, zero_head_model

N_REAL = 6
V = N_REAL + 1
B, L = 8, 12


@pytest.fixture(scope="module")
def model():
    return zero_head_model(N_REAL)


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


# ---------------------------------------------------------------------------- the static-row form or its refusal
B, L = 3, 16


# ---------------------------------------------------------------------------- every entry says
@pytest.mark.parametrize("name", list(LOSSES))
def test_every_entry_has_a_static_row_form_or_an_explicit_refusal(name):
    spec = LOSSES[name]
    if spec.static_rows is not None:
        assert isinstance(spec.static_rows, StaticRowForm) and not spec.no_static_rows
        assert isinstance(spec.static_rows.masking, MaskingLaw) and callable(spec.static_rows.rows)
        assert spec.static_row_form() is spec.static_rows
        assert spec.static_rows.masking.takes_time_sampler == (spec.time_sampler is not None)
    else:
        assert isinstance(spec.no_static_rows, str) and spec.no_static_rows.strip(), "a refusal gives its reason"
        with pytest.raises(NoStaticRowForm, match=re.escape(spec.no_static_rows)):
            spec.static_row_form()


def test_the_planned_list_is_the_entries_with_a_form():
    with_form = tuple(name for name, spec in LOSSES.items() if spec.static_rows is not None)
    assert PLANNED_LOSS_TYPES == with_form == registry.planned_loss_types()
    assert static_rows.PLANNED_LOSS_TYPES == with_form  # the static-row module keeps no list of its own
    assert set(with_form) == {"t_DSE", "t_DCE", "lambda_DCE", "k_DCE"}
    assert all(registry.has_static_rows(name) == (name in with_form) for name in LOSSES)


def test_an_entry_must_choose():
    """Neither a form nor a reason (the old silent fallback), or both: refused when the entry is built."""
    form = StaticRowForm(RATE_MASKING, lambda_dce_plan_rows)
    with pytest.raises(TypeError, match="exactly one of static_rows"):
        LossSpec("silent", lambda_dce, time_sampler="decoupled")
    with pytest.raises(TypeError, match="exactly one of static_rows"):
        LossSpec("both", lambda_dce, time_sampler="decoupled", static_rows=form, no_static_rows="because")
    with pytest.raises(TypeError, match="takes time sampler"):  # its law draws from a time sampler it lacks
        LossSpec("no_sampler", lambda_dce, static_rows=form)


# ---------------------------------------------------------------------------- a toy entry flows through
class HalfMasking(MaskingLaw):
    """A law static_rows.py has never seen: every token masked w.p. 1/2, the rate 1/2."""

    takes_time_sampler = False

    def rates(self, planner, batch_size, generator):
        return torch.full((batch_size,), 0.5), torch.full((batch_size,), 0.5, dtype=torch.float64)


def toy_rows(logp, seq, rate, counts, length, noise):
    """Twice lambda_DCE's row term (a power of two: the sums scale exactly)."""
    return 2 * lambda_dce_plan_rows(logp, seq, rate, counts, length, noise)


def toy_fn(model, batch, noise=None):
    return 2 * lambda_dce(model, batch, noise, lam=torch.full((batch.shape[0],), 0.5))


@pytest.fixture
def toy_table(monkeypatch):
    """The table with two toy entries, one with a form and one refusing (a temporary copy)."""
    table = dict(LOSSES)
    table["toy_DCE"] = LossSpec("toy_DCE", toy_fn, static_rows=StaticRowForm(HalfMasking(), toy_rows))
    table["toy_exact"] = LossSpec("toy_exact", LOSSES["ar_forward"].fn, exact=True,
                                  no_static_rows="a toy whose fn is static already")
    monkeypatch.setattr(registry, "LOSSES", table)
    return table


def test_a_toy_entry_flows_into_the_static_row_path(toy_table):
    noise = LogLinearNoise()
    assert "toy_DCE" in registry.planned_loss_types() and "toy_exact" not in registry.planned_loss_types()
    planner = MaskPlanner("toy_DCE", noise, L)
    torch.manual_seed(0)
    plan = planner.draw(B)
    assert torch.equal(plan.rate, torch.full((B,), 0.5)) and ((plan.counts >= 0) & (plan.counts <= L)).all()
    assert planner.count_moments(B) == (B * L * 0.5, B * L * 0.25)  # p constant: the binomial's own moments

    # the loss at the plan: twice lambda_DCE's at the same inputs, bit for bit
    model = loss_model(length=L)
    batch = torch.randint(0, LOSS_TOKENS, (B, L))
    keys = torch.rand(B, L, dtype=torch.float64)
    capacity = max(planner.capacity(B), plan.total)
    args = (noise, batch, keys, plan.counts, plan.rate, capacity)
    with torch.no_grad():
        toy, lam = planned_loss(model, "toy_DCE", *args), planned_loss(model, "lambda_DCE", *args)
    assert torch.equal(toy, 2 * lam)

    # the shared sequence, the training step and the static-row evaluation all take it
    rows = StaticRows("toy_DCE", noise)
    assert rows.inputs(batch).capacity >= 1 and rows.planners[L].masking is toy_table["toy_DCE"].static_rows.masking
    stepper = TrainStep(model, noise, "toy_DCE")
    assert stepper.rows is not None and isinstance(stepper.module, PlannedLossModule)
    loss = stepper.micro_batch(batch, weight=1.0)
    assert torch.isfinite(loss)
    scored = make_loss_fn(model, noise, "toy_DCE", static_rows=True)
    assert isinstance(scored, StaticRowLoss) and scored(model, batch).shape == (B,)


def test_a_refusing_entry_trains_and_scores_through_its_own_fn(toy_table):
    """The entry's no_static_rows is the choice read by the training step and static_rows evaluation."""
    model, noise = loss_model(length=L), LogLinearNoise()
    stepper = TrainStep(model, noise, "toy_exact")
    assert stepper.rows is None and stepper.planner is None and isinstance(stepper.module, ExactLossModule)
    assert stepper.module.fn is toy_table["toy_exact"].fn
    assert not isinstance(make_loss_fn(model, noise, "toy_exact", static_rows=True), StaticRowLoss)


# ---------------------------------------------------------------------------- the named refusal
@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.static_rows is None])
def test_the_static_row_path_refuses_an_entry_without_a_form_by_name(name):
    model, noise = loss_model(length=L), LogLinearNoise()
    assert issubclass(NoStaticRowForm, ValueError)
    with pytest.raises(NoStaticRowForm, match=f"{name}.*has no static-row form"):
        MaskPlanner(name, noise, L)
    with pytest.raises(NoStaticRowForm):
        StaticRows(name, noise)
    with pytest.raises(NoStaticRowForm):
        StaticRows(name, noise, length=L)
    with pytest.raises(NoStaticRowForm):
        StaticRowLoss(model, noise, name, 1e-3, Acceleration(False, False))
    with pytest.raises(NoStaticRowForm):
        static_rows.row_values(name, noise, torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.ones(1),
                               torch.ones(1, dtype=torch.long), L)
