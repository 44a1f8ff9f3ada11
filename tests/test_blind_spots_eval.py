"""Zero-shot perplexity: the helpers' exact values and messages, and evaluate_ppl's bookkeeping
(found by mutation testing, issue 17). Each expectation is written out by hand or in closed form."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from radd_fast.evaluation import ppl as ppl_mod
from radd_fast.evaluation.ppl import (
    PPLResult,
    batch_estimate,
    batch_tokens,
    check_loss_type,
    default_mc_batching,
    evaluate_ppl,
    mc_per_forward,
    ppl_standard_error,
)
from radd_fast.noise import get_noise
from tests.test_eval import L, batches, tiny_model

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(scope="module")
def uniform():
    """A zero head: every masked token costs log 256 exactly, so k_DCE's draws are all L log 256."""
    model = tiny_model(zero_head=True)
    return model, get_noise(model.config)


# ---------------------------------------------------------------------------- the standard error
def test_standard_error_by_the_delta_method():
    # mean 4 over L = 2: PPL e^2; Var(mean) = (0.04 + 0.05) / 2^2; se = e^2 * 0.3 / 2 / 2
    assert ppl_standard_error([3.0, 5.0], [0.04, 0.05], 2) == pytest.approx(math.e ** 2 * 0.075, rel=1e-12)
    assert ppl_standard_error([6.0], [0.16], 3) == pytest.approx(math.e ** 2 * 0.4 / 3, rel=1e-12)
    assert ppl_standard_error([3.0, 5.0], [0.0, 0.0], 2) == 0.0
    assert ppl_standard_error([], [], 2) is None
    assert ppl_standard_error([3.0, 5.0], [0.04], 2) is None
    assert ppl_standard_error([3.0, 5.0], [0.04, math.nan], 2) is None


def test_result_properties():
    r = PPLResult(ppl=math.e, mean_loss=8 * math.log(2), length=4, loss_type="k_DCE", mc_timesteps=3,
                  num_batches=2, num_sequences=10, batch_losses=[1.0, 2.0], batch_vars=[0.5, 0.5], seconds=2.0)
    assert r.bits_per_token == pytest.approx(2.0, rel=1e-12)
    assert r.sequences_timesteps_per_s == pytest.approx(15.0)
    assert PPLResult(1.0, 0.0, 1, "k_DCE", 1, 1, 4, seconds=0.0).sequences_timesteps_per_s == pytest.approx(4e9)
    d = r.to_dict()
    assert d["bits_per_token"] == r.bits_per_token and d["sequences_timesteps_per_s"] == 15.0
    assert d["ppl_stderr"] == r.ppl_stderr and d["ppl"] == math.e and d["mc_per_forward"] == 1


# ---------------------------------------------------------------------------- argument checks
def _value_error(fn, *args) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args)
    return str(e.value)


def test_loss_type_messages():
    assert _value_error(check_loss_type, "nope", 1).startswith("unknown loss type 'nope'; expected one of t_DSE, ")
    assert _value_error(check_loss_type, "k_DCE", 0) == "monte_carlo_timesteps must be >= 1, got 0"
    assert _value_error(check_loss_type, "ar_forward", 2) == (
        "loss type ar_forward is an exact NLL (one generation order, L forward passes, no noise): "
        "use monte_carlo_timesteps 1, got 2")
    check_loss_type("ar_forward", 1)
    check_loss_type("k_DCE", 1)


def test_batch_tokens_accepts_tensors_dicts_and_tuples():
    x = torch.zeros(2, 5, dtype=torch.long)
    assert batch_tokens(x) is x
    assert batch_tokens({"input_ids": x, "mask": None}) is x
    assert batch_tokens((x, "label")) is x and batch_tokens([x]) is x
    assert _value_error(batch_tokens, {"ids": x, "a": 1}) == "batch dict has no 'input_ids' (keys: ['a', 'ids'])"
    assert _value_error(batch_tokens, x[0]) == "expected a [B, L] token tensor per batch, got Tensor (5,)"
    assert _value_error(batch_tokens, ["text"]) == "expected a [B, L] token tensor per batch, got str "


# ---------------------------------------------------------------------------- Monte Carlo batching
def test_mc_batching_defaults_to_cuda_only():
    assert default_mc_batching(GPU) and default_mc_batching("cuda")
    assert not default_mc_batching(CPU) and not default_mc_batching("meta")


def test_draws_per_forward():
    # the token budget: 2^13 tokens on the CPU, 2^17 on CUDA, the CPU's for any other device
    assert mc_per_forward(CPU, (4, 16), 1000, "k_DCE", None, True) == 128
    assert mc_per_forward(GPU, (4, 16), 5000, "k_DCE", None, True) == 2048
    assert mc_per_forward(torch.device("meta"), (4, 16), 1000, "k_DCE", None, True) == 128
    assert mc_per_forward(CPU, (4, 16), 100, "k_DCE", None, True) == 100  # never more than the draws
    assert mc_per_forward(CPU, (4, 16), 8, "k_DCE", 200, True) == 3
    assert mc_per_forward(CPU, (4, 16), 8, "k_DCE", 10, True) == 1  # at least one
    assert mc_per_forward(CPU, (0, 16), 8, "k_DCE", 10, True) == 8  # an empty batch: the budget over 1 token
    assert mc_per_forward(CPU, (4, 16), 8, "k_DCE", 200, False) == 1  # batching off: the published loop
    assert mc_per_forward(CPU, (4, 16), 1, "ar_forward", 200, True) == 1  # exact losses: one pass


class CountingLoss:
    """loss_fn(model, x [R, L]) -> [R]: row r of draw j is base[r % B] + j (draws numbered from 0)."""

    def __init__(self, base: torch.Tensor):
        self.base, self.draw, self.shapes = base, 0, []

    def __call__(self, model, xs):
        B = self.base.shape[0]
        reps = xs.shape[0] // B
        self.shapes.append(tuple(xs.shape))
        out = torch.cat([self.base + self.draw + j for j in range(reps)]).float()
        self.draw += reps
        return out


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_batch_estimate_in_closed_form(k):
    """5 draws with per-draw means m + j (j = 0..4): the mean m + 2; the variance of the draw
    means is Var{0..4} = 2.5, over 5 draws 0.5; draws run k at a time (the last chunk short)."""
    base = torch.tensor([1.0, 2.0, 6.0])
    fn = CountingLoss(base)
    x = torch.arange(3 * 4).view(3, 4)
    mean, var = batch_estimate(fn, None, x, 5, k)
    assert mean.dtype == torch.float64 and mean.item() == pytest.approx(3.0 + 2.0, rel=1e-12)
    assert var.item() == pytest.approx(0.5, rel=1e-12)
    reps = [min(k, 5 - done) for done in range(0, 5, k)]
    assert fn.shapes == [(3 * r, 4) for r in reps]


def test_batch_estimate_of_one_draw_has_no_variance():
    """One draw: NaN, without asking torch for the variance of one value (which warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, var = batch_estimate(CountingLoss(torch.tensor([1.0, 3.0])), None, torch.zeros(2, 4), 1, 4)
    assert mean.item() == 2.0 and math.isnan(var.item()) and var.dtype == torch.float64
    # two draws with means m and m + 1: Var{0, 1} = 0.5, over 2 draws 0.25
    mean, var = batch_estimate(CountingLoss(torch.tensor([1.0, 3.0])), None, torch.zeros(2, 4), 2, 1)
    assert mean.item() == 2.5 and var.item() == pytest.approx(0.25, rel=1e-12)


def test_evaluation_graphs_only_for_the_static_row_loss():
    """On CUDA the policy's default turns graphs on; the eager loss (shapes change every batch) never
    gets them, the static-row loss does (decided without a GPU: the policy is pure)."""
    gpu = torch.device("cuda")
    assert ppl_mod.evaluation_acceleration(gpu, False, False, None).cuda_graphs is False
    assert ppl_mod.evaluation_acceleration(gpu, False, "auto", False) == ppl_mod.Acceleration(True, False)
    assert ppl_mod.evaluation_acceleration(gpu, True, False, None).cuda_graphs is True
    assert ppl_mod.evaluation_acceleration(gpu, True, False, False).cuda_graphs is False


def test_batch_replicas_are_copies_in_order():
    """Replicated draws see the batch c times, copy c in rows c B .. (c + 1) B - 1."""
    seen = []

    def record(model, xs):
        seen.append(xs.clone())
        return torch.zeros(xs.shape[0])

    x = torch.arange(6).view(2, 3)
    batch_estimate(record, None, x, 3, 3)
    assert torch.equal(seen[0], torch.cat([x, x, x]))


# ---------------------------------------------------------------------------- evaluate_ppl
def test_evaluate_ppl_bookkeeping(uniform):
    model, noise = uniform
    data = batches(n=4, b=3)
    res = evaluate_ppl(model, noise, data, "k_DCE", 3, max_batches=2, mc_batching=True, token_budget=2 * 3 * L,
                       progress=False)
    assert res.num_batches == 2 and res.num_sequences == 6 and res.mc_per_forward == 2
    assert res.mc_timesteps == 3 and res.loss_type == "k_DCE" and res.length == L
    assert res.mean_loss == pytest.approx(L * math.log(256), rel=1e-6)
    assert res.ppl == pytest.approx(256.0, rel=1e-6) and len(res.batch_vars) == 2
    forced = evaluate_ppl(model, noise, data[:1], "k_DCE", 3, mc_chunk=3, mc_batching=False, progress=False)
    assert forced.mc_per_forward == 3  # mc_chunk wins over batching being off


def test_evaluate_ppl_unwraps_ddp_and_accepts_dict_batches(uniform):
    model, noise = uniform

    class Wrapper:  # what DDP looks like from here: the model under .module
        module = model

    data = [{"input_ids": x} for x in batches(n=1)]
    res = evaluate_ppl(Wrapper(), noise, data, "k_DCE", 1, progress=False)
    assert res.ppl == pytest.approx(256.0, rel=1e-6)


def test_evaluate_ppl_refuses_mixed_lengths(uniform):
    model, noise = uniform
    data = [torch.zeros(2, L, dtype=torch.long), torch.zeros(2, L // 2, dtype=torch.long)]
    assert _value_error(lambda: evaluate_ppl(model, noise, data, "k_DCE", 1, progress=False)) == (
        f"batch 1 has length {L // 2}, earlier batches {L}: one block length per run")


def test_evaluate_ppl_graphs_need_static_rows(uniform):
    model, noise = uniform
    with pytest.raises(ValueError) as e:
        evaluate_ppl(model, noise, batches(n=1), "k_DCE", 1, cuda_graphs=True, progress=False)
    assert str(e.value) == "cuda_graphs=True needs static_rows=True (the eager loss's masked rows change shape every batch)"


def test_non_finite_message():
    with pytest.raises(ppl_mod.NonFiniteLoss) as e:
        ppl_mod.check_finite(torch.tensor(float("inf")), "batch 3")
    assert str(e.value) == ("the loss of batch 3 is inf: the model's weights or outputs are not finite "
                            "(a diverged or corrupt checkpoint?); no perplexity reported")
    ppl_mod.check_finite(torch.tensor(1.5), "batch 0")


def test_length_hint_for_the_progress_bar():
    assert ppl_mod._length_hint([1, 2, 3], None) == 3
    assert ppl_mod._length_hint([1, 2, 3], 2) == 2 and ppl_mod._length_hint([1, 2, 3], 5) == 3
    assert ppl_mod._length_hint(iter([1, 2]), 7) == 7 and ppl_mod._length_hint(iter([1]), None) is None


# ---------------------------------------------------------------------------- the loss functions
def _draw(fn, model, x, seed: int = 5) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return fn(model, x)


def test_eager_loss_fn_is_the_evaluation_loss_with_its_arguments():
    """make_loss_fn's eager loss is get_loss_fn(train=False) with the same eps and time sampler (the
    default eps 1e-3); it leaves the model in eval mode."""
    model = tiny_model()
    noise = get_noise(model.config)
    x = batches(n=1, b=4)[0]
    loss_fn = ppl_mod.make_loss_fn(model, noise, "t_DCE")
    assert not isinstance(loss_fn, ppl_mod.StaticRowLoss)
    model.train()
    ours = _draw(loss_fn, model, x)
    assert not model.training
    reference = ppl_mod.get_loss_fn(noise, model.vocab_size, train=False, sampling_eps=1e-3, loss_type="t_DCE")
    assert torch.equal(ours, _draw(reference, model, x))
    for kwargs in ({"sampling_eps": 0.4}, {"time_sampler": "naive"}):
        ours = _draw(ppl_mod.make_loss_fn(model, noise, "t_DCE", **kwargs), model, x)
        theirs = _draw(ppl_mod.get_loss_fn(noise, model.vocab_size, train=False, loss_type="t_DCE", **kwargs), model, x)
        assert torch.equal(ours, theirs), kwargs
        assert not torch.equal(ours, _draw(reference, model, x)), f"{kwargs} changed nothing"


def test_static_row_loss_only_for_the_planned_losses():
    model = tiny_model()
    noise = get_noise(model.config)
    static = ppl_mod.make_loss_fn(model, noise, "k_DCE", static_rows=True, time_sampler=None)
    assert isinstance(static, ppl_mod.StaticRowLoss)
    assert static.graphs.enabled is False and static.graphs.fn == static._loss  # default: eager, no graphs
    assert static.graphs.what == "the static-row evaluation loss" and static.overflows == 0
    assert not isinstance(ppl_mod.make_loss_fn(model, noise, "ar_forward", static_rows=True), ppl_mod.StaticRowLoss)
    timed = ppl_mod.make_loss_fn(model, noise, "t_DCE", static_rows=True, sampling_eps=0.2, time_sampler="naive")
    assert timed.time_sampler == "naive" and timed.sampling_eps == 0.2
    x = batches(n=1, b=4)[0]
    timed(model, x)
    assert timed.planners[L].sampler is ppl_mod.MaskPlanner("t_DCE", noise, L, 0.2, "naive").sampler
    assert timed.planners[L].sampling_eps == 0.2


def test_static_row_loss_counts_its_overflows(monkeypatch):
    """A draw with more masked tokens than the capacity runs eagerly at its own size, counted."""
    model = tiny_model()
    noise = get_noise(model.config)
    loss = ppl_mod.make_loss_fn(model, noise, "k_DCE", static_rows=True)
    x = batches(n=1, b=4)[0]
    loss(model, x)
    assert loss.overflows == 0
    monkeypatch.setattr(ppl_mod.MaskPlanner, "capacity", lambda self, batch_size: 1)  # k_DCE masks >= 1 a row
    values = [loss(model, x) for _ in range(3)]
    assert loss.overflows == 3 and all(v.shape == (4,) and torch.isfinite(v).all() for v in values)


def test_compile_body_switches_off_the_range_check_and_compiles_statically(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append((fn, kwargs)) or "compiled")
    model = tiny_model()
    body = model.hidden
    assert ppl_mod.compile_body(model) is model
    assert model.validate_inputs is False and model.hidden == "compiled"
    assert seen == [(body, {"dynamic": False})]


# ---------------------------------------------------------------------------- over ranks
def test_results_gathered_over_ranks(monkeypatch):
    """Two ranks (all_gather_object emulated): per-batch values in rank order, sequences summed, one
    length; a rank without batches adds nothing; two lengths are refused."""
    def gather_with(other):
        def all_gather_object(parts, mine):
            parts[0], parts[1] = mine, other
        monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    losses, variances = [torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)], \
        [torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)]
    gather_with(([3.0], [0.3], 2, 16))
    assert ppl_mod._gather(losses, variances, 5, 16) == ([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], 7, 16)
    gather_with(([], [], 0, None))
    assert ppl_mod._gather(losses, variances, 5, 16) == ([1.0, 2.0], [0.1, 0.2], 5, 16)
    assert ppl_mod._gather([], [], 0, None) == ([], [], 0, None)
    gather_with(([3.0], [0.3], 2, 8))
    assert _value_error(ppl_mod._gather, losses, variances, 5, 16) == "ranks evaluated different block lengths [8, 16]"
