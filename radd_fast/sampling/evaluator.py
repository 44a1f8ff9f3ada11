"""One evaluation of the fast engine: the transformer body on whole rows, the head only where tokens are revealed.

``BodyRunner``: ``model.hidden`` on a [Bb, L] batch, replayed from a CUDA graph per
batch bucket (optionally ``torch.compile``d). ``RevealSampler``: gathers the
revealed positions' hidden rows (static shape P, padded), runs the output head
on them alone and draws their tokens with the strategy, writing straight into
the flat token buffer:
- ``direct``: the fused Triton kernel (kernels/sampling_update.py): final norm in
  torch on [P, d], then logits tile by tile with a running Gumbel-max, so the
  [P, V] logits never exist;
- ``top_k`` / ``top_p``: need the sorted distribution, so [P, V-1] logits are built
  in torch for the revealed rows only (P is small), filtered, then the Gumbel-max
  + write kernel runs on them.
Without Triton (CPU, no interpreter) the same steps run in torch with Gumbel noise
from the engine's seeded generator.
"""
from __future__ import annotations

import warnings

import torch

from ..kernels.sampling_update import _mix64, head_sample_update, logits_sample_update
from ..kernels.utils import triton_runs_on
from .strategies import filter_logits, gumbel

MIN_TICKS_FOR_GRAPH = 4  # buckets used fewer times run eagerly (a capture costs a few forwards)


class BodyRunner:
    """x [Bb, L] int64 -> model.hidden(x) [Bb, L, d], through CUDA graphs where enabled."""

    def __init__(self, model, cuda_graphs: bool, compile: bool):
        self.model = model
        self.fn = torch.compile(model.hidden, dynamic=False) if compile else model.hidden
        self.use_graphs = cuda_graphs
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None

    def prepare(self, shapes_used: dict[tuple[int, int], int]) -> None:
        """Capture one graph per (batch, length) used at least MIN_TICKS_FOR_GRAPH times, largest first."""
        if not self.use_graphs:
            return
        for shape in sorted(shapes_used, reverse=True):
            if shape in self.graphs or shapes_used[shape] < MIN_TICKS_FOR_GRAPH:
                continue
            try:
                self.graphs[shape] = self._capture(shape)
            except RuntimeError as e:  # e.g. a kernel that syncs; say so loudly and run eagerly
                warnings.warn(f"CUDA graph capture of the transformer body failed ({e}); running eagerly. "
                              "Pass cuda_graphs=False to silence this.", RuntimeWarning, stacklevel=3)
                self.use_graphs = False
                self.graphs.clear()
                return

    def _capture(self, shape):
        device = self.model.vocab_embed.embedding.device
        inp = torch.full(shape, self.model.mask_id, dtype=torch.int64, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: autotuning, caches, lazy init
            for _ in range(2):
                self.fn(inp)
        torch.cuda.current_stream(device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(inp)
        return graph, inp, out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        entry = self.graphs.get(tuple(x.shape))
        if entry is None:
            return self.fn(x)
        graph, inp, out = entry
        inp.copy_(x)
        graph.replay()
        return out  # valid until the next replay of any graph (shared pool): used at once


class RevealSampler:
    """Draw the tokens of the revealed positions of one evaluation and write them into x."""

    def __init__(self, model, strategy: str, para, dtype: torch.dtype, use_kernels: bool | None,
                 generator: torch.Generator | None):
        self.model = model
        self.strategy, self.para, self.dtype = strategy, para, dtype
        self.n_vocab = model.vocab_size - 1  # the MASK column never takes part
        linear = model.output_layer.linear
        cdtype = model.compute_dtype
        if use_kernels is None:  # the interpreter mis-reads 16-bit tl.dot tiles: fp32 only off CUDA
            use_kernels = triton_runs_on(linear.weight) and (linear.weight.is_cuda or cdtype == torch.float32)
        if use_kernels and not triton_runs_on(linear.weight):
            raise ValueError("use_kernels=True needs CUDA tensors or TRITON_INTERPRET=1")
        self.use_kernels = use_kernels
        # The autocast head sees W, b in the compute dtype; cast once, not per evaluation.
        self.weight = linear.weight.detach().to(cdtype).contiguous()
        self.bias = linear.bias.detach().to(cdtype).contiguous()
        self.generator = generator

    def __call__(self, h_rows: torch.Tensor, dst: torch.Tensor, x_flat: torch.Tensor, key: int) -> None:
        """h_rows: [P, d] hidden rows of the revealed positions (padding included); dst: [P] into x_flat."""
        fp64 = self.dtype == torch.float64
        if self.use_kernels and self.strategy == "direct":
            hn = self.model.output_layer.norm_final(h_rows).to(self.weight.dtype)
            head_sample_update(hn, self.weight, self.bias, self.n_vocab, dst, x_flat, seed=key, fp64=fp64)
            return
        logits = filter_logits(self.model.head(h_rows)[:, : self.n_vocab], self.strategy, self.para)
        if self.use_kernels:
            logits_sample_update(logits, dst, x_flat, seed=key, fp64=fp64)
            return
        scores = logits.to(self.dtype)
        scores += gumbel(scores.shape, self.dtype, scores.device, self.generator)
        x_flat.index_copy_(0, dst, scores.argmax(dim=-1))


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


def tick_key(seed: int, tick: int) -> int:
    """The Philox key of one evaluation: distinct for every (seed, tick)."""
    return _mix64(_mix64(seed) ^ tick)
