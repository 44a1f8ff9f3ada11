"""The engine's evaluation plumbing (radd_fast/sampling/evaluator.py), unit by unit, against hand-computed values.

``token_buffers`` and ``compact`` are static-shape bookkeeping that the sampler tests only see
through their samples; ``BodyRunner`` routes each call to the graph of its shape. Each is checked
here exactly: buffer layouts, gather plans with padding, which graph a call replays.
"""
import pytest
import torch

from radd_fast.acceleration import Acceleration
from radd_fast.model.kv_cache import KVCache
from radd_fast.sampling import evaluator
from radd_fast.sampling.evaluator import BodyRunner, compact, token_buffers
from tests.support.graphs import EmulatedGraph
from tests.support.models import normal_head_model

MASK = 99


# -- token_buffers ------------------------------------------------------------------------------------------------
def test_token_buffers_layout():
    x0 = torch.tensor([[1, MASK, 3], [MASK, 5, 6]])
    group = torch.tensor([[-1, 0, -1], [1, -1, -1]], dtype=torch.int32)
    x_flat, x, grp, trash = token_buffers(x0, group)
    R, L = x0.shape
    assert trash == (R + 1) * L and x_flat.shape == (trash + 1,) and x_flat.dtype == torch.int64
    assert x.data_ptr() == x_flat.data_ptr() and x.shape == (R + 1, L)  # a view: writes through x_flat land in x
    assert torch.equal(x[:R], x0) and torch.equal(x[R], x0[0])  # the padding row: valid tokens of row 0
    assert int(x_flat[trash]) == 0
    assert grp.dtype == torch.int32 and grp.shape == (R + 1, L)
    assert torch.equal(grp[:R], group) and bool((grp[R] == -1).all())  # the padding row reveals nothing


def test_token_buffers_of_an_empty_wave():
    x_flat, x, grp, trash = token_buffers(torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, 4, dtype=torch.int32))
    assert trash == 4 and torch.equal(x_flat, torch.zeros(5, dtype=torch.int64)) and bool((grp == -1).all())


# -- compact ----------------------------------------------------------------------------------------------------------
def test_compact_gathers_the_revealed_rows_and_sends_padding_to_the_trash():
    L, trash = 4, 999
    rows = torch.tensor([2, 0])  # evaluated rows: batch row 0 is wave row 2, batch row 1 is wave row 0
    reveal = torch.tensor([False, True, False, True,   # batch row 0: positions 1, 3
                           True, False, False, False])  # batch row 1: position 0
    src, dst = compact(reveal, rows, L, P=5, N=3, trash=trash)
    assert src.tolist() == [1, 3, 4, 0, 0]  # flat indices into the [Bb * L] hidden rows; padding reads row 0
    assert dst.tolist() == [2 * L + 1, 2 * L + 3, 0 * L + 0, trash, trash]
    assert src.dtype == dst.dtype == torch.int64


def test_compact_without_padding():
    src, dst = compact(torch.tensor([True, True]), torch.tensor([1]), 2, P=2, N=2, trash=7)
    assert src.tolist() == [0, 1] and dst.tolist() == [2, 3]


# -- BodyRunner --------------------------------------------------------------------------------------------------------
@pytest.fixture
def graphed():
    return Acceleration(compile=False, cuda_graphs=True)


def _replays(runner: BodyRunner) -> dict:
    return {key: graph.replays for s in runner.graph_sets for key, graph in s.graphs.items()}


def test_body_graphs_for_the_shapes_used_often_enough_largest_first(graphed):
    model = normal_head_model(n_blocks=1, length=6)
    runner = BodyRunner(model, graphed, capture=EmulatedGraph)
    n = evaluator.MIN_TICKS_FOR_GRAPH
    runner.prepare({(2, 6): n, (4, 6, 3): n, (1, 6): n - 1})
    assert list(runner.body_graphs.graphs) == [(4, 6, 3), (2, 6)] and runner.captured == 2
    x = torch.randint(0, 10, (4, 6))
    rows = torch.tensor([0, 7, 23])
    assert torch.equal(runner(x, rows), model.hidden(x, rows=rows))
    assert torch.equal(runner(x[:2]), model.hidden(x[:2]))
    runner(x[:1])  # never captured: eager
    assert _replays(runner) == {(4, 6, 3): 1, (2, 6): 1}


def test_cached_graphs_are_keyed_by_kind_and_shape(graphed):
    model = normal_head_model(n_blocks=1, length=6)
    cache = KVCache.allocate(model, slots=2, length=6)
    runner = BodyRunner(model, graphed, cache, capture=EmulatedGraph)
    n = evaluator.MIN_TICKS_FOR_GRAPH
    runner.prepare_cached({(2, 6, 3): n, (2, 6): n}, {(2, 4): n})
    assert set(_replays(runner)) == {("fill", 2, 6, 3), ("fill", 2, 6), ("cached", 2, 4)}
    x = torch.randint(0, 10, (2, 6))
    slots = torch.tensor([0, 1])
    runner.filling(x, slots, torch.tensor([0, 5, 11]))
    runner.filling(x, slots)
    positions = torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5]])
    write = cache.write_index(slots, positions)
    runner.cached(x.gather(1, positions), positions, write)
    assert set(_replays(runner).values()) == {1}


def test_graph_sets_share_one_pool_and_name_themselves(monkeypatch, graphed):
    made = []
    monkeypatch.setattr(evaluator, "new_graph_pool", lambda device: made.append(device) or "the pool")
    model = normal_head_model(n_blocks=1, length=6)
    runner = BodyRunner(model, graphed, KVCache.allocate(model, slots=1, length=6), capture=EmulatedGraph)
    assert [s.pool for s in runner.graph_sets] == ["the pool"] * 3 and len(made) == 1
    assert [s.what for s in runner.graph_sets] == ["the transformer body", "the cache-filling body", "the cached evaluation"]
    eager = BodyRunner(model, Acceleration(False, False), capture=EmulatedGraph)
    assert eager.body_graphs.pool is None and len(made) == 1  # no graphs: no pool
