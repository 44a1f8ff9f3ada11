"""The approximate sampler: each row's keys and values reused between evaluations (opt-in).

``generate(..., refresh_every=R)`` (docs/SAMPLING.md, "Beyond exact"). Evaluation k of a
row is *full* when k % R == 0: the exact engine's evaluation, which also fills the
row's key/value cache (``radd_fast.model.kv_cache``). The other evaluations are
*cached*: only the positions whose token changed since that fill (revealed at
evaluations k0 .. k-1, k0 = k - k % R) and the positions revealed now (k) go through
the blocks; their queries attend over the row's cached keys and values, their own
entries overwritten first. The head runs at the revealed positions, as in the
exact engine. R = 1 is the exact engine bit for bit (every evaluation is full).

Both kinds share one tick of the exact engine's plan (``batching.plan_ticks``): a tick's
full rows form one sub-batch ([Bf, L], padded to a power of two), its cached rows
another ([B, S], B the plan's width: each cached row at its cache slot, so that the
attention reads the cache in place; S pushed positions per row, padded to a power of
two; padding queries repeat a real position and write their keys to the cache's dump
position).
Every shape and count is planned on the host in the wave's three syncs, as in the
exact engine; nothing in the loop syncs. Both kinds of evaluation run through the
engine's ``BodyRunner``: replayed from a CUDA graph per shape (("fill", Bb, L[, P]) and
("cached", B, S)) and compiled, as ``radd_fast.acceleration`` decides.
"""
from __future__ import annotations

import heapq
from collections import Counter

import numpy as np
import torch

from ..model.kv_cache import KVCache
from .batching import NO_CAP, PlannedWave, bucket, plan_ticks
from .evaluator import body_shape, compact, token_buffers
from .schedule import group_sizes


def _pow2(n: np.ndarray, buckets: bool) -> np.ndarray:
    """Head rows / pushed positions padded like the exact engine's head rows: next power of two (0 stays 0)."""
    n = np.asarray(n, dtype=np.int64)
    if not buckets:
        return n.copy()
    return np.where(n > 0, bucket(n, NO_CAP), 0)


def assign_slots(rows: np.ndarray, k: np.ndarray, K: np.ndarray, n_slots: int, dump: int) -> np.ndarray:
    """Cache slot (< n_slots) of every row [R + 1] (the padding row R: the cache's dump slot ``dump``).

    A row lives on consecutive ticks from its first evaluation (k = 0) for K ticks; at most
    ``n_slots`` rows live at once (the plan's width), so a freed slot is always at hand.
    """
    R = K.shape[0]
    slot = np.full(R + 1, dump, dtype=np.int64)
    t_idx, j_idx = np.nonzero(k == 0)
    started = rows[t_idx, j_idx]
    free = list(range(n_slots))
    busy: list[tuple[int, int]] = []  # (tick the slot frees up, slot): a min-heap
    for t, r in sorted(zip(t_idx.tolist(), started.tolist())):
        while busy and busy[0][0] <= t:
            heapq.heappush(free, heapq.heappop(busy)[1])
        s = heapq.heappop(free)
        slot[r] = s
        heapq.heappush(busy, (t + int(K[r]), s))
    return slot


def entry_counts(grp: torch.Tensor, K: torch.Tensor, rows_d: torch.Tensor, k_d: torch.Tensor,
                 refresh_every: int) -> np.ndarray:
    """Per plan entry (tick t, place j): positions revealed and positions pushed -> [2, T, B] int64 (host).

    grp [R + 1, L] (reveal group per position, -1 fixed); rows_d, k_d [T, B] the plan. Revealed:
    the row's group k. Pushed by a cached evaluation: groups k0 .. k (k0 = k - k % R). Two syncs
    (K.max and the one copy back), like the exact engine's head-row counts.
    """
    counts, n_groups = group_sizes(grp, K)
    R1 = grp.shape[0]
    upto = counts[:-1].view(R1, n_groups).cumsum(dim=1)  # [R1, G] positions in groups <= g
    due = k_d >= 0  # padding entries (k = -2) reveal and push nothing
    k = k_d.long().clamp(min=0)
    k0 = k - k % refresh_every
    revealed = counts[rows_d * n_groups + k] * due
    before = torch.where(k0 > 0, upto[rows_d, (k0 - 1).clamp(min=0)], torch.zeros_like(k0))
    pushed = (upto[rows_d, k] - before) * due
    return torch.stack([revealed, pushed]).cpu().numpy()


def _sub_batch(rows: np.ndarray, k: np.ndarray, take: np.ndarray, pad_row: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries of each tick where ``take`` [T, B], first in plan order, then padding (pad_row, k = -2)."""
    order = np.argsort(~take, axis=1, kind="stable")
    taken = np.take_along_axis(take, order, axis=1)
    sub_rows = np.where(taken, np.take_along_axis(rows, order, axis=1), pad_row)
    sub_k = np.where(taken, np.take_along_axis(k, order, axis=1), -2).astype(np.int32)
    return sub_rows, sub_k


def _by_slot(rows: np.ndarray, k: np.ndarray, take: np.ndarray, slot: np.ndarray, pad_row: int):
    """The entries of each tick where ``take`` [T, B], placed at their row's cache slot (< B) so that
    the cached evaluation reads the cache in place; the other places: padding (pad_row, k = -2)."""
    by_rows = np.full(rows.shape, pad_row, dtype=np.int64)
    by_k = np.full(rows.shape, -2, dtype=np.int32)
    t_idx, j_idx = np.nonzero(take)
    s_idx = slot[rows[t_idx, j_idx]]
    by_rows[t_idx, s_idx] = rows[t_idx, j_idx]
    by_k[t_idx, s_idx] = k[t_idx, j_idx]
    return by_rows, by_k


class CachedWave(PlannedWave):
    """One wave of rows sampled with key/value caching: the same buffers, plan and ``run`` as ``engine.Wave``.

    x0 [R, L], group [R, L], K [R] as in ``Wave``; refresh_every R >= 1; cache: a ``KVCache`` with at
    least rows_in_flight slots and length L. Per tick t (host arrays [T] unless noted):
    full_rows / full_k [T, B], full_b (padded batch), full_N / full_P (head rows, padded); the same
    for the cached sub-batch, whose rows sit at their cache slots (cached_b is B, the plan's width,
    or 0), plus cached_S (pushed positions per row, padded).
    """

    def __init__(self, x0: torch.Tensor, group: torch.Tensor, K: torch.Tensor, rows_in_flight: int, buckets: bool,
                 refresh_every: int, cache: KVCache):
        R, L = x0.shape
        self.R, self.L, self.refresh_every, self.cache = R, L, int(refresh_every), cache
        self.x_flat, self.x, self.grp, self.trash = token_buffers(x0, group)  # as in engine.Wave
        K_host = self.K_host = K.cpu().numpy()
        self.plan = plan_ticks(K_host, rows_in_flight, pad_row=R, buckets=buckets)  # host sync 1
        if cache.length != L or cache.slots < self.plan.rows.shape[1]:
            raise ValueError(f"the cache holds {cache.slots} rows of {cache.length} positions; "
                             f"this wave needs {self.plan.rows.shape[1]} of {L}")
        self._plan_sub_batches(K, K_host, buckets)

    @property
    def ticks(self) -> int:
        return self.plan.ticks

    def _plan_sub_batches(self, K: torch.Tensor, K_host: np.ndarray, buckets: bool) -> None:
        """Split every tick into its full and cached rows and size both (host sync 2 and 3)."""
        plan, R, L, device = self.plan, self.R, self.L, self.x.device
        T, B = plan.rows.shape
        active = np.arange(B)[None, :] < plan.active[:, None]
        if T:
            revealed, pushed = entry_counts(self.grp, K, torch.from_numpy(plan.rows).to(device),
                                            torch.from_numpy(plan.k).to(device), self.refresh_every)
        else:
            revealed = pushed = np.zeros((0, B), dtype=np.int64)
        full = active & (plan.k % self.refresh_every == 0)
        cached = active & ~full
        slot = assign_slots(plan.rows, plan.k, K_host, B, self.cache.dump_slot)
        self.full_rows, self.full_k = _sub_batch(plan.rows, plan.k, full, R)
        self.cached_rows, self.cached_k = _by_slot(plan.rows, plan.k, cached, slot, R)
        n_full, n_cached = full.sum(axis=1), cached.sum(axis=1)
        self.full_b = np.where(n_full > 0, bucket(n_full, B), 0) if buckets else n_full
        self.cached_b = np.where(n_cached > 0, B, 0)
        self.full_N, self.cached_N = (revealed * full).sum(axis=1), (revealed * cached).sum(axis=1)
        self.full_P, self.cached_P = _pow2(self.full_N, buckets), _pow2(self.cached_N, buckets)
        S = (pushed * cached).max(axis=1) if T else np.zeros(0, np.int64)
        self.cached_S = np.minimum(_pow2(S, buckets), L)
        self.head_n, self.head_p = self.full_N + self.cached_N, self.full_P + self.cached_P
        # Work counts: rows through the body, and token-rows (positions pushed through the blocks).
        self.eval_rows = int(plan.active.sum())
        self.eval_rows_padded = int(self.full_b.sum() + self.cached_b.sum())
        self.body_token_rows = int(L * n_full.sum() + (pushed * cached).sum())
        self.body_token_rows_padded = int(L * self.full_b.sum() + (self.cached_b * self.cached_S).sum())
        self.body_token_rows_exact = int(L * plan.active.sum())
        self.slot_d = torch.from_numpy(slot).to(device)
        self.full_rows_d, self.full_k_d = (torch.from_numpy(a).to(device) for a in (self.full_rows, self.full_k))
        self.cached_rows_d, self.cached_k_d = (torch.from_numpy(a).to(device) for a in (self.cached_rows, self.cached_k))

    # -- one evaluation ---------------------------------------------------------------------------
    def shapes_used(self, prune: bool) -> tuple[dict, dict]:
        """How often each filling shape (Bb, L[, P]) and cached shape (B, S) occurs: the graphs worth capturing."""
        fills = Counter(body_shape(b, self.L, p, prune) for b, p in zip(self.full_b, self.full_P) if b)
        cached = Counter((int(b), int(s)) for b, s in zip(self.cached_b, self.cached_S) if b)
        return fills, cached

    def _full(self, t: int, body, prune: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact engine's evaluation of tick t's full rows, filling their caches: (h_rows [P, d], dst [P])."""
        Bb, N, P = int(self.full_b[t]), int(self.full_N[t]), int(self.full_P[t])
        rows, ks = self.full_rows_d[t, :Bb], self.full_k_d[t, :Bb]
        reveal = (self.grp.index_select(0, rows) == ks[:, None]).view(-1)
        src, dst = compact(reveal, rows, self.L, P, N, self.trash)
        x = self.x.index_select(0, rows)
        slots = self.slot_d.index_select(0, rows)
        if prune:
            return body.filling(x, slots, src), dst
        return body.filling(x, slots).reshape(Bb * self.L, -1).index_select(0, src), dst

    def _cached(self, t: int, body) -> tuple[torch.Tensor, torch.Tensor]:
        """Tick t's cached rows: their pushed positions through the blocks (h_rows [P, d], dst [P])."""
        Bb, S, N, P = int(self.cached_b[t]), int(self.cached_S[t]), int(self.cached_N[t]), int(self.cached_P[t])
        rows, ks = self.cached_rows_d[t, :Bb], self.cached_k_d[t, :Bb]  # row b sits at cache slot b
        g = self.grp.index_select(0, rows)  # [Bb, L]
        positions, valid = pushed_positions(g, ks, self.refresh_every, S)
        slots = torch.arange(Bb, device=rows.device)
        write = self.cache.write_index(slots, torch.where(valid, positions, torch.full_like(positions, self.L)))
        tokens = self.x.index_select(0, rows).gather(1, positions)
        h = body.cached(tokens, positions, write)  # [Bb, S, d]
        reveal = ((g.gather(1, positions) == ks[:, None]) & valid).view(-1)
        src, _ = compact(reveal, rows, S, P, N, self.trash)
        dst = rows.index_select(0, src // S) * self.L + positions.view(-1).index_select(0, src)
        dst = torch.where(torch.arange(P, device=dst.device) < N, dst, torch.full_like(dst, self.trash))
        return h.reshape(Bb * S, -1).index_select(0, src), dst

    def evaluate(self, t: int, body, head, strategy, key: int, first_id: int, prune: bool) -> None:
        """Evaluation t: full rows, cached rows, then one head call at all the positions they reveal
        (key, first_id: the noise keys, as in ``engine.Wave.evaluate``)."""
        parts = []
        if self.full_b[t]:
            parts.append(self._full(t, body, prune))
        if self.cached_b[t]:
            if parts:  # a graph's output lives in the shared pool until the next replay: keep a copy
                parts[0] = (parts[0][0].clone(), parts[0][1])
            parts.append(self._cached(t, body))
        h_rows, dst = parts[0] if len(parts) == 1 else (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        head.sample_at(h_rows, dst, self.x_flat, strategy, key, dst + first_id)

    def run(self, body, head, strategy, key: int, first_id: int, bar, prune: bool, after=None) -> torch.Tensor:
        """Every evaluation of the wave, in plan order: tokens [R, L] (``body``: the engine's ``BodyRunner``,
        made with this wave's cache; after: called with t after evaluation t)."""
        if self.ticks:
            body.prepare_cached(*self.shapes_used(prune))
        for t in range(self.ticks):
            self.evaluate(t, body, head, strategy, key, first_id, prune)
            bar.update(1)
            if after is not None:
                after(t)
        return self.x[:self.R].clone()


def pushed_positions(g: torch.Tensor, ks: torch.Tensor, refresh_every: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions a cached evaluation pushes, packed into S slots per row.

    g [B, L] reveal groups of the rows; ks [B] the evaluation (-2: padding row, pushes nothing)
    -> positions [B, S] int64 (groups k0 .. k in position order, then the first of them repeated)
    and valid [B, S] bool. No host sync (a scatter, not a boolean index).
    """
    k = ks.long()[:, None]
    k0 = k - k % refresh_every
    return pack_positions((g >= k0) & (g <= k) & (k >= 0), S)


def pack_positions(push: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions where ``push`` [B, L] is true, in position order, packed into S slots per row (at most
    S true per row) -> positions [B, S] int64 (padding: the row's first pushed position, or 0) and valid
    [B, S] bool. No host sync (a scatter, not a boolean index)."""
    B, L = push.shape
    rank = push.cumsum(dim=1) - 1
    ar = torch.arange(L, device=push.device)
    dest = torch.where(push, rank, S + ar)  # distinct dump slots beyond S: no duplicate-index writes
    packed = torch.zeros(B, S + L, dtype=torch.int64, device=push.device).scatter_(1, dest, ar.expand(B, L))[:, :S]
    valid = torch.arange(S, device=push.device)[None, :] < push.sum(dim=1, keepdim=True)
    return torch.where(valid, packed, packed[:, :1]), valid
