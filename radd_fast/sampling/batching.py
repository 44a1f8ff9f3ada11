"""Continuous batching plan: which rows the fast engine evaluates at each tick.

Row r needs K_r evaluations (its distinct reveal steps, in order; see schedule.py)
and rows are independent, so the engine never follows a global step clock: a
fixed set of ``batch_size`` slots each works through one row's evaluations, one
per tick, and a finished row's slot takes the next row at once. Every slot has a
reveal due at every tick, so the evaluation batch stays full (static shape)
until the queue runs dry; in the tail the batch shrinks through power-of-two
buckets (a few CUDA graphs instead of one per size).

Planned on the host from K alone (one device-to-host copy per wave), so the loop
itself needs no ``.item()`` syncs. Example::

    plan = plan_ticks(K=np.array([3, 1, 2]), batch_size=2, pad_row=3)
    plan.rows[:, :2]   # [[0, 1], [0, 2], [0, 2]]: row 2 takes row 1's slot at tick 1
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass
class TickPlan:
    rows: np.ndarray  # [T, B] int64: rows evaluated at tick t, active ones first, then pad_row
    k: np.ndarray  # [T, B] int32: which of its evaluations each row does at tick t (-2 for padding)
    active: np.ndarray  # [T] int64: rows with a reveal due at tick t
    batch: np.ndarray  # [T] int64: evaluation batch at tick t (active, rounded up to a bucket)

    @property
    def ticks(self) -> int:
        return int(self.rows.shape[0])

    def done_tick(self, n_rows: int) -> np.ndarray:
        """The tick of each row's last evaluation: [n_rows] int64, -1 for a row that needs none
        (rows are 0 .. n_rows-1; the padding row, n_rows, is left out)."""
        done = np.full(n_rows, -1, dtype=np.int64)
        t, j = np.nonzero(self.rows < n_rows)
        np.maximum.at(done, self.rows[t, j], t)
        return done


NO_CAP = np.iinfo(np.int64).max  # bucket() without an upper bound


def bucket(n: np.ndarray | int, cap: int) -> np.ndarray:
    """Next power of two >= n, at most cap (n >= 1)."""
    n = np.maximum(np.asarray(n, dtype=np.int64), 1)
    pow2 = np.left_shift(1, np.ceil(np.log2(n)).astype(np.int64))
    return np.minimum(pow2, cap)


def plan_ticks(K: np.ndarray, batch_size: int, pad_row: int, buckets: bool = True) -> TickPlan:
    """Assign rows (in order) to the slot that frees first; rows with K = 0 need no evaluation."""
    K = np.asarray(K, dtype=np.int64)
    ids = np.nonzero(K > 0)[0]
    B = max(1, min(int(batch_size), len(ids)))
    if len(ids) == 0:
        empty = np.zeros((0, B), dtype=np.int64)
        return TickPlan(empty, empty.astype(np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    start = np.empty(len(ids), dtype=np.int64)
    slot = np.empty(len(ids), dtype=np.int64)
    free_at = [(0, s) for s in range(B)]  # (tick the slot frees up, slot): a min-heap
    for j, r in enumerate(ids):
        t, s = heapq.heappop(free_at)
        start[j], slot[j] = t, s
        heapq.heappush(free_at, (t + int(K[r]), s))
    Kr = K[ids]
    T = int((start + Kr).max())
    local = np.arange(int(Kr.sum())) - np.repeat(np.cumsum(Kr) - Kr, Kr)  # 0..K_r-1 per row
    tick = np.repeat(start, Kr) + local
    rows = np.full((T, B), pad_row, dtype=np.int64)
    k = np.full((T, B), -2, dtype=np.int32)
    rows[tick, np.repeat(slot, Kr)] = np.repeat(ids, Kr)
    k[tick, np.repeat(slot, Kr)] = local
    order = np.argsort(rows == pad_row, axis=1, kind="stable")  # active rows first
    rows = np.take_along_axis(rows, order, axis=1)
    k = np.take_along_axis(k, order, axis=1)
    active = (rows != pad_row).sum(axis=1)
    batch = bucket(active, B) if buckets else active.copy()
    return TickPlan(rows, k, active, batch)


class PlannedWave:
    """What a wave planned up front reports (``engine.Wave``, ``cached.CachedWave``): its head counts and
    its finished rows, from ``plan``, ``R``, ``x`` [R + 1, L], ``K_host`` [R] and the per-evaluation
    head rows ``head_n`` / ``head_p`` (padded) of the subclass. The adaptive decoders' wave
    (adaptive.py) gives the same names from what it learns while it runs."""

    @property
    def head_rows(self) -> int:
        return int(self.head_n.sum())

    @property
    def head_rows_padded(self) -> int:
        return int(self.head_p.sum())

    @property
    def tokens_revealed(self) -> int:
        """The exact samplers run the head at the revealed positions only: one row per token."""
        return self.head_rows

    @cached_property
    def _ready_at(self) -> np.ndarray:
        """[R]: the evaluation after which row r and every row before it are done."""
        return np.maximum.accumulate(self.plan.done_tick(self.R)) if self.R else np.zeros(0, np.int64)

    def leading_rows_done(self, t: int) -> int:
        """n such that rows 0 .. n-1 are all done after evaluation t (the plan says when, on the host)."""
        return int(np.searchsorted(self._ready_at, t, side="right"))

    def rows_out(self, a: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows a .. n-1 for a caller: (tokens [n - a, L] on the CPU, evaluations [n - a] int64)."""
        return self.x[a:n].cpu(), torch.from_numpy(self.K_host[a:n])
