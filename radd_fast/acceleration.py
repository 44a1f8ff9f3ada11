"""When a path is compiled and replayed from CUDA graphs: one policy for sampling, evaluation and training.

Two switches, decided here once for every caller (docs/ARCHITECTURE.md, "Acceleration"):

- ``compile``: ``torch.compile`` with static shapes (``dynamic=False``: one graph per shape, as the
  callers make every shape static). ``"auto"`` is on for CUDA and off elsewhere (inductor takes
  minutes on a CPU and buys little there); ``True`` / ``False`` as given, on any device.
- ``cuda_graphs``: replay a static-shape call from a CUDA graph (the launch overhead of a
  GPT-2-sized body at small batches is most of its time). ``None`` is on for CUDA, unless the
  caller's graphs need compilation and compilation is off, or several ranks run (DDP's
  all-reduce hooks cannot be captured); ``True`` where it cannot work is an error, never a
  silent fallback.

The graphs themselves: ``GraphSet`` keeps one ``CapturedGraph`` per static input shape, sharing
one memory pool. The sampler's body, its cached evaluations and the static-row evaluation loss
use it. The training step's graphs come from inductor's ``mode="reduce-overhead"`` instead (they
must hold the backward too), which is why its graphs need compilation.

Example::

    accel = resolve_acceleration(model.device, compile="auto", cuda_graphs=None)
    body = GraphSet(accel.compiled(model.hidden), model.device, accel.cuda_graphs, what="the body")
    body.prepare([((64, 1024), (x_example,))])      # capture, timed apart
    h = body((64, 1024), x)                          # replayed; eager for a shape never captured
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

AUTO = "auto"
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager / eager: trace without code generation (tests)


@dataclass(frozen=True)
class Acceleration:
    """The resolved switches of one path: compile (with ``backend``) and cuda_graphs."""

    compile: bool
    cuda_graphs: bool
    backend: str = "inductor"

    def compiled(self, fn: Callable, mode: str | None = None) -> Callable:
        """``fn`` compiled with static shapes when ``compile`` is on, else ``fn`` itself."""
        if not self.compile:
            return fn
        return torch.compile(fn, backend=self.backend, mode=mode, dynamic=False)

    def describe(self) -> str:
        """Words for logs and summaries: 'compiled + CUDA graphs', 'eager', ..."""
        parts = ([f"compiled ({self.backend})"] if self.compile else []) + (["CUDA graphs"] if self.cuda_graphs else [])
        return " + ".join(parts) or "eager"


def resolve_acceleration(device: torch.device | str, compile: bool | str = False, cuda_graphs: bool | None = None, *,
                         backend: str = "inductor", graphs_need_compile: bool = False,
                         world_size: int = 1) -> Acceleration:
    """The one decision of what runs compiled and what from CUDA graphs (the module docstring's rules).

    device: where the path runs; compile: True / False / "auto"; cuda_graphs: True / False / None
    (default); backend: the ``torch.compile`` backend; graphs_need_compile: the caller's graphs are
    inductor's (training), so graphs without compilation cannot exist; world_size: ranks of the run.
    Raises ValueError naming the switch when a request cannot be honoured.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if compile != AUTO and not isinstance(compile, bool):
        raise ValueError(f"compile must be true, false or {AUTO!r}, got {compile!r}")
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"unknown torch.compile backend {backend!r}; choose one of {', '.join(COMPILE_BACKENDS)}")
    compile = on_cuda if compile == AUTO else compile
    if cuda_graphs is None:
        cuda_graphs = on_cuda and world_size == 1 and (compile or not graphs_need_compile)
    elif cuda_graphs:
        if not on_cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device (this path runs on {device.type}); "
                             "pass cuda_graphs=False or leave it unset")
        if graphs_need_compile and not compile:
            raise ValueError("cuda_graphs=True here needs compile=True (these graphs are torch.compile's)")
        if world_size > 1:
            raise ValueError(f"cuda_graphs=True cannot capture a {world_size}-rank step (DDP's all-reduce); "
                             "leave it unset")
    return Acceleration(compile=bool(compile), cuda_graphs=bool(cuda_graphs), backend=backend)


class CapturedGraph:
    """``fn(*inputs)`` captured in one CUDA graph for the shapes and dtypes of ``example``.

    example: the positional arguments of a typical call (tensors, or None for an absent optional
    argument; they are copied into the graph's own input buffers). ``static``: keyword constants
    baked into the capture. A call copies its arguments into the buffers, replays, and returns the
    graph's own outputs: valid until the next replay of any graph of the same pool.
    """

    def __init__(self, fn: Callable, example: tuple, pool, static: dict | None = None, warmup: int = 2):
        self.inputs = tuple(None if a is None else a.clone() for a in example)
        static = static or {}
        device = next(a.device for a in example if a is not None)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: autotuning, lazy init, allocator caches
            for _ in range(warmup):
                fn(*self.inputs, **static)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs, **static)

    def __call__(self, *args):
        for buffer, value in zip(self.inputs, args):
            if buffer is not None:
                buffer.copy_(value)
        self.graph.replay()
        return self.output


def new_graph_pool(device: torch.device):
    """A memory pool the graphs of one ``GraphSet`` share (None off CUDA: the emulated graphs of tests)."""
    return torch.cuda.graph_pool_handle() if device.type == "cuda" else None


class GraphSet:
    """``fn`` replayed from one CUDA graph per key (a static input shape), eager where none is captured.

    fn: the function (compiled or not); device: where it runs; enabled: the policy's ``cuda_graphs``;
    what: its name in the warning when a capture fails (the set then runs eagerly: a kernel that
    syncs cannot be captured). capture: how one graph is made (``CapturedGraph``; tests pass an
    emulation that runs on the CPU); pool: a ``new_graph_pool`` shared with other sets. ``capture_seconds``: capture and warm-up time, which callers
    report apart from the time of the work itself.
    """

    def __init__(self, fn: Callable, device: torch.device, enabled: bool, *, what: str,
                 capture: Callable = CapturedGraph, pool=None):
        self.fn, self.device, self.enabled, self.what = fn, torch.device(device), bool(enabled), what
        self.capture = capture
        self.graphs: dict = {}
        self.pool = pool  # None: made at the first capture; pass one to share it between sets
        self.capture_seconds = 0.0

    def __len__(self) -> int:
        return len(self.graphs)

    def prepare(self, examples: Iterable[tuple]) -> None:
        """Capture a graph for each ``(key, args[, static])`` not captured yet (in the given order)."""
        if not self.enabled:
            return
        todo = [e for e in examples if e[0] not in self.graphs]
        if not todo:  # nothing to capture: no sync, nothing to time
            return
        start = time.perf_counter()
        try:
            for key, args, *static in todo:
                if not self._capture_one(key, args, static[0] if static else None):
                    return
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.capture_seconds += time.perf_counter() - start

    def _capture_one(self, key, args: tuple, static: dict | None) -> bool:
        if self.pool is None:
            self.pool = new_graph_pool(self.device)
        try:
            self.graphs[key] = self.capture(self.fn, args, self.pool, static)
        except RuntimeError as e:
            warnings.warn(f"CUDA graph capture of {self.what} failed ({e}); running it eagerly. "
                          "Pass cuda_graphs=False to silence this.", RuntimeWarning, stacklevel=3)
            self.enabled = False
            self.graphs.clear()
            return False
        return True

    def __call__(self, key, *args, **static):
        """fn(*args, **static), from the graph of ``key`` when there is one."""
        graph = self.graphs.get(key)
        return self.fn(*args, **static) if graph is None else graph(*args)
