"""One evaluation of the fast engine, minus the head: the transformer body and the gather plan.

``BodyRunner``: ``model.hidden`` on a [Bb, L] batch of rows, replayed from a CUDA
graph per batch bucket (optionally ``torch.compile``d). ``compact``: the static-shape
plan that gathers the revealed positions' hidden rows (P of them, padded) and says
where their tokens go; the model's output head (``radd_fast.model.head``) then runs
on those rows alone and writes the tokens.
"""
from __future__ import annotations

import time
import warnings

import torch

MIN_TICKS_FOR_GRAPH = 4  # buckets used fewer times run eagerly (a capture costs a few forwards)


class BodyRunner:
    """The transformer body of one evaluation, through CUDA graphs where enabled.

    ``body(x)``: x [Bb, L] int64 -> model.hidden(x) [Bb, L, d]; ``body(x, rows)`` with rows [P]
    flat indices into the Bb * L positions -> their hidden rows [P, d] (the last block pruned to
    them). A graph is keyed by the shapes it was captured for: (Bb, L) or (Bb, L, P).
    """

    def __init__(self, model, cuda_graphs: bool, compile: bool):
        self.model = model
        self.fn = torch.compile(model.hidden, dynamic=False) if compile else model.hidden
        self.use_graphs = cuda_graphs
        self.graphs: dict[tuple[int, ...], tuple] = {}
        self.pool = None
        self.capture_seconds = 0.0  # graph capture and its warm-up: timed apart from sampling

    def prepare(self, shapes_used: dict[tuple[int, ...], int]) -> None:
        """Capture one graph per shape used at least MIN_TICKS_FOR_GRAPH times, largest first."""
        if not self.use_graphs:
            return
        todo = [shape for shape in sorted(shapes_used, reverse=True)
                if shape not in self.graphs and shapes_used[shape] >= MIN_TICKS_FOR_GRAPH]
        if not todo:  # every shape captured already: no sync, nothing to time
            return
        start = time.perf_counter()
        try:
            self._capture_all(todo)
        finally:
            torch.cuda.synchronize(self.model.device)
            self.capture_seconds += time.perf_counter() - start

    def _capture_all(self, shapes: list[tuple[int, ...]]) -> None:
        for shape in shapes:
            try:
                self.graphs[shape] = self._capture(shape)
            except RuntimeError as e:  # e.g. a kernel that syncs; say so loudly and run eagerly
                warnings.warn(f"CUDA graph capture of the transformer body failed ({e}); running eagerly. "
                              "Pass cuda_graphs=False to silence this.", RuntimeWarning, stacklevel=4)
                self.use_graphs = False
                self.graphs.clear()
                return

    def _capture(self, shape: tuple[int, ...]):
        device = self.model.device
        inp = torch.full(shape[:2], self.model.mask_id, dtype=torch.int64, device=device)
        rows = torch.zeros(shape[2], dtype=torch.int64, device=device) if len(shape) == 3 else None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: autotuning, caches, lazy init
            for _ in range(2):
                self.fn(inp, rows=rows)
        torch.cuda.current_stream(device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(inp, rows=rows)
        return graph, inp, rows, out

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        shape = tuple(x.shape) if rows is None else (*x.shape, rows.shape[0])
        entry = self.graphs.get(shape)
        if entry is None:
            return self.fn(x, rows=rows)
        graph, inp, rows_buf, out = entry
        inp.copy_(x)
        if rows is not None:
            rows_buf.copy_(rows)
        graph.replay()
        return out  # valid until the next replay of any graph (shared pool): used at once


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
