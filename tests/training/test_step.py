"""The training step (radd_fast/training/step.py).

What ``read`` reports (losses, FLOPs, head rows, overflows, a fresh window after each read), the
update gate (a bad batch or a non-finite step applies no update, that step and every later one),
the learning rate set per step and the exact messages, all against hand-computed values; micro-batch
accumulation equal to the global-batch gradient and the clipped update; the compiled step equal to
the eager one; and the step's host syncs with the optimizer training builds (fused AdamW, on CPU
too): none between log intervals, for every loss type, one per read. On CUDA every op ``SyncCounter`` counts makes the host wait for the device; counting them on
CPU finds the same call sites (radd_fast/sync_counter.py). The sync tests run under the loop's CPU
deterministic algorithms too, as in training.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from radd_fast import RADD, GeometricNoise, LogLinearNoise, ModelConfig, RADDConfig
from radd_fast.acceleration import Acceleration, resolve_acceleration
from radd_fast.config import ConfigError
from radd_fast.data import DataError
from radd_fast.distributed import DistEnv
from radd_fast.flops import executed_train_flops
from radd_fast.losses import LOSS_TYPES
from radd_fast.losses.masking import mask_k_random
from radd_fast.losses.registry import get_loss_spec
from radd_fast.losses.static_rows import MaskPlanner
from radd_fast.sync_counter import SyncCounter
from radd_fast.training import step as step_mod
from radd_fast.training.config import OptimConfig, TrainingConfig
from radd_fast.training.optim import build_optimizer
from radd_fast.training.step import StepReport, TrainStep
from tests.support.compare import assert_close
from tests.support.models import LOSS_TOKENS, loss_model

B, L = 3, 4
EPS = 1e-3
STEP_PARAMETERS = {  # name: (noise, sampling_eps, time sampler of the losses that take one)
    "published": (LogLinearNoise(), EPS, None),
    "geometric-eps0.2-naive": (GeometricNoise(0.3, 5.0), 0.2, "naive"),
}
TOKENS, LENGTH = 10, 8  # the sync tests' model and batch (B sequences of LENGTH tokens)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, LOSS_TOKENS, (B, L), generator=torch.Generator().manual_seed(seed))


def _weights(model) -> list:
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model, before) -> bool:
    return all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))


def _two_ranks(monkeypatch, other_first_bad: float, other_bad_tokens: float):
    """all_reduce(MIN) between this rank and one other, whose flags are packed as the step packs them."""
    other = torch.tensor([other_first_bad if other_first_bad > 0 else math.inf, -other_bad_tokens],
                         dtype=torch.float64)

    def all_reduce(tensor, op=None):
        assert op == torch.distributed.ReduceOp.MIN
        tensor.copy_(torch.minimum(tensor, other))

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)


def _other_rank(monkeypatch, losses: list, first_bad: float, bad_tokens: float):
    """torch.distributed.all_reduce with one other rank: SUM adds its step losses, MIN its flags."""
    other_losses = torch.tensor(losses, dtype=torch.float64)
    other_flags = torch.tensor([first_bad if first_bad > 0 else math.inf, -bad_tokens], dtype=torch.float64)

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM):
        if op == torch.distributed.ReduceOp.MIN:
            tensor.copy_(torch.minimum(tensor, other_flags))
        else:
            tensor.add_(other_losses)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)


class TestBookkeepingAndGuards:
    """What read() reports, the update gate, the learning rate set per step and the exact messages,
    against hand-computed values; on the kernels' PyTorch fallbacks."""

    @pytest.fixture(autouse=True)
    def _torch_fallbacks_on_one_thread(self, monkeypatch):
        """The kernels' PyTorch fallbacks (the Triton interpreter is far too slow for L passes; the
        kernels have their own tests, what is checked here is the step around them), on one intra-op
        thread: on tensors this small a second thread only adds synchronisation (several times slower
        on a busy two-core machine)."""
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)

    # ---- report and messages ---------------------------------------------------------------------------------
    def test_report_problem_line(self):
        report = StepReport([1.0], 0.5, 0, False, 0, 0.0, 0)
        assert report.problem() is None
        report.first_bad_step = 7
        assert report.problem() == ("the loss or the gradient norm is not finite at step 7: no update from that step on "
                                    "was applied")

    def test_messages(self):
        with pytest.raises(ValueError) as e:
            TrainStep(loss_model(length=L), LogLinearNoise(), "ar_backward", cuda_graphs=True)
        assert str(e.value) == "cuda_graphs=True: ar_backward runs L passes of Python control flow, never captured"
        stepper = TrainStep(loss_model(length=L), LogLinearNoise(), "k_DCE")
        with pytest.raises(RuntimeError) as e:
            stepper.update(torch.optim.SGD(stepper.model.parameters(), lr=1.0), [], lr=1.0, max_norm=1.0, step=1)
        assert str(e.value) == "update() before any micro_batch() of the step"

    # ---- what read() reports ---------------------------------------------------------------------------------
    @pytest.mark.parametrize("fused", [True, False])
    def test_read_reports_the_window_and_starts_a_new_one(self, fused):
        """Two steps of two micro-batches (weights 1/4 and 3/4): each step's loss is the weighted sum
        of its micro-batch losses; the lr is set on every group; after a read the window is empty."""
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "ar_forward")  # exact: the same loss every call
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=123.0, fused=fused)
        expected = []
        for step, lr in ((1, 1e-3), (2, 2e-3)):
            a = stepper.micro_batch(_batch(step), weight=0.25)
            b = stepper.micro_batch(_batch(10 + step), weight=0.75)
            assert a.dtype == b.dtype == torch.float64 and a.dim() == 0
            expected.append(0.25 * a.item() + 0.75 * b.item())
            stepper.update(opt, params, lr=lr, max_norm=1.0, step=step)
            assert [g["lr"] for g in opt.param_groups] == [lr]
        report = stepper.read()
        assert report.losses == pytest.approx(expected, rel=1e-12)
        assert report.first_bad_step == 0 and not report.bad_tokens and report.overflows == 0
        per_pass = executed_train_flops(model, B, L, head_rows=B)
        assert report.flops == pytest.approx(4 * L * per_pass, rel=1e-12)  # L passes, one head row each
        assert report.head_rows == 4 * L * B
        assert math.isfinite(report.grad_norm) and report.grad_norm > 0
        again = stepper.read()
        assert again.losses == [] and again.flops == 0.0 and again.head_rows == 0 and again.overflows == 0
        assert again.grad_norm == report.grad_norm  # the last step's norm until the next update

    def test_planned_rows_flops_and_overflows(self):
        """Capacity 10: a micro-batch with N <= 10 masked tokens runs at 10 head rows; one with more
        runs at its own N and is counted as an overflow."""
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "k_DCE", capacity=10)
        assert stepper.capacity(B) == 10 and stepper.capacity(100) == 10
        rows, overflows, flops = 0, 0, 0.0
        torch.manual_seed(3)
        for i in range(6):
            plan = stepper.plan(B)
            used = plan.total if plan.total > 10 else 10
            rows += used
            overflows += plan.total > 10
            flops += executed_train_flops(model, B, L, head_rows=used, last_block_rows=used)
            stepper.micro_batch(_batch(i), weight=1 / 6, plan=plan)
        assert 0 < overflows < 6  # both paths taken (k_DCE: N is a sum of 3 uniforms on {1..4})
        params = list(model.parameters())
        stepper.update(torch.optim.AdamW(params, lr=1e-3, fused=True), params, lr=1e-3, max_norm=1.0, step=1)
        report = stepper.read()
        assert report.head_rows == rows and report.overflows == overflows
        assert report.flops == pytest.approx(flops, rel=1e-12)
        tight = TrainStep(loss_model(length=L), LogLinearNoise(), "k_DCE", capacity=1)  # every batch overflows
        for i in range(3):
            tight.micro_batch(_batch(i), weight=1 / 3)
        assert tight.overflows == 3

    @pytest.mark.parametrize("loss_type", ["t_DSE", "t_DCE", "lambda_DCE", "k_DCE"])
    @pytest.mark.parametrize("case", list(STEP_PARAMETERS))
    def test_planned_loss_is_the_eager_loss_on_the_same_masks(self, loss_type, case):
        """The step's loss on a plan is the published loss of the same rates and masked positions (keys drawn
        from the generator right after the plan), at the defaults and at another noise (its schedule weights
        the t-losses' rows), sampling_eps and time sampler; each sequence's loss read off the loss module."""
        noise, eps, sampler = STEP_PARAMETERS[case]
        spec = get_loss_spec(loss_type)
        model, twin = loss_model(length=L), loss_model(length=L)
        stepper = TrainStep(model, noise, loss_type, sampling_eps=eps,
                            time_sampler=sampler if spec.time_sampler else None)
        per_seq = []
        stepper.module.register_forward_hook(lambda module, args, out: per_seq.append(out.detach()))
        x = _batch(5)
        torch.manual_seed(0)
        plan = stepper.plan(B)
        if spec.uses_sampling_eps:
            assert (plan.rate >= eps).all(), plan.rate
        torch.manual_seed(1)
        loss = stepper.micro_batch(x, weight=1.0, plan=plan)
        torch.manual_seed(1)
        perturbed = mask_k_random(x, plan.counts, twin.mask_id, torch.rand(B, L, dtype=torch.float64))
        rate = {"t_DSE": "t", "t_DCE": "t", "lambda_DCE": "lam", "k_DCE": "k"}[loss_type]
        value = plan.counts if loss_type == "k_DCE" else plan.rate
        eager = spec.fn(twin, x, noise, perturbed=perturbed, **{rate: value})
        assert_close(per_seq[0], eager, rtol=1e-5, atol=1e-5, name=f"{loss_type} ({case})")
        assert loss.item() == pytest.approx(eager.double().mean().item(), rel=1e-5)

    def test_default_capacity_is_the_planners(self):
        stepper = TrainStep(loss_model(length=L), LogLinearNoise(), "lambda_DCE")
        assert stepper.capacity(4) == stepper.planner.capacity(4)
        assert TrainStep(loss_model(length=L), LogLinearNoise(), "ar_forward").plan(4) is None

    # ---- the update gate -------------------------------------------------------------------------------------
    @pytest.mark.parametrize("bad", [-1, LOSS_TOKENS, LOSS_TOKENS + 3])
    @pytest.mark.parametrize("fused", [True, False])
    def test_a_batch_outside_the_vocabulary_applies_no_update(self, bad, fused):
        """Ids must lie in [0, V - 1) (V - 1 = LOSS_TOKENS is the mask id): such a batch is clamped so the
        step can run, no update is applied, and read() raises naming the range."""
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "k_DCE")
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-2, fused=fused)
        before = _weights(model)
        x = _batch()
        x[1, 2] = bad
        stepper.micro_batch(x, weight=1.0)
        stepper.update(opt, params, lr=1e-2, max_norm=1.0, step=1)
        assert _unchanged(model, before)
        with pytest.raises(DataError) as e:
            stepper.read()
        assert str(e.value) == (f"a training batch holds token ids outside [0, {LOSS_TOKENS}) (the mask id is {LOSS_TOKENS}): "
                                "the data does not fit the model's vocabulary")

    def test_the_largest_real_token_is_fine(self):
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "k_DCE")
        params = list(model.parameters())
        before = _weights(model)
        x = _batch()
        x[0, 0], x[0, 1] = 0, LOSS_TOKENS - 1
        stepper.micro_batch(x, weight=1.0)
        stepper.update(torch.optim.AdamW(params, lr=1e-2, fused=True), params, lr=1e-2, max_norm=1.0, step=1)
        assert not _unchanged(model, before)
        assert not stepper.read().bad_tokens

    @pytest.mark.parametrize("fused", [True, False])
    def test_a_non_finite_step_stops_every_later_update(self, fused):
        """Step 2's loss is NaN (one weight set to NaN, then put back): steps 1 updates, 2 and 3 do not,
        and read() names step 2."""
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "ar_forward")
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-2, fused=fused)
        stepper.micro_batch(_batch(1), weight=1.0)
        stepper.update(opt, params, lr=1e-2, max_norm=1.0, step=1)
        weight = model.output_layer.linear.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[0, 0] = float("nan")
        stepper.micro_batch(_batch(2), weight=1.0)
        with torch.no_grad():
            weight.copy_(saved)
        before = _weights(model)
        stepper.update(opt, params, lr=1e-2, max_norm=1.0, step=2)
        stepper.micro_batch(_batch(3), weight=1.0)  # finite again
        stepper.update(opt, params, lr=1e-2, max_norm=1.0, step=3)
        assert _unchanged(model, before)
        report = stepper.read()
        assert report.first_bad_step == 2 and math.isnan(report.losses[1]) and math.isfinite(report.losses[2])
        assert report.problem().startswith("the loss or the gradient norm is not finite at step 2")

    @pytest.mark.parametrize("fused", [True, False])
    def test_an_infinite_gradient_with_a_finite_loss_stops_the_updates(self, fused):
        """Without a scaler a non-finite gradient norm is as bad as a non-finite loss."""
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "ar_forward")
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-2, fused=fused)
        before = _weights(model)
        loss = stepper.micro_batch(_batch(6), weight=1.0)
        assert math.isfinite(loss.item())
        params[3].grad[0] = float("inf")
        stepper.update(opt, params, lr=1e-2, max_norm=1.0, step=1)
        assert _unchanged(model, before)
        report = stepper.read()
        assert report.first_bad_step == 1 and math.isinf(report.grad_norm)

    # ---- over ranks ------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("mine, other, expected", [
        ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0)),  # no bad step anywhere stays 0, not inf
        ((0.0, 0.0), (3.0, 0.0), (3.0, 0.0)),  # the other rank's step
        ((1.0, 0.0), (0.0, 0.0), (1.0, 0.0)),  # step 1 counts as bad
        ((5.0, 0.0), (2.0, 1.0), (2.0, 1.0)),  # the earliest step; a bad batch on any rank
        ((0.0, 1.0), (4.0, 0.0), (4.0, 1.0)),
    ])
    def test_flags_combined_over_ranks(self, monkeypatch, mine, other, expected):
        _two_ranks(monkeypatch, *other)
        got = step_mod._combine_over_ranks(torch.tensor(mine[0], dtype=torch.float64),
                                           torch.tensor(mine[1], dtype=torch.float64))
        assert [float(t) for t in got] == list(expected)

    def test_read_over_two_ranks(self, monkeypatch):
        """Two ranks: the step losses averaged over them, the earliest bad step and any bad batch taken
        from either, so both stop at the same read."""
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "ar_forward")
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        mine = []
        for step in (1, 2):
            mine.append(stepper.micro_batch(_batch(step), weight=1.0).item())
            stepper.update(opt, params, lr=1e-3, max_norm=1.0, step=step)
        _other_rank(monkeypatch, [1.0, 3.0], first_bad=2.0, bad_tokens=0.0)
        report = stepper.read(DistEnv(world=2))
        assert report.losses == pytest.approx([(mine[0] + 1.0) / 2, (mine[1] + 3.0) / 2], rel=1e-12)
        assert report.first_bad_step == 2 and not report.bad_tokens
        stepper.micro_batch(_batch(3), weight=1.0)
        stepper.update(opt, params, lr=1e-3, max_norm=1.0, step=3)
        _other_rank(monkeypatch, [2.0], first_bad=0.0, bad_tokens=1.0)
        with pytest.raises(DataError):
            stepper.read(DistEnv(world=2))
        assert stepper.read(DistEnv(world=1)).losses == []  # one rank: nothing to reduce

    # ---- graphs and fp16 -------------------------------------------------------------------------------------
    def test_gradient_buffers_made_once_for_cuda_graphs(self):
        """Every trainable parameter without a .grad gets a zero one (existing grads are kept), once."""
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "k_DCE")
        params = list(model.parameters())
        params[0].requires_grad_(False)
        params[1].grad = torch.full_like(params[1], 2.0)
        stepper._own_gradient_buffers()
        assert params[0].grad is None and torch.equal(params[1].grad, torch.full_like(params[1], 2.0))
        assert all(p.grad is not None and not p.grad.any() for p in params[2:])
        params[2].grad = None
        stepper._own_gradient_buffers()  # already owned: nothing is made again
        assert params[2].grad is None

    def test_fp16_scaler_steps(self):
        """With a GradScaler: the update and the reported norm are the unscaled ones (a twin run without
        the scaler agrees); an inf gradient is the scaler's business (skipped, scale halved, no error);
        a non-finite loss skips that step and every later one, and is reported."""
        x = _batch(4)
        twin_model, model = loss_model(length=L), loss_model(length=L)
        twin, stepper = (TrainStep(m, LogLinearNoise(), "ar_forward") for m in (twin_model, model))
        params, twin_params = list(model.parameters()), list(twin_model.parameters())
        opt, twin_opt = (torch.optim.AdamW(ps, lr=1e-2, fused=True) for ps in (params, twin_params))
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        stepper.micro_batch(x, weight=1.0, scaler=scaler)
        stepper.update(opt, params, lr=1e-2, max_norm=1.0, step=1, scaler=scaler)
        twin.micro_batch(x, weight=1.0)
        twin.update(twin_opt, twin_params, lr=1e-2, max_norm=1.0, step=1)
        for p, q in zip(params, twin_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        assert stepper.read().grad_norm == pytest.approx(twin.read().grad_norm, rel=1e-5)
        before = _weights(model)
        stepper.micro_batch(x, weight=1.0, scaler=scaler)
        params[0].grad[0] = float("inf")
        stepper.update(opt, params, lr=1e-2, max_norm=1.0, step=2, scaler=scaler)
        assert _unchanged(model, before) and scaler.get_scale() == 512.0
        assert stepper.read().first_bad_step == 0
        weight = model.output_layer.linear.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[0, 0] = float("nan")
        stepper.micro_batch(x, weight=1.0, scaler=scaler)  # a NaN loss
        with torch.no_grad():
            weight.copy_(saved)
        before = _weights(model)
        stepper.update(opt, params, lr=1e-2, max_norm=1.0, step=3, scaler=scaler)
        stepper.micro_batch(x, weight=1.0, scaler=scaler)
        stepper.update(opt, params, lr=1e-2, max_norm=1.0, step=4, scaler=scaler)
        assert _unchanged(model, before) and stepper.read().first_bad_step == 3

    def test_non_finite_steps_are_folded_into_the_scalers_flags(self):
        """fp16: the scaler's per-device found-inf flags are raised to the step's skip flag (never lowered)."""
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)

        class Scaler:
            _per_optimizer_states = {id(opt): {"found_inf_per_device": {}}}

        flags = Scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
        for flag, skip, expected in ((0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (0.0, 0.0, 0.0)):
            flags.clear()
            flags[torch.device("cpu")] = torch.tensor([flag])
            flags["second device"] = torch.tensor([flag])
            step_mod._fold_into_scaler(Scaler(), opt, torch.tensor(skip))
            assert [float(f) for f in flags.values()] == [expected, expected]

    # ---- the compile decision --------------------------------------------------------------------------------
    def test_compiled_loss_runs_unless_the_batch_overflows(self, monkeypatch):
        """compile=True: the planned loss module is handed to the policy's ``compiled`` once (no CUDA
        graphs on the CPU: mode None); a micro-batch within capacity runs it, an overflow the plain module."""
        calls = []

        def compiled(self, fn, mode=None):
            calls.append(("compile", mode, self.backend))

            def run(*args, **kwargs):
                calls.append("compiled run")
                return fn(*args, **kwargs)

            return run

        monkeypatch.setattr(Acceleration, "compiled", compiled)
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "k_DCE", compile=True, backend="aot_eager", capacity=10)
        assert calls == [("compile", None, "aot_eager")] and stepper.compiled is not stepper.module
        torch.manual_seed(3)
        expected = []
        for i in range(6):
            plan = stepper.plan(B)
            expected.append("compiled run" if plan.total <= 10 else "eager")
            before = len(calls)
            stepper.micro_batch(_batch(i), weight=1.0, plan=plan)
            assert ("compiled run" if len(calls) > before else "eager") == expected[-1]
        assert set(expected) == {"compiled run", "eager"}

    def test_exact_losses_compile_block_by_block(self, monkeypatch):
        compiled = []
        monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((self, kwargs)))
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "ar_forward", compile=True, backend="aot_eager")
        assert [m for m, _ in compiled] == list(model.blocks)
        assert all(kwargs == {"backend": "aot_eager"} for _, kwargs in compiled)
        assert stepper.compiled is stepper.module and not stepper.cuda_graphs
        compiled.clear()
        TrainStep(loss_model(length=L), LogLinearNoise(), "ar_forward")
        assert compiled == []

    # ---- construction ----------------------------------------------------------------------------------------
    def test_the_planner_gets_the_steps_arguments(self):
        noise = LogLinearNoise()
        stepper = TrainStep(loss_model(length=L), noise, "t_DCE")
        default = MaskPlanner("t_DCE", noise, L, 1e-3, None)
        assert stepper.planner.noise is noise and stepper.planner.sampling_eps == 1e-3
        assert stepper.planner.sampler is default.sampler
        stepper = TrainStep(loss_model(length=L), noise, "t_DCE", sampling_eps=0.2, time_sampler="naive")
        assert stepper.planner.sampling_eps == 0.2
        assert stepper.planner.sampler is MaskPlanner("t_DCE", noise, L, 0.2, "naive").sampler
        assert stepper.planner.sampler is not default.sampler

    def test_the_policy_is_asked_the_steps_question(self, monkeypatch):
        asked = []

        def resolve(*args, **kwargs):
            asked.append((args[1:], kwargs))
            return Acceleration(False, False)

        monkeypatch.setattr(step_mod, "resolve_acceleration", resolve)
        TrainStep(loss_model(length=L), LogLinearNoise(), "k_DCE")
        TrainStep(loss_model(length=L), LogLinearNoise(), "ar_forward", compile=True)  # never graphed
        TrainStep(loss_model(length=L), LogLinearNoise(), "k_DCE", compile="auto", backend="aot_eager", cuda_graphs=False,
                  world_size=4)
        assert asked == [((False, None), {"backend": "inductor", "graphs_need_compile": True, "world_size": 1}),
                         ((True, False), {"backend": "inductor", "graphs_need_compile": True, "world_size": 1}),
                         (("auto", False), {"backend": "aot_eager", "graphs_need_compile": True, "world_size": 4})]

    def test_cuda_graph_mode_emulated_on_the_cpu(self, monkeypatch):
        """Graphs on (as the policy decides on CUDA): the loss compiled with mode reduce-overhead, every
        parameter owns a .grad before the first replay, a graph step is marked per micro-batch, and the
        update zeroes the .grad buffers in place instead of dropping them."""
        model = loss_model(length=L)
        params = list(model.parameters())
        events = []

        def compiled(self, fn, mode=None):
            events.append(("compile", mode))

            def replay(*args, **kwargs):
                events.append(("replay", all(p.grad is not None for p in params)))
                return fn(*args, **kwargs)

            return replay

        monkeypatch.setattr(step_mod, "resolve_acceleration", lambda *a, **k: Acceleration(True, True, "aot_eager"))
        monkeypatch.setattr(Acceleration, "compiled", compiled)
        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))
        stepper = TrainStep(model, LogLinearNoise(), "k_DCE", capacity=B * L)  # never overflows
        assert stepper.cuda_graphs is True and events == [("compile", "reduce-overhead")]
        stepper.micro_batch(_batch(), weight=1.0)
        assert events[1:] == ["mark", ("replay", True)]
        buffers = [p.grad for p in params]
        stepper.update(torch.optim.AdamW(params, lr=1e-3, fused=True), params, lr=1e-3, max_norm=1.0, step=1)
        assert all(p.grad is g and not g.any() for p, g in zip(params, buffers))

    def test_a_wrapped_loss_module_is_the_one_run(self):
        class Counting(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner, self.calls = inner, 0

            def forward(self, *args, **kwargs):
                self.calls += 1
                return self.inner(*args, **kwargs)

        stepper = TrainStep(loss_model(length=L), LogLinearNoise(), "k_DCE", wrap=Counting)
        assert isinstance(stepper.module, Counting) and isinstance(stepper.module.inner, step_mod.PlannedLossModule)
        stepper.micro_batch(_batch(), weight=1.0)
        assert stepper.module.calls == 1

    def test_read_before_any_step(self):
        report = TrainStep(loss_model(length=L), LogLinearNoise(), "k_DCE").read()
        assert (report.losses, report.grad_norm, report.first_bad_step, report.bad_tokens) == ([], 0.0, 0, False)
        assert (report.overflows, report.flops, report.head_rows) == (0, 0.0, 0)

    def test_the_first_bad_step_is_exact_past_fp32_range(self):
        """Step numbers are int64 on the device: 2^24 + 1 is not an fp32 number."""
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "ar_forward")
        params = list(model.parameters())
        stepper.micro_batch(_batch(), weight=1.0)
        params[0].grad[0] = float("nan")
        stepper.update(torch.optim.AdamW(params, lr=1e-3, fused=True), params, lr=1e-3, max_norm=1.0, step=2**24 + 1)
        assert stepper.read().first_bad_step == 2**24 + 1

    def test_a_fused_update_never_waits_for_the_device(self, monkeypatch):
        """Fused Adam(W) takes the skip flag on the device: the update reads nothing back."""
        model = loss_model(length=L)
        stepper = TrainStep(model, LogLinearNoise(), "ar_forward")
        params = list(model.parameters())
        stepper.micro_batch(_batch(), weight=1.0)

        def host_read(self):
            raise AssertionError("a host read in the fused update")

        monkeypatch.setattr(torch.Tensor, "item", host_read)
        stepper.update(torch.optim.AdamW(params, lr=1e-3, fused=True), params, lr=1e-3, max_norm=1.0, step=1)


# ---- micro-batch accumulation and the clipped update ---------------------------------------------------------
def grad_model() -> RADD:
    torch.manual_seed(0)
    model = RADD(RADDConfig(tokens=6, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=8,
                                                         dropout=0.0, name="train-step")))
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.3)  # a non-uniform head: every gradient non-zero
    return model


def full_batch_grads(x: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the global-batch mean loss, straight from the loss function (no TrainStep)."""
    model = grad_model()
    get_loss_spec("ar_forward").fn(model.train(), x, LogLinearNoise()).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_accumulated_gradient_equals_the_global_batch_gradient(accum):
    """ar_forward is deterministic, so micro-batch weights 1/accum must give the global gradient."""
    x = torch.randint(0, 6, (4, 8), generator=torch.Generator().manual_seed(1))
    model = grad_model()
    stepper = TrainStep(model, LogLinearNoise(), "ar_forward")
    for chunk in x.chunk(accum):
        stepper.micro_batch(chunk, weight=1 / accum)
    for p, want in zip(model.parameters(), full_batch_grads(x)):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)  # fp32 summation order only


@pytest.mark.parametrize("max_norm", [0.01, 0.0, 1e6])
def test_train_step_clips_to_max_norm_and_reports_the_pre_clip_norm(max_norm):
    """With SGD the applied step is -lr x the clipped gradient: read it off the weights."""
    x = torch.randint(0, 6, (4, 8), generator=torch.Generator().manual_seed(2))
    model = grad_model()
    params = list(model.parameters())
    stepper = TrainStep(model, LogLinearNoise(), "ar_forward")
    stepper.micro_batch(x, weight=1.0)
    grads = [p.grad.clone() for p in params]
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    before = [p.detach().clone() for p in params]
    stepper.update(torch.optim.SGD(params, lr=123.0), params, lr=0.5, max_norm=max_norm, step=1)
    factor = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
    assert norm > 0.01  # the 0.01 case really clips
    for p, p0, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * factor * g, rtol=1e-5, atol=1e-8)
        assert p.grad is None
    assert stepper.read().grad_norm == pytest.approx(norm, rel=1e-5)


# ---- the compiled step ---------------------------------------------------------------------------------------
COMPILED_CASES = {  # name: (loss type, noise, TrainStep keywords: a capacity that some micro-batches overflow)
    "lambda_DCE": ("lambda_DCE", LogLinearNoise(EPS), dict(capacity=30)),
    "t_DCE-geometric-eps0.2-naive": ("t_DCE", GeometricNoise(0.3, 5.0),
                                     dict(capacity=50, sampling_eps=0.2, time_sampler="naive")),
}


@pytest.fixture
def one_thread():
    """Small passes on one intra-op thread (a second only adds synchronisation on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(COMPILED_CASES))
def test_compiled_step_equals_eager_step(case):
    """Four steps of two micro-batches, mask counts varying, a capacity small enough that some
    micro-batches overflow: compiled (aot_eager: the traced graph without code generation, fast
    on CPU; CUDA runs inductor) and eager give the same losses, gradients and weights; at the
    defaults and for a t-loss whose schedule (a geometric noise), sampling_eps and sampler are not."""
    loss_type, noise, options = COMPILED_CASES[case]
    B, L = 4, 16
    eager_model, compiled_model = loss_model(length=L), loss_model(length=L)
    eager = TrainStep(eager_model, noise, loss_type, **options)
    compiled = TrainStep(compiled_model, noise, loss_type, compile=True, backend="aot_eager", **options)
    capacity = options["capacity"]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (eager_model, compiled_model)]
    totals = []
    for step in range(1, 5):
        for micro in range(2):
            batch = torch.randint(0, LOSS_TOKENS, (B, L))
            losses = []
            for stepper in (eager, compiled):
                torch.manual_seed(100 * step + micro)  # as the loop seeds each micro-batch
                plan = stepper.plan(B)
                losses.append(stepper.micro_batch(batch, weight=0.5, plan=plan))
            totals.append(plan.total)
            assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5, name=f"loss {step}.{micro}")
        for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
            assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, name=f"grad {name} step {step}")
        for stepper, opt, m in zip((eager, compiled), opts, (eager_model, compiled_model)):
            stepper.update(opt, list(m.parameters()), lr=1e-2, max_norm=1.0, step=step)
    reports = [eager.read(), compiled.read()]
    assert len(set(totals)) > 1 and any(n > capacity for n in totals) and any(n <= capacity for n in totals)
    assert reports[0].overflows == reports[1].overflows == sum(n > capacity for n in totals)
    assert_close(torch.tensor(reports[1].losses), torch.tensor(reports[0].losses), rtol=1e-5, atol=1e-5)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        assert_close(q, p, rtol=1e-5, atol=1e-5)


def test_compile_auto_is_on_for_cuda_only():
    step = TrainStep(loss_model(length=8), LogLinearNoise(EPS), "lambda_DCE", compile="auto")
    assert step.acceleration == Acceleration(compile=False, cuda_graphs=False)
    on_cuda = resolve_acceleration(torch.device("cuda"), "auto", None, graphs_need_compile=True)
    assert on_cuda == Acceleration(compile=True, cuda_graphs=True)
    assert resolve_acceleration(torch.device("cuda"), "auto", None, graphs_need_compile=True, world_size=2).cuda_graphs is False
    with pytest.raises(ValueError, match="never captured"):
        TrainStep(loss_model(length=8), LogLinearNoise(EPS), "ar_forward", cuda_graphs=True)
    with pytest.raises(ConfigError, match="training.compile must be auto, true or false, got 'yes'"):
        TrainingConfig(compile="yes")


# ---- host syncs ----------------------------------------------------------------------------------------------
def tiny(dropout=0.02, seed=0):
    cfg = RADDConfig(tokens=TOKENS, model=ModelConfig(hidden_size=16, n_heads=2, n_blocks=2, length=LENGTH,
                                                      dropout=dropout))
    torch.manual_seed(seed)
    return RADD(cfg)


def shipped_optimizer(model):
    """The optimizer training builds (``optim.build_optimizer``): fused AdamW on CPU too, so these
    counts are the shipped update's, not a stand-in's."""
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=1e-3), model.device)
    assert all(group["fused"] for group in optimizer.param_groups)
    return optimizer


def host_plans(stepper, steps, micro=2):
    """The host half of each micro-batch, drawn before counting.

    On CUDA the plan is host work (CPU tensors from the CPU generator: ``test_plans_are_host_tensors``)
    and cannot make the host wait; on CPU its ``int(counts.sum())`` would look like a sync."""
    return [stepper.plan(B) for _ in range(steps * micro)]


def run_steps(stepper, optimizer, model, steps, first=1, micro=2, plans=None):
    params = list(model.parameters())
    plans = iter(plans if plans is not None else host_plans(stepper, steps, micro))
    for step in range(first, first + steps):
        for _ in range(micro):
            stepper.micro_batch(torch.randint(0, TOKENS, (B, LENGTH)), weight=1 / micro, plan=next(plans))
        stepper.update(optimizer, params, lr=1e-3, max_norm=1.0, step=step)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_sync_between_log_intervals(loss_type):
    """From the first step on (optimizer state created lazily included): zero syncs, then one read.
    The ar_* losses (L passes each) take one step of one micro-batch, the others two of two."""
    model = tiny()
    stepper, optimizer = TrainStep(model, LogLinearNoise(), loss_type), shipped_optimizer(model)
    steps, micro = (1, 1) if loss_type.startswith("ar_") else (2, 2)
    torch.manual_seed(1)
    with deterministic():
        plans = host_plans(stepper, steps, micro)
        with SyncCounter() as syncs:
            run_steps(stepper, optimizer, model, steps, micro=micro, plans=plans)
        assert syncs.total == 0, dict(syncs.by_op)
        with SyncCounter() as syncs:
            report = stepper.read()
        assert syncs.total == 1, dict(syncs.by_op)  # one device-to-host transfer per log interval
    assert len(report.losses) == steps and report.first_bad_step == 0 and not report.bad_tokens


@contextlib.contextmanager
def deterministic():
    """torch's deterministic algorithms, as the training loop sets them on CPU."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def test_an_unfused_update_would_wait_for_the_device_every_step():
    """Why training builds fused Adam(W) on every device that has it: with the for-each optimizer the
    update asks the host whether to step (one sync per step), and torch's non-fused Adam reads each
    parameter's step counter on the host (on CPU: one more per parameter and step)."""
    model = tiny()
    stepper = TrainStep(model, LogLinearNoise(), "lambda_DCE")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=False)
    plans = host_plans(stepper, steps=2)
    with SyncCounter() as syncs:
        run_steps(stepper, optimizer, model, steps=2, plans=plans)
    n_params = len(list(model.parameters()))
    assert set(syncs.by_op) == {"aten._local_scalar_dense"} and syncs.total >= 2 * (1 + n_params)


def test_overflow_path_adds_no_sync():
    """A batch past the static capacity runs the exact eager path: still no sync, and counted."""
    model = tiny()
    stepper, optimizer = TrainStep(model, LogLinearNoise(), "k_DCE", capacity=1), shipped_optimizer(model)
    plans = host_plans(stepper, steps=2)
    with SyncCounter() as syncs:
        run_steps(stepper, optimizer, model, steps=2, plans=plans)
    assert syncs.total == 0, dict(syncs.by_op)
    assert stepper.read().overflows == 4  # k >= 1 per sequence: every micro-batch has N >= 3 > 1


def test_non_finite_step_is_never_applied_and_named():
    """A NaN gradient at step 2: no update from step 2 on (weights stay those of step 1), and the
    read names step 2."""
    model = tiny(dropout=0.0)
    stepper, optimizer = TrainStep(model, LogLinearNoise(), "lambda_DCE"), shipped_optimizer(model)
    torch.manual_seed(0)
    run_steps(stepper, optimizer, model, steps=1)
    after_first = [p.detach().clone() for p in model.parameters()]
    weight = model.output_layer.linear.weight
    hook = weight.register_hook(lambda g: g * float("nan"))
    plans = host_plans(stepper, steps=3)
    with SyncCounter() as syncs:
        run_steps(stepper, optimizer, model, steps=1, first=2, plans=plans[:2])
        hook.remove()
        run_steps(stepper, optimizer, model, steps=2, first=3, plans=plans[2:])  # finite again, still not applied
    assert syncs.total == 0, dict(syncs.by_op)
    report = stepper.read()
    assert report.first_bad_step == 2 and "step 2" in report.problem()
    for before, p in zip(after_first, model.parameters()):
        assert torch.equal(before, p.detach())


def test_token_out_of_range_is_reported_at_read():
    model = tiny()
    stepper, optimizer = TrainStep(model, LogLinearNoise(), "lambda_DCE"), shipped_optimizer(model)
    stepper.micro_batch(torch.full((B, LENGTH), model.mask_id), weight=1.0)  # the mask id is no clean token
    stepper.update(optimizer, list(model.parameters()), lr=1e-3, max_norm=1.0, step=1)
    with pytest.raises(DataError, match="token ids outside"):
        stepper.read()


@pytest.mark.parametrize("loss_type", ["t_DSE", "t_DCE", "lambda_DCE", "k_DCE"])
def test_plans_are_host_tensors(loss_type):
    """The host half never touches the model's device: CPU tensors, a Python int total."""
    plan = TrainStep(tiny(), LogLinearNoise(), loss_type).plan(B)
    assert plan.rate.device.type == plan.counts.device.type == "cpu"
    assert isinstance(plan.total, int) and plan.total == int(plan.counts.sum())
