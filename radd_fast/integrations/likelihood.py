"""log p(continuation | context) under RADD, exact for one order or as a Monte Carlo ELBO (docs/INTEGRATIONS.md).

Every scored row has the model's length L: the context at positions [0, c), the continuation at
[c, c + n), MASK after it. A masked position of an absorbing model is marginalised out, so a row
is the training window with the text after the continuation unknown; the context loses its
oldest tokens when c + n > L.

- ``left_to_right_log_likelihood``: exact, for the continuation generated left to right (RADD's
  any-order likelihood for that order, ``ar_forward`` with the context given): its j-th token is
  scored with the context and ``cont[:j]`` visible and everything after masked. n rows per
  request, one scored row each; also whether every token is the argmax (``is_greedy``).
- ``monte_carlo_log_likelihood``: the any-order ELBO, RADD's k-DCE restricted to the
  continuation: k ~ U{1..n}, k continuation positions masked at random, ``n / k * sum log p``.
  Its mean over draws estimates the log-likelihood averaged over uniformly random orders (a lower
  bound on the likelihood of the model's mixture over orders). Each request's draws come from its
  own generator, seeded by ``(seed, context, continuation)``: a value does not depend on the
  order or the batching of the requests.

Rows of all requests share one shape ``[L]``, so they batch freely: ``rows_per_forward`` rows go
through the body at once (``model.hidden(x, rows=...)``: the last block only at the scored rows),
and the output head runs at the scored rows alone. Example::

    model, noise = radd_fast.load_model("JingyangOu/radd-t-dce")
    [(logp, greedy)] = left_to_right_log_likelihood(model, [(tok.encode("The cat"), tok.encode(" sat"))])
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import UserError
from ..evaluation.ppl import DEFAULT_TOKEN_BUDGET
from ..losses.common import per_sequence

Request = tuple[Sequence[int], Sequence[int]]  # (context token ids, continuation token ids)


class LikelihoodError(UserError):
    """A request the model cannot score (a continuation longer than the model, a token out of its vocabulary)."""


@dataclass
class _Row:
    """One row to score: ``tokens[:visible]`` shown, MASK elsewhere; ``scored`` positions ([P], ascending,
    all masked) contribute ``weight * log p(tokens[pos])`` to request ``request``."""

    request: int
    tokens: torch.Tensor  # [c + n] int64 on the CPU
    visible: int
    scored: torch.Tensor  # [P] int64
    weight: float = 1.0


def left_to_right_log_likelihood(model, requests: Sequence[Request],
                                 rows_per_forward: int | None = None) -> list[tuple[float, bool]]:
    """Exact ``(log p(continuation | context), is_greedy)`` per request, the continuation revealed left to right.

    model: a ``RADD`` (eval mode is set here); requests: ``(context ids, continuation ids)``;
    rows_per_forward: rows of length L per body pass (default: from the evaluation's token budget).
    An empty continuation scores ``(0.0, True)``.
    """
    prepared = [_prepare(model, i, ctx, cont) for i, (ctx, cont) in enumerate(requests)]

    def rows() -> Iterator[_Row]:
        for i, (tokens, c) in enumerate(prepared):
            for pos in range(c, len(tokens)):
                yield _Row(i, tokens, pos, torch.tensor([pos]))

    totals = [0.0] * len(requests)
    greedy = [True] * len(requests)
    for chunk, (sums, argmax_hits) in _score(model, rows(), rows_per_forward, full_vocab=True):
        for row, s, hit in zip(chunk, sums.tolist(), argmax_hits.tolist()):
            totals[row.request] += s
            greedy[row.request] &= bool(hit)
    return list(zip(totals, greedy))


def monte_carlo_log_likelihood(model, requests: Sequence[Request], draws: int, seed: int = 0,
                               rows_per_forward: int | None = None) -> list[float]:
    """The any-order ELBO of each continuation given its context, averaged over ``draws`` draws (see the module).

    Each draw is one row: k ~ U{1..n} continuation positions masked, weight n / k. An empty
    continuation scores 0.0.
    """
    if isinstance(draws, bool) or int(draws) < 1:
        raise LikelihoodError(f"the Monte Carlo ELBO needs draws >= 1, got {draws!r}")
    prepared = [_prepare(model, i, ctx, cont) for i, (ctx, cont) in enumerate(requests)]

    def rows() -> Iterator[_Row]:
        for i, ((tokens, c), (ctx, cont)) in enumerate(zip(prepared, requests)):
            n = len(tokens) - c
            if n == 0:
                continue
            g = torch.Generator().manual_seed(request_seed(seed, list(ctx), list(cont)))
            for _ in range(int(draws)):
                k = int(torch.randint(1, n + 1, (), generator=g))
                masked = (torch.randperm(n, generator=g)[:k] + c).sort().values
                yield _Row(i, tokens, len(tokens), masked, n / k)

    totals = [0.0] * len(requests)
    for chunk, (sums, _) in _score(model, rows(), rows_per_forward, full_vocab=False):
        for row, s in zip(chunk, sums.tolist()):
            totals[row.request] += s
    return [t / int(draws) for t in totals]


def request_seed(seed: int, *parts) -> int:
    """A 63-bit seed from ``seed`` and the request's own content (stable across runs and machines)."""
    digest = hashlib.sha256(repr((int(seed), *parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def default_rows_per_forward(model) -> int:
    """Rows of length L per body pass: the evaluation's token budget for the model's device."""
    budget = DEFAULT_TOKEN_BUDGET.get(model.device.type, DEFAULT_TOKEN_BUDGET["cpu"])
    return max(1, budget // model.length)


def _prepare(model, index: int, context: Sequence[int], continuation: Sequence[int]) -> tuple[torch.Tensor, int]:
    """(context + continuation as one [c + n] tensor with the context cut to fit L, c)."""
    n, L = len(continuation), model.length
    if n > L:
        raise LikelihoodError(f"request {index}: the continuation has {n} tokens, more than the model's length {L}")
    context = list(context)[max(0, len(context) - (L - n)):]
    tokens = torch.tensor(context + list(continuation), dtype=torch.int64)
    if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < model.mask_id):
        raise LikelihoodError(f"request {index}: token ids must be in [0, {model.mask_id}) (the model's "
                              f"tokens), got min {int(tokens.min())} max {int(tokens.max())}: wrong tokenizer?")
    return tokens, len(context)


@torch.no_grad()
def _score(model, rows: Iterator[_Row], rows_per_forward: int | None, full_vocab: bool):
    """Yield (chunk of rows, (per-row sum of weight * log p [R] float64, per-row all-argmax [R] bool)).

    full_vocab: log-probs over every real token (needed for the argmax); else the fused target head.
    """
    R = int(rows_per_forward or default_rows_per_forward(model))
    if R < 1:
        raise LikelihoodError(f"rows_per_forward must be >= 1, got {rows_per_forward!r}")
    was_training = model.training
    model.eval()
    L, device = model.length, model.device
    try:
        while chunk := list(itertools.islice(rows, R)):
            x = torch.full((len(chunk), L), model.mask_id, dtype=torch.int64)
            for r, row in enumerate(chunk):
                x[r, :row.visible] = row.tokens[:row.visible]
            seq = torch.cat([torch.full((len(row.scored),), r, dtype=torch.int64) for r, row in enumerate(chunk)])
            pos = torch.cat([row.scored for row in chunk])
            targets = torch.cat([row.tokens[row.scored] for row in chunk]).to(device)
            weights = torch.cat([torch.full((len(row.scored),), row.weight, dtype=torch.float64) for row in chunk])
            x[seq, pos] = model.mask_id
            h = model.hidden(x.to(device), check=False, rows=(seq * L + pos).to(device))  # [P, d]
            if full_vocab:
                logp_all = model.vocab_log_probs(h)  # [P, V-1]
                logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
                misses = (logp_all.argmax(-1) != targets).float()
            else:
                logp = model.target_log_probs(h, targets)
                misses = torch.zeros_like(logp)
            seq = seq.to(device)
            sums = per_sequence(logp.double() * weights.to(device), seq, len(chunk))
            all_hit = per_sequence(misses, seq, len(chunk)) == 0
            yield chunk, (sums.cpu(), all_hit.cpu())
    finally:
        model.train(was_training)
