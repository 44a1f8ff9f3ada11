"""The adaptive decoders' wave: rows in flight that finish after a number of evaluations no plan knows.

A decoder (decoders.py) reveals what the model's statistics say, so a row's evaluations are
known only once it is done. ``DecoderWave`` keeps the exact engine's unit of work (a fixed
number of slots, a row per slot, every evaluation of one static, bucketed shape, the body
through the engine's ``BodyRunner`` and its CUDA graphs) and replaces only the plan:

- the host plans CHUNKS of ``check_every`` evaluations. Before each chunk it reads, in ONE
  host sync, how many positions each slot's row still has masked (and, with the cache, how
  many its last fill pushed); finished rows leave their slots, the next rows of the wave take
  them, and the chunk's shapes are fixed from those counts: the batch is the active slots
  (a power-of-two bucket), the head capacity P the masked positions summed (a power of two:
  masked counts only fall within a chunk, so P holds every evaluation of it);
- each evaluation: the body on the rows (the last block pruned to their masked positions), the
  head's ``token_stats`` at every masked position (the drawn token, its log-probability, its
  entropy), the decoder's rule on dense [rows, L] tensors, the kept tokens written. No host sync:
  a row that finishes inside a chunk stays in the batch, with nothing masked, until the next read
  (padding: counted in the padded work, never in the work).

Host syncs per wave: 1 (each row's free positions) + one per chunk + 1 at the end (each row's
evaluations and work); none per evaluation. So the host reads "rows finished" at a fixed cadence,
every ``check_every`` evaluations (SamplerConfig.decoder_check_every, default 4), and the rows that
finish inside a chunk idle for the rest of it (at most check_every - 1 evaluations each).

With ``refresh_every`` (cached.py's key/value cache) a row's evaluation k is full when
k % refresh_every == 0 (the exact evaluation, filling the row's cache and remembering which
positions were masked then) and cached otherwise: the positions masked at that fill (those revealed
since and those still masked: a decoder needs every masked one) go through the blocks against the
cache; the unchanged, already-revealed positions keep the keys and values of the fill. The full
rows form a [Bf, L] batch, the cached rows a [B, S] batch at their cache slots, as in cached.py.
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

from ..model.kv_cache import KVCache
from .batching import NO_CAP, bucket
from .cached import pack_positions
from .decoders import Decoder, noise_ids
from .evaluator import body_shape, compact, token_buffers


class Part(NamedTuple):
    """One sub-batch of an evaluation, through the body, waiting for the head: E rows of W columns
    (full rows: the L positions; cached rows: the S positions pushed)."""

    rows: torch.Tensor  # [E] wave rows (padding: the padding row R)
    masked: torch.Tensor  # [E, W] bool: the masked columns
    src: torch.Tensor  # [P] flat indices into [E * W] of the masked columns (static P; padding reads 0)
    dst: torch.Tensor  # [P] where each one's token goes in the flat token buffer (padding: the trash cell)
    n: torch.Tensor  # () the masked columns (on the device: the host never reads it)
    h: torch.Tensor  # [P, d] their hidden rows
    work: torch.Tensor  # [E] positions each row pushed through the blocks


def _pow2(n, buckets: bool) -> int:
    """A count padded to a power of two when bucketing (0 stays 0)."""
    n = int(n)
    return int(bucket(n, NO_CAP)) if buckets and n > 0 else n


class DecoderWave:
    """One wave of rows decoded adaptively: the engine's buffers and ``run``, a plan made chunk by chunk.

    x0 [R, L] (MASK where free); group [R, L] the exact schedule's reveal groups (the decoders with
    ``uses_schedule``; else None); rows_in_flight: slots; decoder: a bound ``decoders.Decoder``;
    check_every: evaluations per chunk (the host reads which rows finished between chunks); cache:
    a ``KVCache`` with a slot per row in flight (with refresh_every) or None.
    After ``run``: ``ticks``, ``K_host`` [R] (evaluations per row) and the work counts of
    ``engine.WORK_COUNTS``.
    """

    def __init__(self, x0: torch.Tensor, group: torch.Tensor | None, rows_in_flight: int, buckets: bool,
                 decoder: Decoder, check_every: int, mask_id: int, cache: KVCache | None = None,
                 refresh_every: int | None = None):
        R, L = x0.shape
        device = x0.device
        self.R, self.L, self.mask_id, self.decoder, self.buckets = R, L, int(mask_id), decoder, buckets
        self.check_every, self.cache, self.refresh_every = int(check_every), cache, refresh_every
        group = torch.full_like(x0, -1) if group is None else group  # confidence / entropy_bound: no schedule
        self.x_flat, self.x, self.grp, self.trash = token_buffers(x0, group)
        self.x[R] = 0  # the padding row: valid tokens, nothing masked (the exact engine's keeps MASKs, never revealed)
        self.n_free = (x0 == mask_id).sum(dim=1).cpu().numpy()  # host sync 1
        self.width = max(1, min(int(rows_in_flight), int((self.n_free > 0).sum())))
        if cache is not None and (cache.length != L or cache.slots < self.width):
            raise ValueError(f"the cache holds {cache.slots} rows of {cache.length} positions; "
                             f"this wave needs {self.width} of {L}")
        # per row on the device (row R: padding): evaluations, head rows, body token-rows so far
        self.evals_d, self.head_d, self.body_d = (torch.zeros(R + 1, dtype=torch.int64, device=device)
                                                  for _ in range(3))
        slots = self.width if cache is None else cache.slots
        self.fill_mask = torch.zeros(slots + 1, L, dtype=torch.bool, device=device)  # masked at each slot's last fill
        # the host's view: the row in each slot (R: empty), its evaluations so far, masked and fill counts
        self.slot_row = np.full(self.width, R, dtype=np.int64)
        self.slot_k, self.masked, self.filled = (np.zeros(self.width, dtype=np.int64) for _ in range(3))
        self.queue = iter(np.nonzero(self.n_free > 0)[0].tolist())
        self.done = self.n_free == 0
        self.leading = 0
        self.ticks = 0
        self.uses = Counter()  # body shapes used so far: graphs for those used MIN_TICKS_FOR_GRAPH times
        self.eval_rows_padded = self.head_rows_padded = self.body_token_rows_padded = 0

    # -- the host's plan, chunk by chunk -----------------------------------------------------------
    def _read_slots(self) -> None:
        """One host sync: each slot's masked (and fill) count; retire the finished rows, seat the next ones."""
        if (self.slot_row < self.R).any():
            rows = self.slot_rows_d  # the slots' rows during the last chunk
            counts = torch.stack([(self.x.index_select(0, rows) == self.mask_id).sum(dim=1),
                                  self.fill_mask[:self.width].sum(dim=1)]).cpu().numpy()
            self.masked, self.filled = counts[0].copy(), counts[1].copy()
            finished = (self.slot_row < self.R) & (self.masked == 0)
            self.done[self.slot_row[finished]] = True
            self.slot_row[finished] = self.R
            self.slot_k[self.slot_row < self.R] += self.check_every
        for s in np.nonzero(self.slot_row == self.R)[0]:
            row = next(self.queue, None)
            if row is None:
                break
            self.slot_row[s], self.slot_k[s], self.masked[s] = row, 0, self.n_free[row]
        while self.leading < self.R and self.done[self.leading]:
            self.leading += 1

    def _plan_chunk(self) -> None:
        """The chunk's shapes and rows, uploaded in one copy: per evaluation c, the full rows (compacted,
        with their cache slots) and, with the cache, the cached rows at their slots."""
        C, B, R = self.check_every, self.width, self.R
        live = self.slot_row < R
        k = self.slot_k[None, :] + np.arange(C)[:, None]  # [C, B] each slot row's evaluation index
        full = live & (True if self.cache is None else k % self.refresh_every == 0)
        full = np.broadcast_to(full, (C, B))
        cached = live & ~full
        order = np.argsort(~full, axis=1, kind="stable")  # the full rows first, in slot order
        taken = np.take_along_axis(full, order, axis=1)
        full_rows = np.where(taken, self.slot_row[order], R)
        dump = B if self.cache is None else self.cache.dump_slot
        full_slots = np.where(taken, order, dump)
        cached_rows = np.where(cached, self.slot_row[None, :], R)
        n_full = full.sum(axis=1)
        self.full_b = [_pow2_cap(n, B, self.buckets) for n in n_full]
        masked = np.where(live, self.masked, 0)
        self.full_P = [_pow2((masked * f).sum(), self.buckets) for f in full]
        self.cached_P = [_pow2((masked * c).sum(), self.buckets) for c in cached]
        bound = np.where(self.slot_k > 0, np.maximum(self.filled, masked), masked)  # >= every fill in the chunk
        self.cached_S = [min(self.L, _pow2(bound[c].max(), self.buckets)) if c.any() else 0 for c in cached]
        plan = np.stack([full_rows, full_slots, cached_rows, np.broadcast_to(self.slot_row, (C, B))])
        self.plan_d = torch.from_numpy(np.ascontiguousarray(plan)).to(self.x.device)  # [4, C, B]: one copy
        self.slot_rows_d = self.plan_d[3, 0]
        for c in range(C):
            self.eval_rows_padded += self.full_b[c] + (B if self.cached_S[c] else 0)
            self.head_rows_padded += self.full_P[c] + self.cached_P[c]
            self.body_token_rows_padded += self.L * self.full_b[c] + (B * self.cached_S[c] if cached[c].any() else 0)

    def _prepare(self, body, prune: bool) -> None:
        """Count the chunk's shapes and capture graphs for those used often enough (the engine's rule)."""
        C = self.check_every
        if self.cache is None:
            for c in range(C):
                self.uses[body_shape(self.full_b[c], self.L, self.full_P[c], prune)] += 1
            body.prepare(self.uses)
            return
        fills, cached = Counter(), Counter()
        for c in range(C):
            if self.full_b[c]:
                self.uses[("fill", *body_shape(self.full_b[c], self.L, self.full_P[c], prune))] += 1
            if self.cached_S[c]:
                self.uses[("cached", self.width, self.cached_S[c])] += 1
        for key, n in self.uses.items():
            (fills if key[0] == "fill" else cached)[key[1:]] = n
        body.prepare_cached(fills, cached)

    # -- one evaluation ----------------------------------------------------------------------------
    def _full(self, c: int, body, prune: bool) -> Part:
        """Evaluation c's full rows through the body (filling their caches when there is one)."""
        Bb, P = self.full_b[c], self.full_P[c]
        rows = self.plan_d[0, c, :Bb]
        x = self.x.index_select(0, rows)
        masked = x == self.mask_id
        n = masked.sum()
        src, dst = compact(masked.view(-1), rows, self.L, P, n, self.trash)
        if self.cache is None:
            h = body(x, src) if prune else body(x).reshape(Bb * self.L, -1).index_select(0, src)
        else:
            slots = self.plan_d[1, c, :Bb]
            h = body.filling(x, slots, src) if prune else \
                body.filling(x, slots).reshape(Bb * self.L, -1).index_select(0, src)
            self.fill_mask.index_copy_(0, slots, masked)
        return Part(rows, masked, src, dst, n, h, torch.full_like(rows, self.L))

    def _cached(self, c: int, body) -> Part:
        """Evaluation c's cached rows (row b at cache slot b): the positions masked at their fill through the
        blocks against the cache; the part's columns are those S positions."""
        B, S, P = self.width, self.cached_S[c], self.cached_P[c]
        rows = self.plan_d[2, c]
        push = self.fill_mask[:B] & (rows < self.R)[:, None]
        positions, valid = pack_positions(push, S)
        tokens = self.x.index_select(0, rows).gather(1, positions)
        write = self.cache.write_index(torch.arange(B, device=rows.device),
                                       torch.where(valid, positions, torch.full_like(positions, self.L)))
        h = body.cached(tokens, positions, write)  # [B, S, d]
        masked = (tokens == self.mask_id) & valid
        n = masked.sum()
        src, _ = compact(masked.view(-1), rows, S, P, n, self.trash)
        dst = rows.index_select(0, src // S) * self.L + positions.view(-1).index_select(0, src)
        dst = torch.where(torch.arange(P, device=dst.device) < n, dst, torch.full_like(dst, self.trash))
        return Part(rows, masked, src, dst, n, h.reshape(B * S, -1).index_select(0, src), valid.sum(dim=1))

    def evaluate(self, c: int, body, head, strategy, key: int, first_id: int, prune: bool) -> None:
        """Evaluation c of the chunk: the body, the head's statistics at every masked position, the decoder's
        rule, the kept tokens written (key, first_id: the decoder noise key and the wave's first token id)."""
        parts = []
        if self.full_b[c]:
            parts.append(self._full(c, body, prune))
        if self.cached_S[c]:
            if parts:  # a graph's output lives in the shared pool until the next replay: keep a copy
                parts[0] = parts[0]._replace(h=parts[0].h.clone())
            parts.append(self._cached(c, body))
        ks = [self.evals_d.index_select(0, part.rows) for part in parts]  # each row's evaluation index, before counting
        ids = torch.cat([noise_ids(first_id + part.dst, k.index_select(0, part.src // part.masked.shape[1]), self.L)
                         for part, k in zip(parts, ks)])
        h = parts[0].h if len(parts) == 1 else torch.cat([part.h for part in parts])
        stats = _token_stats(head, h, strategy, key, ids)  # one head pass for both parts
        start = 0
        for part, k in zip(parts, ks):
            P = part.src.shape[0]
            self._keep(part, k, [s[start:start + P] for s in stats])
            has = part.masked.any(dim=1).long()
            self.evals_d.index_add_(0, part.rows, has)
            self.head_d.index_add_(0, part.rows, part.masked.sum(dim=1))
            self.body_d.index_add_(0, part.rows, has * part.work)
            start += P

    def _keep(self, part: Part, k: torch.Tensor, stats) -> None:
        """The decoder's rule on one part's dense [E, W] layout, then the kept tokens written into x
        (k [E]: each row's evaluation index; stats: the head's tokens, log-probs, entropies at part.src)."""
        tokens, log_prob, entropy = stats
        rows, masked, src = part.rows, part.masked, part.src
        E, W = masked.shape
        valid = torch.arange(src.shape[0], device=src.device) < part.n
        at = torch.where(valid, src, E * W)  # padding entries to a dump cell

        def dense(values, fill):  # [P] at the masked columns -> [E, W], ``fill`` elsewhere
            out = torch.full((E * W + 1,), fill, dtype=values.dtype, device=values.device)
            return out.scatter_(0, at, values)[:-1].view(E, W)

        count = (self.grp.index_select(0, rows) == k[:, None]).sum(dim=1) if self.decoder.uses_schedule else None
        reveal = self.decoder.select(dense(log_prob, float("-inf")), dense(entropy, float("inf")), masked, count)
        kept = reveal.view(-1).index_select(0, src) & valid
        self.x_flat.index_copy_(0, part.dst, torch.where(kept, tokens, torch.full_like(tokens, self.mask_id)))

    # -- the wave ----------------------------------------------------------------------------------
    def run(self, body, head, strategy, key: int, first_id: int, bar, prune: bool, after=None) -> torch.Tensor:
        """Every evaluation of the wave, chunk by chunk: tokens [R, L]. after: called with t after evaluation t."""
        while True:
            self._read_slots()
            if not (self.slot_row < self.R).any():
                break
            self._plan_chunk()
            self._prepare(body, prune)
            bar.total += self.check_every
            bar.refresh()
            for c in range(self.check_every):
                self.evaluate(c, body, head, strategy, key, first_id, prune)
                bar.update(1)
                if after is not None:
                    after(self.ticks)
                self.ticks += 1
        counts = torch.stack([self.evals_d[:self.R], self.head_d[:self.R], self.body_d[:self.R]]).cpu().numpy()
        self.K_host, head_rows, body_rows = counts[0].copy(), counts[1], counts[2]
        self.eval_rows, self.head_rows = int(self.K_host.sum()), int(head_rows.sum())
        self.body_token_rows, self.body_token_rows_exact = int(body_rows.sum()), self.L * self.eval_rows
        self.tokens_revealed = int(self.n_free.sum())
        return self.x[:self.R].clone()

    def leading_rows_done(self, t: int) -> int:
        """n such that rows 0 .. n-1 are known done (the host learns it between chunks)."""
        return self.leading

    def rows_out(self, a: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows a .. n-1 (all done): (tokens [n - a, L] on the CPU, evaluations [n - a]), in one copy."""
        both = torch.cat([self.x[a:n], self.evals_d[a:n, None]], dim=1).cpu()
        return both[:, :-1], both[:, -1]


# top_k / top_p rank the whole distribution: the head makes [rows, V-1] logits for them (the direct kernel makes
# none), so a decoder's every masked position goes through it in slices of at most this many rows (GPT-2's
# vocabulary: 0.8 GB of fp32 logits a slice, and the filter's sort beside them).
FILTERED_ROWS_PER_CALL = 4096


def _token_stats(head, h: torch.Tensor, strategy, key: int, ids: torch.Tensor) -> list[torch.Tensor]:
    """The head's (tokens, log_prob, entropy) at the rows h [P, d]; filtered strategies in slices of rows."""
    step = h.shape[0] if strategy.is_direct else FILTERED_ROWS_PER_CALL
    if h.shape[0] <= step:
        return list(head.token_stats(h, strategy, key, ids))
    slices = [head.token_stats(h[i:i + step], strategy, key, ids[i:i + step]) for i in range(0, h.shape[0], step)]
    return [torch.cat(parts) for parts in zip(*slices)]


def _pow2_cap(n, cap: int, buckets: bool) -> int:
    """A batch of n rows: the next power of two up to ``cap`` when bucketing (0 stays 0)."""
    n = int(n)
    return int(bucket(n, cap)) if buckets and n > 0 else n
