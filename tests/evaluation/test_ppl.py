"""Zero-shot perplexity (radd_fast/evaluation/ppl.py): evaluate_ppl on both backends, with and without
Monte Carlo batching, every loss family and the static-capacity rows; and its helpers' exact values
and messages (the delta-method standard error, the draws per forward, the argument checks, the loss
functions, the gathering over ranks), each expectation written out by hand or in closed form.

A tiny byte-level model (256 tokens + MASK) with perturbed weights keeps everything offline and
fast. The fast backend runs with the Triton interpreter off, i.e. its PyTorch fallbacks: the kernels
have their own tests; here what is checked is the fast *path* (fused-loss entry point) and the
batched Monte Carlo draws.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from radd_fast.distributed import DistEnv
from radd_fast.evaluation import LOSS_TYPES, NonFiniteLossError, evaluate_ppl
from radd_fast.evaluation import ppl as ppl_mod
from radd_fast.evaluation.ppl import (
    PPLResult,
    batch_estimate,
    batch_tokens,
    check_loss_type,
    default_mc_batching,
    mc_per_forward,
    perplexity,
    ppl_standard_error,
)
from radd_fast.losses import get_loss_fn
from radd_fast.noise import get_noise
from tests.support.models import EVAL_LENGTH, eval_batches, eval_model

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(scope="module")
def model():
    return eval_model()

@pytest.fixture(scope="module")
def noise(model):
    return get_noise(model.config)

@pytest.fixture
def fast_fallbacks(monkeypatch):
    """The fast backend with its PyTorch fallbacks (the Triton interpreter is far too slow here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def uniform():
    """A zero head: every masked token costs log 256 exactly, so k_DCE's draws are all EVAL_LENGTH log 256."""
    model = eval_model(zero_head=True)
    return model, get_noise(model.config)


# -- evaluate_ppl --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["k_DCE", "ar_forward"])
def test_uniform_model_gives_vocab_size(loss_type, noise):
    """A zero-initialised head predicts uniformly over the 256 real tokens: both losses are then exact
    (k_DCE weighs k masked tokens by EVAL_LENGTH/k), so PPL = 256 whatever the draws."""
    res = evaluate_ppl(eval_model(zero_head=True), noise, eval_batches(), loss_type, 1, progress=False)
    assert res.ppl == pytest.approx(256.0, rel=1e-5)
    assert res.num_batches == 2 and res.num_sequences == 6 and res.length == EVAL_LENGTH

@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if not t.startswith("ar_")])
def test_finite_and_reproducible(loss_type, model, noise):
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(evaluate_ppl(model, noise, eval_batches(), loss_type, 2, progress=False))
    assert all(math.isfinite(r.ppl) and r.ppl > 1 for r in runs)
    assert runs[0].batch_losses == runs[1].batch_losses, "same seed must give the same losses"
    assert runs[0].batch_losses != runs[2].batch_losses, "another seed must give other draws"

def test_ar_forward_equals_sum_of_single_positions(model, noise):
    """ar_forward = sum over i of -log p(x_i | x_<i, MASK at i..L-1), computed here one position at a time."""
    (x,) = eval_batches(n=1)
    nll = torch.zeros(x.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i in range(EVAL_LENGTH):
            xi = x.clone()
            xi[:, i:] = model.mask_id
            logp = model(xi)[:, i, :-1]  # published layout: log-softmax over the real tokens
            nll -= logp.gather(1, x[:, i:i + 1]).squeeze(1).double()
    res = evaluate_ppl(model, noise, [x], "ar_forward", 1, progress=False)
    assert res.mean_loss == pytest.approx(nll.mean().item(), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll.mean().item() / EVAL_LENGTH), rel=1e-5)

def test_fast_backend_matches_reference_on_the_same_draws(model, noise, fast_fallbacks):
    """One draw per forward on both engines: the same random numbers, so the same losses."""
    out = {}
    for backend in ("reference", "fast"):
        m = eval_model().set_backend(backend)
        torch.manual_seed(3)
        out[backend] = evaluate_ppl(m, noise, eval_batches(), "t_DCE", 3, mc_chunk=1, progress=False)
    assert out["fast"].batch_losses == pytest.approx(out["reference"].batch_losses, rel=1e-5)

def test_batched_draws_equal_the_loop_in_expectation(noise, fast_fallbacks):
    """Monte Carlo batching replicates the batch k times per forward; its estimate must have the same mean as
    the published one-draw-per-forward loop. One batch repeated: per-batch values are iid estimates."""
    (x,) = eval_batches(n=1, b=4)
    stats = {}
    for backend, chunk in (("reference", 1), ("fast", 8)):
        m = eval_model().set_backend(backend)
        torch.manual_seed(11)
        res = evaluate_ppl(m, noise, [x] * 12, "k_DCE", 8, mc_chunk=chunk, progress=False)
        v = torch.tensor(res.batch_losses, dtype=torch.float64)
        stats[backend] = (v.mean().item(), v.var().item() / len(v))
        assert res.mc_per_forward == chunk
    (m_ref, var_ref), (m_fast, var_fast) = stats["reference"], stats["fast"]
    assert abs(m_ref - m_fast) < 4 * math.sqrt(var_ref + var_fast), stats

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_fast_backend_on_cuda(noise, dtype, rel):
    """The real kernels (fused masked loss, Triton norms / attention) against the fp32 reference,
    on the same draws; then the default batched-draw path runs and gives a finite PPL."""
    out = {}
    for backend, dt in (("reference", torch.float32), ("fast", dtype)):
        m = eval_model().to("cuda").set_backend(backend).set_compute_dtype(dt)
        torch.manual_seed(3)
        out[backend] = evaluate_ppl(m, noise.to("cuda"), [b.cuda() for b in eval_batches()], "t_DCE", 3, mc_chunk=1,
                                    progress=False)
    assert out["fast"].batch_losses == pytest.approx(out["reference"].batch_losses, rel=rel)
    res = evaluate_ppl(m, noise.to("cuda"), [b.cuda() for b in eval_batches()], "lambda_DCE", 8, progress=False)
    assert res.mc_per_forward == 8 and math.isfinite(res.ppl)

def test_mc_draws_per_forward_follow_the_token_budget(model, noise, fast_fallbacks):
    m = eval_model().set_backend("fast")
    res = evaluate_ppl(m, noise, eval_batches(n=1), "lambda_DCE", 5, mc_batching=True, token_budget=3 * EVAL_LENGTH * 2,
                       progress=False)
    assert res.mc_per_forward == 2  # budget of two replicas of a [3, 16] batch
    ref = evaluate_ppl(model, noise, eval_batches(n=1), "lambda_DCE", 5, progress=False)
    assert ref.mc_per_forward == 1  # default on CPU: the published loop

def test_mc_batching_is_an_option_not_the_backend(model, noise, fast_fallbacks):
    """Batching follows mc_batching (default: on for CUDA only), never the kernel backend."""
    fast = eval_model().set_backend("fast")
    assert evaluate_ppl(fast, noise, eval_batches(n=1), "lambda_DCE", 4, progress=False).mc_per_forward == 1
    on = evaluate_ppl(model, noise, eval_batches(n=1), "lambda_DCE", 4, mc_batching=True, progress=False)
    assert model.backend == "reference" and on.mc_per_forward == 4
    exact = evaluate_ppl(model, noise, eval_batches(n=1), "ar_forward", 1, mc_batching=True, progress=False)
    assert exact.mc_per_forward == 1

@pytest.mark.parametrize("mc_batching", [False, True])
def test_batched_and_looped_draws_give_the_closed_form(noise, mc_batching):
    """A zero output layer predicts uniformly over the 256 real tokens, so every masked token costs
    log 256. k_DCE masks exactly k tokens and weighs them EVAL_LENGTH/k: each draw is exactly EVAL_LENGTH log 256, so
    PPL = 256 whatever the draws, batched or not, with a zero Monte Carlo variance. lambda_DCE
    weighs the masked tokens by 1/lambda: its expectation is EVAL_LENGTH log 256 (PPL 256), its draws vary,
    so the estimate must be within a few of its own standard errors of 256."""
    m = eval_model(zero_head=True)
    torch.manual_seed(0)
    k = evaluate_ppl(m, noise, eval_batches(n=2, b=4), "k_DCE", 4, mc_batching=mc_batching, token_budget=2 * 4 * EVAL_LENGTH,
                     progress=False)
    assert k.mc_per_forward == (2 if mc_batching else 1)
    assert k.ppl == pytest.approx(256.0, rel=1e-6)
    assert k.ppl_stderr < 1e-4  # float32 rounding of the per-draw losses only
    lam = evaluate_ppl(m, noise, eval_batches(n=2, b=4), "lambda_DCE", 6, mc_batching=mc_batching, progress=False)
    assert lam.mc_per_forward == (6 if mc_batching else 1)
    assert lam.ppl_stderr > 100 * k.ppl_stderr and abs(lam.ppl - 256.0) < 5 * lam.ppl_stderr, (lam.ppl, lam.ppl_stderr)

def test_stderr_matches_an_independent_computation(model, noise):
    """The published loop by hand, one draw at a time with the same seed: per-batch means, the
    spread of the draws, and the delta-method standard error of exp(mean / EVAL_LENGTH)."""
    data, mc = eval_batches(n=3), 5
    torch.manual_seed(7)
    res = evaluate_ppl(model, noise, data, "lambda_DCE", mc, mc_batching=False, progress=False)
    loss_fn = get_loss_fn(noise, model.vocab_size, train=False, loss_type="lambda_DCE")
    torch.manual_seed(7)
    means, variances = [], []
    with torch.no_grad():
        for x in data:
            draws = np.array([loss_fn(model, x).double().mean().item() for _ in range(mc)])
            means.append(draws.mean())
            variances.append(draws.var(ddof=1) / mc)
    assert res.batch_losses == pytest.approx(means, rel=1e-9)
    ppl = math.exp(np.mean(means) / EVAL_LENGTH)
    se = ppl * math.sqrt(np.sum(variances) / len(means) ** 2) / EVAL_LENGTH
    assert res.ppl == pytest.approx(ppl, rel=1e-9) and res.ppl_stderr == pytest.approx(se, rel=1e-6)

def test_nan_weights_raise_instead_of_a_nan_ppl(noise):
    m = eval_model()
    with torch.no_grad():
        m.output_layer.linear.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="batch 0 is nan"):
        evaluate_ppl(m, noise, eval_batches(), "lambda_DCE", 2, progress=False)

def test_perplexity_of_any_finite_loss_is_a_number_or_inf():
    """exp(loss / tokens), and inf (not an OverflowError) past what a float holds (~709.78 nats per token)."""
    assert perplexity(3.0 * EVAL_LENGTH, EVAL_LENGTH) == math.exp(3.0)
    assert perplexity(709.0) == math.exp(709.0) and perplexity(710.0) == math.inf
    assert perplexity(1e300, 2) == math.inf and perplexity(-1e6) == 0.0
    assert math.isnan(perplexity(math.nan))
    assert ppl_standard_error([1e6, 2e6], [0.0, 0.0], 4) == math.inf  # not inf * 0 = nan


def test_an_absurd_finite_loss_gives_an_infinite_ppl(noise):
    """A head scaled by 1e5 (a corrupt checkpoint's kind of weights): a finite mean loss of millions of
    nats, far past exp's range, reported as PPL inf with an infinite standard error."""
    m = eval_model()
    with torch.no_grad():
        m.output_layer.linear.weight.mul_(1e5)
        m.output_layer.linear.bias.mul_(1e5)
    res = evaluate_ppl(m, noise, eval_batches(n=2), "lambda_DCE", 2, progress=False)
    assert math.isfinite(res.mean_loss) and res.mean_loss / EVAL_LENGTH > 710
    assert res.ppl == math.inf and res.ppl_stderr == math.inf


def test_evaluate_ppl_errors(model, noise):
    with pytest.raises(ValueError, match="unknown loss type 'nope'"):
        evaluate_ppl(model, noise, eval_batches(), "nope", 1, progress=False)
    with pytest.raises(ValueError, match="monte_carlo_timesteps 1"):
        evaluate_ppl(model, noise, eval_batches(), "ar_backward", 4, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        evaluate_ppl(model, noise, [], "lambda_DCE", 1, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's length"):
        evaluate_ppl(model, noise, [torch.zeros(2, 64, dtype=torch.long)], "lambda_DCE", 1, progress=False)

def test_model_mode_is_restored(model, noise):
    m = eval_model().train()
    evaluate_ppl(m, noise, eval_batches(n=1), "lambda_DCE", 1, progress=False)
    assert m.training

@pytest.mark.parametrize("mc_batching", [False, True])
def test_static_rows_give_the_closed_form_too(noise, mc_batching):
    """The training step's static-capacity masked rows (same law, other random stream): k_DCE exactly
    EVAL_LENGTH log 256 per draw, lambda_DCE within its own standard errors of 256."""
    m = eval_model(zero_head=True)
    torch.manual_seed(0)
    k = evaluate_ppl(m, noise, eval_batches(n=2, b=4), "k_DCE", 4, mc_batching=mc_batching, token_budget=2 * 4 * EVAL_LENGTH,
                     static_rows=True, progress=False)
    assert k.ppl == pytest.approx(256.0, rel=1e-6)
    lam = evaluate_ppl(m, noise, eval_batches(n=2, b=4), "lambda_DCE", 6, mc_batching=mc_batching, static_rows=True,
                       progress=False)
    assert abs(lam.ppl - 256.0) < 5 * lam.ppl_stderr, (lam.ppl, lam.ppl_stderr)

def test_static_rows_estimate_the_eager_loss(model, noise):
    """On a model with a real head the static-row and eager estimates agree within their errors."""
    torch.manual_seed(3)
    eager = evaluate_ppl(model, noise, eval_batches(n=2), "t_DCE", 16, mc_batching=True, progress=False)
    static = evaluate_ppl(model, noise, eval_batches(n=2), "t_DCE", 16, mc_batching=True, static_rows=True,
                          progress=False)
    spread = 5 * (eager.ppl_stderr ** 2 + static.ppl_stderr ** 2) ** 0.5
    assert abs(eager.ppl - static.ppl) < spread, (eager.ppl, static.ppl, spread)


def test_evaluate_ppl_bookkeeping(uniform):
    model, noise = uniform
    data = eval_batches(n=4, b=3)
    res = evaluate_ppl(model, noise, data, "k_DCE", 3, max_batches=2, mc_batching=True, token_budget=2 * 3 * EVAL_LENGTH,
                       progress=False)
    assert res.num_batches == 2 and res.num_sequences == 6 and res.mc_per_forward == 2
    assert res.mc_timesteps == 3 and res.loss_type == "k_DCE" and res.length == EVAL_LENGTH
    assert res.mean_loss == pytest.approx(EVAL_LENGTH * math.log(256), rel=1e-6)
    assert res.ppl == pytest.approx(256.0, rel=1e-6) and len(res.batch_vars) == 2
    forced = evaluate_ppl(model, noise, data[:1], "k_DCE", 3, mc_chunk=3, mc_batching=False, progress=False)
    assert forced.mc_per_forward == 3  # mc_chunk wins over batching being off

def test_evaluate_ppl_unwraps_ddp_and_accepts_dict_batches(uniform):
    model, noise = uniform

    class Wrapper:  # what DDP looks like from here: the model under .module
        module = model

    data = [{"input_ids": x} for x in eval_batches(n=1)]
    res = evaluate_ppl(Wrapper(), noise, data, "k_DCE", 1, progress=False)
    assert res.ppl == pytest.approx(256.0, rel=1e-6)

def test_evaluate_ppl_refuses_mixed_lengths(uniform):
    model, noise = uniform
    data = [torch.zeros(2, EVAL_LENGTH, dtype=torch.long), torch.zeros(2, EVAL_LENGTH // 2, dtype=torch.long)]
    assert _value_error(lambda: evaluate_ppl(model, noise, data, "k_DCE", 1, progress=False)) == (
        f"batch 1 has length {EVAL_LENGTH // 2}, earlier batches {EVAL_LENGTH}: one block length per run")

def test_evaluate_ppl_graphs_need_static_rows(uniform):
    model, noise = uniform
    with pytest.raises(ValueError) as e:
        evaluate_ppl(model, noise, eval_batches(n=1), "k_DCE", 1, cuda_graphs=True, progress=False)
    assert str(e.value) == "cuda_graphs=True needs static_rows=True (the eager loss's masked rows change shape every batch)"


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

def test_non_finite_message():
    with pytest.raises(ppl_mod.NonFiniteLossError) as e:
        ppl_mod.check_finite(torch.tensor(float("inf")), "batch 3")
    assert str(e.value) == ("the loss of batch 3 is inf: the model's weights or outputs are not finite "
                            "(a diverged or corrupt checkpoint?); no perplexity reported")
    ppl_mod.check_finite(torch.tensor(1.5), "batch 0")

def test_length_hint_for_the_progress_bar():
    assert ppl_mod._length_hint([1, 2, 3], None) == 3
    assert ppl_mod._length_hint([1, 2, 3], 2) == 2 and ppl_mod._length_hint([1, 2, 3], 5) == 3
    assert ppl_mod._length_hint(iter([1, 2]), 7) == 7 and ppl_mod._length_hint(iter([1]), None) is None


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


# ---------------------------------------------------------------------------- the loss functions
def _draw(fn, model, x, seed: int = 5) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return fn(model, x)

def test_eager_loss_fn_is_the_evaluation_loss_with_its_arguments():
    """make_loss_fn's eager loss is get_loss_fn(train=False) with the same eps and time sampler (the
    default eps 1e-3); it leaves the model in eval mode."""
    model = eval_model()
    noise = get_noise(model.config)
    x = eval_batches(n=1, b=4)[0]
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
    model = eval_model()
    noise = get_noise(model.config)
    static = ppl_mod.make_loss_fn(model, noise, "k_DCE", static_rows=True, time_sampler=None)
    assert isinstance(static, ppl_mod.StaticRowLoss)
    assert static.graphs.enabled is False and static.graphs.fn == static._loss  # default: eager, no graphs
    assert static.graphs.what == "the static-row evaluation loss" and static.overflows == 0
    assert not isinstance(ppl_mod.make_loss_fn(model, noise, "ar_forward", static_rows=True), ppl_mod.StaticRowLoss)
    timed = ppl_mod.make_loss_fn(model, noise, "t_DCE", static_rows=True, sampling_eps=0.2, time_sampler="naive")
    assert timed.time_sampler == "naive" and timed.sampling_eps == 0.2
    x = eval_batches(n=1, b=4)[0]
    timed(model, x)
    assert timed.planners[EVAL_LENGTH].sampler is ppl_mod.MaskPlanner("t_DCE", noise, EVAL_LENGTH, 0.2, "naive").sampler
    assert timed.planners[EVAL_LENGTH].sampling_eps == 0.2

def test_static_row_loss_counts_its_overflows(monkeypatch):
    """A draw with more masked tokens than the capacity runs eagerly at its own size, counted."""
    model = eval_model()
    noise = get_noise(model.config)
    loss = ppl_mod.make_loss_fn(model, noise, "k_DCE", static_rows=True)
    x = eval_batches(n=1, b=4)[0]
    loss(model, x)
    assert loss.overflows == 0
    monkeypatch.setattr(ppl_mod.MaskPlanner, "capacity", lambda self, batch_size: 1)  # k_DCE masks >= 1 a row
    values = [loss(model, x) for _ in range(3)]
    assert loss.overflows == 3 and all(v.shape == (4,) and torch.isfinite(v).all() for v in values)

def test_compile_body_switches_off_the_range_check_and_compiles_statically(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append((fn, kwargs)) or "compiled")
    model = eval_model()
    body = model.hidden
    assert ppl_mod.compile_body(model) is model
    assert model.validate_inputs is False and model.hidden == "compiled"
    assert seen == [(body, {"dynamic": False})]


# ---------------------------------------------------------------------------- over ranks
def test_results_gathered_over_ranks(monkeypatch):
    """Two ranks (all_gather_object emulated): per-batch values in rank order, sequences summed, one
    length; a rank without batches adds nothing; two lengths are refused; one process gathers nothing."""
    def gather_with(other):
        def all_gather_object(parts, mine):
            parts[0], parts[1] = mine, other
        monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)

    two = DistEnv(rank=0, world=2)
    losses, variances = [torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)], \
        [torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)]
    gather_with(([3.0], [0.3], 2, 16))
    assert ppl_mod._gather(losses, variances, 5, 16, two) == ([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], 7, 16)
    gather_with(([], [], 0, None))
    assert ppl_mod._gather(losses, variances, 5, 16, two) == ([1.0, 2.0], [0.1, 0.2], 5, 16)
    assert ppl_mod._gather([], [], 0, None, two) == ([], [], 0, None)
    gather_with(([3.0], [0.3], 2, 8))
    assert _value_error(ppl_mod._gather, losses, variances, 5, 16, two) == \
        "ranks evaluated different block lengths [8, 16]"
    assert ppl_mod._gather(losses, variances, 5, 16, DistEnv()) == ([1.0, 2.0], [0.1, 0.2], 5, 16)
