"""Zero-shot perplexity (spec 7): the bound of one loss, averaged over Monte Carlo draws.

Per batch ``x [B, L]``: each sequence's loss (spec 4) is averaged over
``mc_timesteps`` independent draws of the noise (time / masks), then over the
batch; the batch means are averaged over batches and ranks, and
``PPL = exp(mean_loss / L)``. The ``ar_*`` losses are exact (no noise), so they
take ``mc_timesteps = 1``.

Fast path: with ``model.backend == "fast"`` the loss uses the fused masked
linear-log-softmax (no [B, L, V] logits), and the Monte Carlo draws are batched:
the batch is replicated ``k`` times into one forward ``[k B, L]`` (``k`` from a
token budget), so the GPU sees large matmuls instead of ``mc_timesteps`` small
passes. The time samplers then stratify over ``k B`` rows instead of ``B``: every
row's time is still uniform on average, so the expectation is unchanged.
The reference path is the published loop: one forward per draw.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch

from ..losses import EXACT_LOSS_TYPES, LOSS_TYPES, get_loss_fn
# Tokens per replicated forward on the fast path: 8 x (16 x 1024) for RADD-small in bf16 on one GPU,
# about 1.5 GB of transient activations (no grad); on CPU a small budget keeps the cache warm.
DEFAULT_TOKEN_BUDGET = {"cuda": 1 << 17, "cpu": 1 << 13}


@dataclass
class PPLResult:
    """What ``evaluate_ppl`` returns. ``batch_losses`` are the per-batch mean per-sequence losses
    (nats per sequence, gathered over ranks); ``ppl = exp(mean_loss / length)``."""

    ppl: float
    mean_loss: float
    length: int
    loss_type: str
    mc_timesteps: int
    num_batches: int
    num_sequences: int
    batch_losses: list = field(default_factory=list)
    seconds: float = 0.0
    mc_per_forward: int = 1

    @property
    def sequences_timesteps_per_s(self) -> float:
        """Throughput in sequence x Monte Carlo timestep evaluations per second (ar_*: sequences/s)."""
        return self.num_sequences * self.mc_timesteps / max(self.seconds, 1e-9)

    @property
    def bits_per_token(self) -> float:
        return self.mean_loss / self.length / math.log(2)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["bits_per_token"] = self.bits_per_token
        out["sequences_timesteps_per_s"] = self.sequences_timesteps_per_s
        return out


def check_loss_type(loss_type: str, mc_timesteps: int) -> None:
    """Clear errors before any model work: unknown loss, or Monte Carlo draws for an exact loss."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if mc_timesteps < 1:
        raise ValueError(f"monte_carlo_timesteps must be >= 1, got {mc_timesteps}")
    if loss_type in EXACT_LOSS_TYPES and mc_timesteps != 1:
        raise ValueError(f"loss type {loss_type} is an exact NLL (one generation order, L forward passes, no noise): "
                         f"use monte_carlo_timesteps 1, got {mc_timesteps}")


def batch_tokens(batch) -> torch.Tensor:
    """The [B, L] token tensor of a dataloader item: a tensor, a dict with ``input_ids``, or a tuple."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"batch dict has no 'input_ids' (keys: {sorted(batch)})")
        batch = batch["input_ids"]
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not torch.is_tensor(batch) or batch.dim() != 2:
        raise ValueError(f"expected a [B, L] token tensor per batch, got {type(batch).__name__} "
                         f"{tuple(batch.shape) if torch.is_tensor(batch) else ''}")
    return batch


def mc_per_forward(model, batch_shape: tuple, mc_timesteps: int, loss_type: str, token_budget: int | None) -> int:
    """How many Monte Carlo draws share one forward: 1 on the reference path (published loop) and for
    the exact losses; on the fast path as many replicas of the batch as the token budget allows."""
    if loss_type in EXACT_LOSS_TYPES or model.backend != "fast":
        return 1
    if token_budget is None:
        token_budget = DEFAULT_TOKEN_BUDGET.get(_device(model).type, DEFAULT_TOKEN_BUDGET["cpu"])
    B, L = batch_shape
    return max(1, min(mc_timesteps, token_budget // max(B * L, 1)))


def batch_loss(loss_fn, model, x: torch.Tensor, mc_timesteps: int, k: int) -> torch.Tensor:
    """Mean over sequences of the per-sequence loss averaged over ``mc_timesteps`` draws: x [B, L] -> []
    (float64). Draws run ``k`` at a time as one forward on the batch replicated k times."""
    B = x.shape[0]
    total = torch.zeros(B, dtype=torch.float64, device=x.device)
    done = 0
    while done < mc_timesteps:
        reps = min(k, mc_timesteps - done)
        xs = x if reps == 1 else x.repeat(reps, 1)  # [reps*B, L]: copy c is rows c*B .. (c+1)*B-1
        losses = loss_fn(model, xs).double().view(reps, B)
        total += losses.sum(0)
        done += reps
    return (total / mc_timesteps).mean()


@torch.no_grad()
def evaluate_ppl(model, noise, dataloader: Iterable, loss_type: str = "lambda_DCE", mc_timesteps: int = 1, *,
                 sampling_eps: float = 1e-3, token_budget: int | None = None, mc_chunk: int | None = None,
                 max_batches: int | None = None, progress: bool = True, desc: str = "eval") -> PPLResult:
    """Zero-shot perplexity of ``model`` on ``dataloader`` (spec 7); used by eval.py and by training.

    Args:
        model: a ``RADD`` (or a DDP wrapper around one); its ``backend`` picks the loss computation
            ("fast": fused masked log-softmax + batched Monte Carlo draws; "reference": published).
        noise: the noise schedule the model was trained with (``load_model`` returns it).
        dataloader: yields ``[B, L]`` int64 token blocks (a tensor, a dict with ``input_ids`` or a
            tuple); under torch.distributed each rank passes its own shard.
        loss_type: one of ``LOSS_TYPES``; mc_timesteps: draws per batch (1 for the ar_* losses).
        token_budget / mc_chunk: tokens per forward on the fast path / force the number of draws per
            forward (default: from the budget; 1 on the reference path).
        max_batches: stop after this many batches (per rank).
    Returns:
        ``PPLResult`` with ``ppl = exp(mean_loss / L)``, the per-batch losses and the throughput.

    Example::

        model, noise = load_model("JingyangOu/radd-lambda-dce", device="cuda", backend="fast")
        res = evaluate_ppl(model, noise, [torch.randint(0, 50257, (4, 1024), device="cuda")], mc_timesteps=8)
        print(res.ppl)
    """
    check_loss_type(loss_type, mc_timesteps)
    model = getattr(model, "module", model)  # DDP: evaluation needs no gradient sync
    was_training = model.training
    model.eval()
    device = _device(model)
    loss_fn = get_loss_fn(noise, model.vocab_size, train=False, sampling_eps=sampling_eps, loss_type=loss_type)
    rank0 = not _dist_on() or torch.distributed.get_rank() == 0
    total = _length_hint(dataloader, max_batches)
    bar = _progress(total, desc, enabled=progress and rank0)
    losses, n_seq, length, k = [], 0, None, 1
    start = time.perf_counter()
    try:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            x = batch_tokens(batch).to(device, non_blocking=True).long()
            if length is None:
                length = x.shape[1]
                k = mc_chunk or mc_per_forward(model, tuple(x.shape), mc_timesteps, loss_type, token_budget)
            elif x.shape[1] != length:
                raise ValueError(f"batch {i} has length {x.shape[1]}, earlier batches {length}: one block length per run")
            losses.append(batch_loss(loss_fn, model, x, mc_timesteps, k))
            n_seq += x.shape[0]
            bar.update(1)
            if bar.enabled_postfix and (i % 10 == 0):
                bar.set_postfix(ppl=f"{math.exp(torch.stack(losses).mean().item() / length):.3f}")
    finally:
        bar.close()
        model.train(was_training)
    local = torch.stack(losses).cpu() if losses else torch.zeros(0, dtype=torch.float64)
    batch_losses, n_seq, length = _gather(local, n_seq, length)
    if not batch_losses:
        raise ValueError("the dataloader yielded no batches: nothing to evaluate")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    mean_loss = sum(batch_losses) / len(batch_losses)
    return PPLResult(ppl=math.exp(mean_loss / length), mean_loss=mean_loss, length=length, loss_type=loss_type,
                     mc_timesteps=mc_timesteps, num_batches=len(batch_losses), num_sequences=n_seq,
                     batch_losses=batch_losses, seconds=seconds, mc_per_forward=k)


def compile_body(model):
    """torch.compile the transformer body (``model.hidden``) of a model used for evaluation only.

    Shapes are static per run ([k B, L]; a smaller last batch or last chunk of draws compiles once
    more); the masked-row gather and the fused head stay eager. The range check on the inputs is
    switched off (its host sync would break the graph). Returns the model (changed in place)."""
    model.validate_inputs = False
    model.hidden = torch.compile(model.hidden, dynamic=False)
    return model


# -- helpers -----------------------------------------------------------------------------------------
def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather(local: torch.Tensor, n_seq: int, length: int | None) -> tuple[list, int, int]:
    """Per-batch losses of every rank (rank order), total sequences, the block length."""
    if not _dist_on():
        return local.tolist(), n_seq, length
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (local.tolist(), n_seq, length))
    lengths = {p[2] for p in parts if p[2] is not None}
    if len(lengths) > 1:
        raise ValueError(f"ranks evaluated different block lengths {sorted(lengths)}")
    return [v for p in parts for v in p[0]], sum(p[1] for p in parts), lengths.pop() if lengths else None


def _length_hint(dataloader, max_batches: int | None) -> int | None:
    try:
        n = len(dataloader)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


class _Bar:
    """tqdm when wanted and installed, else a no-op with the same calls."""

    def __init__(self, bar=None):
        self.bar = bar
        self.enabled_postfix = bar is not None

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **kw):
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _progress(total, desc: str, enabled: bool) -> _Bar:
    if not enabled:
        return _Bar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but evaluation must not fail over a progress bar
        return _Bar()
    return _Bar(tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True))
