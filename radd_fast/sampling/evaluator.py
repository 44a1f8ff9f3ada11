"""One evaluation of the fast engine, minus the head: the transformer body and the gather plan.

``BodyRunner``: ``model.hidden`` on a [Bb, L] batch of rows (and, for the approximate sampler,
the cache-filling and cached forms of it), replayed from a CUDA graph per batch bucket and
compiled as ``radd_fast.acceleration`` decides. ``compact``: the static-shape plan that gathers
the revealed positions' hidden rows (P of them, padded) and says where their tokens go; the
model's output head (``radd_fast.model.head``) then runs on those rows alone and writes the tokens.
"""
from __future__ import annotations

import torch

from ..acceleration import Acceleration, CapturedGraph, GraphSet, new_graph_pool
from ..model.kv_cache import KVCache, hidden_cached, hidden_filling

MIN_TICKS_FOR_GRAPH = 4  # shapes used fewer times run eagerly (a capture costs a few forwards)


class BodyRunner:
    """The transformer body of one evaluation, through CUDA graphs and compilation per the policy.

    ``body(x)``: x [Bb, L] int64 -> model.hidden(x) [Bb, L, d]; ``body(x, rows)`` with rows [P]
    flat indices into the Bb * L positions -> their hidden rows [P, d] (the last block pruned to
    them). With a ``cache`` (the approximate sampler): ``filling(x, slots, rows)`` is the same
    evaluation filling the rows' caches (``kv_cache.hidden_filling``) and ``cached(tokens,
    positions, write)`` pushes a few positions per row through the blocks against the cache
    (``kv_cache.hidden_cached``). Graphs are keyed by shape: (Bb, L[, P]) for the body,
    ("fill", Bb, L[, P]) and ("cached", Bb, S); all share one memory pool, so an output is valid
    until the next call of any of them. capture: how a graph is made (tests emulate it on a CPU).
    """

    def __init__(self, model, acceleration: Acceleration, cache: KVCache | None = None, capture=None):
        self.model, self.cache = model, cache
        capture = capture or CapturedGraph  # looked up per run: tests swap in a CPU emulation
        graphs = acceleration.cuda_graphs
        pool = new_graph_pool(model.device) if graphs else None

        def graph_set(fn, what: str) -> GraphSet:
            return GraphSet(acceleration.compiled(fn), model.device, graphs, what=what, capture=capture, pool=pool)

        self.body_graphs = graph_set(self._hidden, "the transformer body")
        self.fill_graphs = self.cached_graphs = None
        if cache is not None:
            self.fill_graphs = graph_set(self._filling, "the cache-filling body")
            self.cached_graphs = graph_set(self._cached, "the cached evaluation")

    # the functions captured (plain positional tensors: the graphs copy their inputs by position)
    def _hidden(self, x, rows):
        return self.model.hidden(x, rows=rows)

    def _filling(self, x, slots, rows):
        return hidden_filling(self.model, x, self.cache, slots, rows=rows)

    def _cached(self, tokens, positions, write):
        return hidden_cached(self.model, tokens, positions, write, self.cache)

    @property
    def graph_sets(self) -> list[GraphSet]:
        """The graph sets this runner has: the body, and with a cache the filling and cached ones."""
        return [s for s in (self.body_graphs, self.fill_graphs, self.cached_graphs) if s is not None]

    @property
    def captured(self) -> int:
        """CUDA graphs captured so far."""
        return sum(len(s) for s in self.graph_sets)

    @property
    def capture_seconds(self) -> float:
        """Graph capture and its warm-up: timed apart from sampling."""
        return sum(s.capture_seconds for s in self.graph_sets)

    # -- capture ---------------------------------------------------------------------------------
    def prepare(self, shapes_used: dict[tuple[int, ...], int]) -> None:
        """Capture one body graph per shape (Bb, L[, P]) used at least MIN_TICKS_FOR_GRAPH times, largest first."""
        self.body_graphs.prepare((shape, self._body_example(shape)) for shape in _worth_capturing(shapes_used))

    def prepare_cached(self, fill_shapes: dict[tuple[int, ...], int], cached_shapes: dict[tuple[int, int], int]) -> None:
        """The approximate sampler's graphs: filling (Bb, L[, P]) and cached (Bb, S) shapes, as ``prepare``."""
        fills = []
        for shape in _worth_capturing(fill_shapes):
            x, rows = self._body_example(shape)
            dump = torch.full((shape[0],), self.cache.dump_slot, dtype=torch.int64, device=x.device)
            fills.append((("fill", *shape), (x, dump, rows)))  # the example's keys and values go to the dump slot
        self.fill_graphs.prepare(fills)
        self.cached_graphs.prepare((("cached", B, S), self._cached_example(B, S)) for B, S in _worth_capturing(cached_shapes))

    def _body_example(self, shape: tuple[int, ...]) -> tuple:
        device = self.model.device
        x = torch.full(shape[:2], self.model.mask_id, dtype=torch.int64, device=device)
        return x, (torch.zeros(shape[2], dtype=torch.int64, device=device) if len(shape) == 3 else None)

    def _cached_example(self, B: int, S: int) -> tuple:
        """Inputs of a cached evaluation whose writes all go to the dump position (harmless to run)."""
        device = self.model.device
        tokens = torch.full((B, S), self.model.mask_id, dtype=torch.int64, device=device)
        positions = torch.zeros(B, S, dtype=torch.int64, device=device)
        dump = torch.full((B, S), self.cache.length, dtype=torch.int64, device=device)
        return tokens, positions, self.cache.write_index(torch.arange(B, device=device), dump)

    # -- the calls -------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.body_graphs(_call_shape(x, rows), x, rows)

    def filling(self, x: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.fill_graphs(("fill", *_call_shape(x, rows)), x, slots, rows)

    def cached(self, tokens: torch.Tensor, positions: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        return self.cached_graphs(("cached", *tokens.shape), tokens, positions, write)


def body_shape(rows: int, length: int, head_rows: int, prune: bool) -> tuple[int, ...]:
    """The shape key of one body evaluation: (rows, L), or (rows, L, head rows) when the last block
    is pruned to the revealed rows (the key ``BodyRunner`` keys its graphs by)."""
    return (int(rows), int(length), int(head_rows)) if prune else (int(rows), int(length))


def _call_shape(x: torch.Tensor, rows: torch.Tensor | None) -> tuple[int, ...]:
    """The ``body_shape`` of a call on tokens x [Bb, L], pruned when it is given the revealed rows."""
    return body_shape(x.shape[0], x.shape[1], 0 if rows is None else rows.shape[0], rows is not None)


def _worth_capturing(shapes_used: dict) -> list:
    """The shapes used at least MIN_TICKS_FOR_GRAPH times, largest first (the pool then fits the rest)."""
    return [shape for shape in sorted(shapes_used, reverse=True) if shapes_used[shape] >= MIN_TICKS_FOR_GRAPH]


def token_buffers(x0: torch.Tensor, group: torch.Tensor):
    """The token buffers of one wave: x0 [R, L] (MASK where free), group [R, L] (-1 where fixed) ->
    x_flat [(R + 1) L + 1] int64 holding the R rows, a padding row (valid tokens, nothing revealed)
    and one trash cell that padded head rows write to; x, its [R + 1, L] view; grp [R + 1, L] int32
    (the padding row reveals nothing); trash, the index of the trash cell."""
    R, L = x0.shape
    trash = (R + 1) * L
    x_flat = torch.empty(trash + 1, dtype=torch.int64, device=x0.device)
    x = x_flat[:trash].view(R + 1, L)
    x[:R] = x0
    x[R] = x0[0] if R else 0
    x_flat[trash] = 0
    grp = torch.full((R + 1, L), -1, dtype=torch.int32, device=x0.device)
    grp[:R] = group
    return x_flat, x, grp, trash


def compact(reveal: torch.Tensor, rows: torch.Tensor, length: int, P: int, N: int, trash: int):
    """Static-shape gather plan of the revealed positions of one evaluation.

    reveal [Bb * L] bool (exactly N true, N <= P); rows [Bb] the evaluated rows ->
    src [P] int64 (flat index into the [Bb * L] hidden rows; padding reads row 0) and
    dst [P] int64 (flat index into x; padding writes the trash cell). No host sync.
    """
    n = reveal.numel()
    pos = torch.cumsum(reveal, dim=0) - 1
    ar = torch.arange(n, device=reveal.device)
    slot = torch.where(reveal, pos, P + ar)  # distinct dump slots: no duplicate-index writes
    src = torch.zeros(P + n, dtype=torch.int64, device=reveal.device).scatter_(0, slot, ar)[:P]
    valid = torch.arange(P, device=reveal.device) < N
    dst = rows.index_select(0, src // length).long() * length + src % length
    return src, torch.where(valid, dst, torch.full_like(dst, trash))
