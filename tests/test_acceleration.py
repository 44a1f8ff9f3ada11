"""The one compile / CUDA-graph policy (radd_fast/acceleration.py) and the graphs of every path that uses it.

Real CUDA graphs need a GPU; here ``tests.support.graphs.EmulatedGraph`` stands in for them on the CPU with
the same contract (private input buffers, outputs reused by every replay), so the plumbing of each
path (what is copied in, what is read out and when) is tested against the same path run eagerly.
"""
import time

import pytest
import torch

from radd_fast import GeometricNoise, LogLinearNoise, acceleration
from radd_fast.acceleration import Acceleration, GraphSet, resolve_acceleration
from radd_fast.evaluation import ppl
from radd_fast.evaluation.ppl import StaticRowLoss, evaluate_ppl
from radd_fast.sampling import SamplerConfig, engine, evaluator, generate
from tests.support.compare import assert_close
from tests.support.graphs import EmulatedGraph
from tests.support.models import normal_head_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


# -- the policy -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, compile, graphs, need, world, expected", [
    (CPU, "auto", None, False, 1, (False, False)),
    (CUDA, "auto", None, False, 1, (True, True)),
    (CUDA, False, None, False, 1, (False, True)),   # sampling: manual graphs, no compilation needed
    (CUDA, False, None, True, 1, (False, False)),   # training: inductor's graphs need compilation
    (CUDA, True, None, True, 2, (True, False)),     # DDP: the all-reduce cannot be captured
    (CUDA, "auto", False, False, 1, (True, False)),
    (CPU, True, None, False, 1, (True, False)),
    (CPU, True, False, True, 1, (True, False)),
])
def test_policy_rules(device, compile, graphs, need, world, expected):
    accel = resolve_acceleration(device, compile, graphs, graphs_need_compile=need, world_size=world)
    assert (accel.compile, accel.cuda_graphs) == expected


@pytest.mark.parametrize("kwargs, words", [
    (dict(device=CPU, cuda_graphs=True), "needs a CUDA device"),
    (dict(device=CUDA, compile=False, cuda_graphs=True, graphs_need_compile=True), "needs compile=True"),
    (dict(device=CUDA, compile=True, cuda_graphs=True, world_size=2), "2-rank"),
    (dict(device=CPU, compile="yes"), "compile must be"),
    (dict(device=CPU, compile=True, backend="tensorrt"), "unknown torch.compile backend"),
])
def test_policy_refuses_what_cannot_work(kwargs, words):
    with pytest.raises(ValueError, match=words):
        resolve_acceleration(**kwargs)


def test_describe_names_both_switches():
    assert Acceleration(False, False).describe() == "eager"
    assert Acceleration(True, True, "aot_eager").describe() == "compiled (aot_eager) + CUDA graphs"


def test_compiled_is_the_function_itself_when_off():
    fn = torch.sin
    assert Acceleration(False, False).compiled(fn) is fn
    compiled = Acceleration(True, False, "eager").compiled(fn)
    x = torch.randn(5)
    assert compiled is not fn and torch.equal(compiled(x), fn(x))


def test_sampler_config_rejects_an_unknown_compile_value():
    with pytest.raises(ValueError, match="compile must be"):
        SamplerConfig(compile="sometimes")


def test_generate_refuses_cuda_graphs_off_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        generate(normal_head_model(1, 6), LogLinearNoise(), 2, steps=3, cuda_graphs=True, progress=False)


# -- GraphSet -----------------------------------------------------------------------------------------------
def test_graph_set_replays_captured_keys_and_runs_the_rest_eagerly():
    calls = []

    def fn(x, y):
        calls.append(x.shape)
        return x * 2 + (0 if y is None else y)

    graphs = GraphSet(fn, CPU, True, what="test", capture=EmulatedGraph)
    graphs.prepare([((3,), (torch.zeros(3), None)), ((4,), (torch.zeros(4), torch.zeros(4)))])
    assert len(graphs) == 2
    a = graphs((3,), torch.tensor([1.0, 2.0, 3.0]), None)
    assert torch.equal(a, torch.tensor([2.0, 4.0, 6.0]))
    b = graphs((3,), torch.tensor([0.0, 0.0, 1.0]), None)
    assert b is a and torch.equal(a, torch.tensor([0.0, 0.0, 2.0]))  # the graph's own output, overwritten
    c = graphs((4,), torch.ones(4), torch.full((4,), 5.0))
    assert torch.equal(c, torch.full((4,), 7.0))
    eager = graphs((5,), torch.ones(5), None)  # never captured: eager, a fresh tensor
    assert torch.equal(eager, torch.full((5,), 2.0)) and graphs.graphs[(3,)].replays == 2


def test_graph_set_disabled_captures_nothing():
    graphs = GraphSet(torch.neg, CPU, False, what="test", capture=EmulatedGraph)
    graphs.prepare([((2,), (torch.ones(2),))])
    assert len(graphs) == 0 and graphs.capture_seconds == 0.0


def test_a_failed_capture_warns_and_runs_eagerly():
    def failing(fn, example, pool, static):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = GraphSet(torch.neg, CPU, True, what="the thing", capture=failing)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the thing failed"):
        graphs.prepare([((2,), (torch.ones(2),)), ((3,), (torch.ones(3),))])
    assert not graphs.enabled and len(graphs) == 0
    assert torch.equal(graphs((2,), torch.ones(2)), -torch.ones(2))


# -- the sampler's graphs against the eager engine -------------------------------------------------------------
@pytest.fixture
def emulated_graphs(monkeypatch):
    """Every generate() call in the test runs its body through emulated CUDA graphs, captured at first sight."""
    monkeypatch.setattr(engine, "resolve_acceleration", lambda device, compile, graphs: Acceleration(False, True))
    monkeypatch.setattr(evaluator, "CapturedGraph", EmulatedGraph)
    monkeypatch.setattr(evaluator, "MIN_TICKS_FOR_GRAPH", 1)


CASES = {
    "exact": dict(),
    "exact-unpruned": dict(prune_last_block=False),
    "cached-r2": dict(refresh_every=2),
    "cached-r3-unpruned": dict(refresh_every=3, prune_last_block=False),
    "cached-no-buckets": dict(refresh_every=2, buckets=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_from_graphs_equals_the_eager_sampler(case, request):
    model = normal_head_model(n_blocks=2, length=12)
    cfg = SamplerConfig(steps=9, rows_in_flight=4, use_kernels=False, **CASES[case])
    eager, s_eager = generate(model, LogLinearNoise(), 10, config=cfg, conditioning={3: 2}, seed=11, progress=False)
    assert s_eager.cuda_graphs == 0
    request.getfixturevalue("emulated_graphs")  # from here on, graphs
    graphed, s_graphed = generate(model, LogLinearNoise(), 10, config=cfg, conditioning={3: 2}, seed=11,
                                  progress=False)
    assert torch.equal(graphed, eager)
    assert (s_eager.acceleration, s_graphed.acceleration) == ("eager", "CUDA graphs")
    assert s_graphed.cuda_graphs > 0 and (s_graphed.head_rows, s_graphed.body_token_rows) == \
        (s_eager.head_rows, s_eager.body_token_rows)


def test_compiled_cached_sampler_equals_the_eager_one(monkeypatch):
    """The approximate sampler's filling and cached evaluations trace under torch.compile (aot_eager:
    the traced graphs without code generation) and give the eager samples."""
    model = normal_head_model(n_blocks=2, length=12)
    cfg = SamplerConfig(steps=9, rows_in_flight=4, use_kernels=False, refresh_every=2)
    eager, _ = generate(model, LogLinearNoise(), 10, config=cfg, seed=1, progress=False)
    monkeypatch.setattr(engine, "resolve_acceleration", lambda device, compile, graphs: Acceleration(True, False, "aot_eager"))
    compiled, _ = generate(model, LogLinearNoise(), 10, config=cfg, seed=1, progress=False)
    assert torch.equal(compiled, eager)


def test_cached_sampler_captures_filling_and_cached_graphs(emulated_graphs, monkeypatch):
    model = normal_head_model(n_blocks=2, length=12)
    runners = []
    original = evaluator.BodyRunner.prepare_cached

    def spy(self, fills, cached):
        runners.append(self)
        original(self, fills, cached)

    monkeypatch.setattr(evaluator.BodyRunner, "prepare_cached", spy)
    generate(model, LogLinearNoise(), 8, steps=9, rows_in_flight=4, refresh_every=3, use_kernels=False, seed=2,
             progress=False)
    kinds = {key[0] for graph_set in runners[0].graph_sets for key in graph_set.graphs}
    assert {"fill", "cached"} <= kinds


# -- the static-row evaluation loss ------------------------------------------------------------------------------
def _static_losses(loss: StaticRowLoss, model, x, draws: int) -> list:
    out = []
    for i in range(draws):
        torch.manual_seed(i)
        out.append(loss(model, x).clone())  # a graph's output is overwritten by the next replay
    return out


@pytest.mark.parametrize("loss_type, noise, sampling_eps, time_sampler", [
    ("lambda_DCE", LogLinearNoise(), 1e-3, None), ("t_DCE", LogLinearNoise(), 1e-3, None),
    ("t_DSE", GeometricNoise(0.3, 5.0), 0.2, "naive"), ("k_DCE", GeometricNoise(0.3, 5.0), 0.2, None)],
    ids=["lambda_DCE", "t_DCE", "t_DSE-geometric-eps0.2-naive", "k_DCE-geometric"])
def test_static_row_evaluation_from_graphs_equals_eager(loss_type, noise, sampling_eps, time_sampler):
    """Replayed graphs give the eager static-row loss's values, at the defaults and at another noise,
    sampling_eps and time sampler (what a graph holds fixed must not be what the run's options set)."""
    model = normal_head_model(n_blocks=2, length=12)
    x = torch.randint(0, 10, (3, 12))
    kw = dict(time_sampler=time_sampler)
    with torch.no_grad():
        eager = _static_losses(StaticRowLoss(model, noise, loss_type, sampling_eps, Acceleration(False, False), **kw),
                               model, x, 4)
        graphed_loss = StaticRowLoss(model, noise, loss_type, sampling_eps, Acceleration(False, True),
                                     capture=EmulatedGraph, **kw)
        graphed = _static_losses(graphed_loss, model, x, 4)
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    (key, graph), = graphed_loss.graphs.graphs.items()
    assert key[:2] == (3, 12) and graph.replays == 3  # captured at the second call, replayed from it on


def test_static_row_evaluation_compiled_equals_eager():
    model, noise = normal_head_model(n_blocks=1, length=12), LogLinearNoise()
    x = torch.randint(0, 10, (2, 12))
    with torch.no_grad():
        eager = _static_losses(StaticRowLoss(model, noise, "lambda_DCE", 1e-3, Acceleration(False, False)), model, x, 2)
        compiled = StaticRowLoss(model, noise, "lambda_DCE", 1e-3, Acceleration(True, False, "aot_eager"))
        for a, b in zip(eager, _static_losses(compiled, model, x, 2)):
            assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_evaluation_says_how_it_scored():
    model = normal_head_model(n_blocks=1, length=12)
    batches = [torch.randint(0, 10, (2, 12))]
    assert evaluate_ppl(model, LogLinearNoise(), batches, "t_DCE", 1, progress=False).scoring == "eager"
    static = evaluate_ppl(model, LogLinearNoise(), batches, "t_DCE", 1, static_rows=True, progress=False)
    assert static.scoring == "static rows, eager" and static.to_dict()["scoring"] == "static rows, eager"


def test_evaluation_graphs_need_static_rows():
    model = normal_head_model(n_blocks=1, length=12)
    with pytest.raises(ValueError, match="needs static_rows=True"):
        evaluate_ppl(model, LogLinearNoise(), [torch.randint(0, 10, (2, 12))], "lambda_DCE", 1, cuda_graphs=True,
                     progress=False)


def test_evaluation_compiles_the_body_for_the_run_only(monkeypatch):
    model = normal_head_model(n_blocks=1, length=12)
    batches = [torch.randint(0, 10, (2, 12))]
    torch.manual_seed(0)
    eager = evaluate_ppl(model, LogLinearNoise(), batches, "t_DCE", 2, progress=False)
    monkeypatch.setattr(ppl, "resolve_acceleration", lambda *a, **k: Acceleration(True, False, "eager"))
    torch.manual_seed(0)
    compiled = evaluate_ppl(model, LogLinearNoise(), batches, "t_DCE", 2, compile=True, progress=False)
    assert compiled.mean_loss == pytest.approx(eager.mean_loss, rel=1e-6)
    assert "hidden" not in model.__dict__  # the model's own body again


# -- on a GPU: real CUDA graphs against the eager run (benchmarks/gpu_check runs these) ------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU (emulated above)")


@cuda_only
@pytest.mark.parametrize("case", ["exact", "cached-r2", "cached-r3-unpruned"])
def test_cuda_graph_sampler_equals_eager_on_the_gpu(case, monkeypatch):
    monkeypatch.setattr(evaluator, "MIN_TICKS_FOR_GRAPH", 1)
    model = normal_head_model(n_blocks=2, length=12).cuda()
    cfg = SamplerConfig(steps=9, rows_in_flight=4, **CASES[case])
    eager, _ = generate(model, LogLinearNoise(), 10, config=cfg.replace(cuda_graphs=False), seed=3, progress=False)
    graphed, stats = generate(model, LogLinearNoise(), 10, config=cfg, seed=3, progress=False)
    assert stats.cuda_graphs > 0 and torch.equal(graphed, eager)


@cuda_only
def test_cuda_graph_static_row_evaluation_equals_eager_on_the_gpu():
    model, noise = normal_head_model(n_blocks=2, length=12).cuda(), LogLinearNoise()
    x = torch.randint(0, 10, (3, 12), device="cuda")
    eager = _static_losses(StaticRowLoss(model, noise, "lambda_DCE", 1e-3, Acceleration(False, False)), model, x, 4)
    graphed_loss = StaticRowLoss(model, noise, "lambda_DCE", 1e-3, Acceleration(False, True))
    graphed = _static_losses(graphed_loss, model, x, 4)
    assert len(graphed_loss.graphs) == 1 and all(torch.equal(a, b) for a, b in zip(eager, graphed))


# -- the policy and the graph set, line by line: exact results, messages, pools, clocks -------------------------
def test_defaults_are_no_compile_and_graphs_on_cuda_in_one_process():
    assert resolve_acceleration(CUDA) == Acceleration(compile=False, cuda_graphs=True, backend="inductor")
    assert resolve_acceleration(CPU) == Acceleration(compile=False, cuda_graphs=False, backend="inductor")
    assert resolve_acceleration(CPU, True, backend="aot_eager").backend == "aot_eager"


def test_explicit_graphs_are_honoured_where_they_can_work():
    assert resolve_acceleration(CUDA, False, True) == Acceleration(False, True)  # manual graphs: no compile needed
    assert resolve_acceleration(CUDA, True, True, graphs_need_compile=True) == Acceleration(True, True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(device=CPU, cuda_graphs=True),
     "cuda_graphs=True needs a CUDA device (this path runs on cpu); pass cuda_graphs=False or leave it unset"),
    (dict(device=CUDA, compile=False, cuda_graphs=True, graphs_need_compile=True),
     "cuda_graphs=True here needs compile=True (these graphs are torch.compile's)"),
    (dict(device=CUDA, compile=True, cuda_graphs=True, world_size=2),
     "cuda_graphs=True cannot capture a 2-rank step (DDP's all-reduce); leave it unset"),
    (dict(device=CPU, compile=True, backend="tvm"),
     "unknown torch.compile backend 'tvm'; choose one of inductor, aot_eager, eager"),
])
def test_policy_errors_word_for_word(kwargs, message):
    with pytest.raises(ValueError) as err:
        resolve_acceleration(**kwargs)
    assert str(err.value) == message


def test_compiled_asks_for_static_shapes_and_the_mode(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    Acceleration(True, False, "aot_eager").compiled(torch.neg, mode="reduce-overhead")
    Acceleration(True, False).compiled(torch.neg)
    assert calls == [dict(backend="aot_eager", mode="reduce-overhead", dynamic=False),
                     dict(backend="inductor", mode=None, dynamic=False)]


def test_new_graph_pool_only_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "a pool")
    assert acceleration.new_graph_pool(CUDA) == "a pool" and acceleration.new_graph_pool(CPU) is None


class _CountingCapture:
    """A capture that records its pool and sleeps a little (so the capture time is measurable)."""

    def __init__(self):
        self.pools = []

    def __call__(self, fn, example, pool, static):
        self.pools.append(pool)
        time.sleep(0.01)
        return EmulatedGraph(fn, example, pool, static)


def test_graph_set_captures_each_key_once_in_one_pool_and_times_it(monkeypatch):
    made = []
    monkeypatch.setattr(acceleration, "new_graph_pool", lambda device: made.append(device) or "fresh pool")
    capture = _CountingCapture()
    graphs = GraphSet(torch.neg, CPU, True, what="test", capture=capture)
    graphs.prepare([((2,), (torch.ones(2),))])
    first = graphs.capture_seconds
    graphs.prepare([((2,), (torch.ones(2),)), ((3,), (torch.ones(3),))])  # (2,) is there already
    assert capture.pools == ["fresh pool", "fresh pool"] and made == [CPU]
    assert 0.01 <= first < 5 and first + 0.01 <= graphs.capture_seconds < 10
    shared = GraphSet(torch.neg, CPU, True, what="test", capture=capture, pool="shared pool")
    shared.prepare([((4,), (torch.ones(4),))])
    assert capture.pools[-1] == "shared pool" and made == [CPU]


def test_graph_set_waits_for_the_gpu_before_stopping_the_clock(monkeypatch):
    synced = []
    monkeypatch.setattr(acceleration, "new_graph_pool", lambda device: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    graphs = GraphSet(torch.neg, CUDA, True, what="test", capture=lambda fn, example, pool, static: "graph")
    graphs.prepare([((2,), (torch.ones(2),))])
    graphs.prepare([((2,), (torch.ones(2),))])  # nothing new: no sync
    assert synced == [CUDA]


def test_a_failed_capture_warns_once_and_stays_off():
    def failing(fn, example, pool, static):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = GraphSet(torch.neg, CPU, True, what="the thing", capture=failing)
    with pytest.warns(RuntimeWarning) as caught:
        graphs.prepare([((2,), (torch.ones(2),)), ((3,), (torch.ones(3),))])
    assert len(caught) == 1
    assert str(caught[0].message) == ("CUDA graph capture of the thing failed (operation not permitted when stream is "
                                      "capturing); running it eagerly. Pass cuda_graphs=False to silence this.")
    assert graphs.enabled is False
