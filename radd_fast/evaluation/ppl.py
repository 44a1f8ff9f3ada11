"""Zero-shot perplexity: the bound of one loss, averaged over Monte Carlo draws.

Per batch ``x [B, L]``: each sequence's loss (a bound on its NLL, or the exact
NLL of one order for the ``ar_*`` losses) is averaged over ``mc_timesteps``
independent draws of the noise (time / masks), then over the batch; the batch
means are averaged over batches and ranks, and ``PPL = exp(mean_loss / L)``.
The exact losses take ``mc_timesteps = 1``. The protocol, the standard error
and why the draws may be batched: docs/EVALUATION.md.

Two independent choices:
- the kernels are the model's ``backend`` ("fast": fused masked
  linear-log-softmax, no [B, L, V] logits; "reference": plain PyTorch);
- Monte Carlo batching is an option of ``evaluate_ppl`` (``mc_batching``): the
  batch is replicated ``k`` times into one forward ``[k B, L]`` (``k`` from a
  token budget), so the GPU sees large matmuls instead of ``mc_timesteps``
  small passes. The time samplers then stratify over ``k B`` rows instead of
  ``B``: every row's time is still uniform, so the expectation is unchanged.
  Off, it is the published loop: one forward per draw.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from ..acceleration import Acceleration, resolve_acceleration
from ..distributed import DistEnv, gather_objects, group_env
from ..errors import NonFiniteLossError
from ..losses import get_loss_fn
from ..losses.registry import EXACT_LOSS_TYPES, LOSS_TYPES, has_static_rows
from ..losses.static_rows import MaskPlanner, StaticRowLoss  # noqa: F401  (MaskPlanner: re-exported)
from ..progress import progress_bar

# Tokens per replicated forward with Monte Carlo batching: 8 x (16 x 1024) for RADD-small in bf16 on one
# GPU, about 1.5 GB of transient activations (no grad); on CPU a small budget keeps the cache warm.
DEFAULT_TOKEN_BUDGET = {"cuda": 1 << 17, "cpu": 1 << 13}


@dataclass
class PPLResult:
    """What ``evaluate_ppl`` returns. ``batch_losses`` are the per-batch mean per-sequence losses
    (nats per sequence, gathered over ranks); ``batch_vars`` the Monte Carlo variance of each of
    them (spread of the draws / number of draws; NaN with one draw, 0 for the exact losses);
    ``ppl = exp(mean_loss / length)``."""

    ppl: float
    mean_loss: float
    length: int
    loss_type: str
    mc_timesteps: int
    num_batches: int
    num_sequences: int
    batch_losses: list = field(default_factory=list)
    batch_vars: list = field(default_factory=list)
    seconds: float = 0.0
    mc_per_forward: int = 1
    scoring: str = "eager"  # how the loss ran: "eager", "static rows, compiled (inductor) + CUDA graphs", ...

    @property
    def sequences_timesteps_per_s(self) -> float:
        """Throughput in sequence x Monte Carlo timestep evaluations per second (ar_*: sequences/s)."""
        return self.num_sequences * self.mc_timesteps / max(self.seconds, 1e-9)

    @property
    def bits_per_token(self) -> float:
        return self.mean_loss / self.length / math.log(2)

    @property
    def ppl_stderr(self) -> float | None:
        """Monte Carlo standard error of ``ppl`` (delta method, see ``ppl_standard_error``)."""
        return ppl_standard_error(self.batch_losses, self.batch_vars, self.length)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["bits_per_token"] = self.bits_per_token
        out["sequences_timesteps_per_s"] = self.sequences_timesteps_per_s
        out["ppl_stderr"] = self.ppl_stderr
        return out


def perplexity(loss: float, tokens: int = 1) -> float:
    """``exp(loss / tokens)``: the perplexity of ``loss`` nats over ``tokens`` tokens, for any loss.

    A finite loss past what a float's exp can hold (more than ~709 nats per token: a diverged or
    corrupt model) gives ``inf``, never an OverflowError; NaN stays NaN. Every perplexity of the
    package (sequence, suite and generative) goes through here.

    Example::

        perplexity(3.2 * 1024, 1024)   # 24.53...
        perplexity(1e6)                # inf
    """
    try:
        return math.exp(loss / tokens)
    except OverflowError:
        return math.inf


def ppl_standard_error(batch_losses: list, batch_vars: list, length: int) -> float | None:
    """Monte Carlo standard error of ``exp(mean(batch_losses) / length)``.

    The mean loss m averages n independent batch estimates, so Var(m) = sum(batch_vars) / n^2;
    the delta method gives se(PPL) = PPL * sqrt(Var(m)) / length. None when a variance is unknown
    (a batch evaluated with a single draw)."""
    if not batch_losses or len(batch_vars) != len(batch_losses) or any(math.isnan(v) for v in batch_vars):
        return None
    n = len(batch_losses)
    ppl = perplexity(sum(batch_losses) / n, length)
    if math.isinf(ppl):
        return math.inf  # an infinite estimate has no finite error (and inf * 0 would be NaN)
    return ppl * math.sqrt(sum(batch_vars)) / n / length


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


def default_mc_batching(device: torch.device) -> bool:
    """Monte Carlo batching is on by default on CUDA (large matmuls pay there) and off elsewhere,
    whatever the kernel backend."""
    return torch.device(device).type == "cuda"


def mc_per_forward(device: torch.device, batch_shape: tuple, mc_timesteps: int, loss_type: str,
                   token_budget: int | None, mc_batching: bool) -> int:
    """How many Monte Carlo draws share one forward: 1 without batching (the published loop) and for
    the exact losses; with batching as many replicas of the batch as the token budget allows."""
    if loss_type in EXACT_LOSS_TYPES or not mc_batching:
        return 1
    if token_budget is None:
        token_budget = DEFAULT_TOKEN_BUDGET.get(torch.device(device).type, DEFAULT_TOKEN_BUDGET["cpu"])
    B, L = batch_shape
    return max(1, min(mc_timesteps, token_budget // max(B * L, 1)))


def batch_estimate(loss_fn: Callable, model, x: torch.Tensor, mc_timesteps: int, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's estimate: (mean over sequences of the per-sequence loss averaged over
    ``mc_timesteps`` draws, its Monte Carlo variance), x [B, L] -> ([], []) float64 on x's device.

    Draws run ``k`` at a time as one forward on the batch replicated k times. The variance is the
    sample variance of the per-draw batch means over the number of draws (NaN for one draw)."""
    B = x.shape[0]
    total = torch.zeros(B, dtype=torch.float64, device=x.device)
    draw_means = []
    done = 0
    while done < mc_timesteps:
        reps = min(k, mc_timesteps - done)
        xs = x if reps == 1 else x.repeat(reps, 1)  # [reps*B, L]: copy c is rows c*B .. (c+1)*B-1
        losses = loss_fn(model, xs).double().view(reps, B)
        total += losses.sum(0)
        draw_means.append(losses.mean(1))
        done += reps
    draws = torch.cat(draw_means)  # [mc_timesteps]
    var = draws.var() / mc_timesteps if mc_timesteps > 1 else torch.full((), math.nan, dtype=torch.float64)
    return (total / mc_timesteps).mean(), var


def make_loss_fn(model, noise, loss_type: str, sampling_eps: float = 1e-3, static_rows: bool = False,
                 acceleration: Acceleration | None = None, time_sampler: str | None = None) -> Callable:
    """The evaluation loss ``fn(model, x [B, L]) -> [B]`` of ``loss_type`` (model kept in eval mode).

    static_rows: the training step's masked-row loss (``StaticRowLoss``), whose shapes are static
    per batch shape, so that ``acceleration`` (default: eager) compiles it whole and replays it
    from CUDA graphs. The same law as the eager loss, not the same random stream. Only for the
    losses whose registry entry has a static-row form; one that says it has none
    (``LossSpec.no_static_rows``: the ar_* losses, static already) is scored by its own loss.
    time_sampler: as in ``get_loss_fn`` (None: the loss's own).
    """
    if static_rows and has_static_rows(loss_type):
        return StaticRowLoss(model, noise, loss_type, sampling_eps, acceleration or Acceleration(False, False),
                             time_sampler=time_sampler)
    return get_loss_fn(noise, model.vocab_size, train=False, sampling_eps=sampling_eps, loss_type=loss_type,
                       time_sampler=time_sampler)


@torch.no_grad()
def evaluate_ppl(model, noise, dataloader: Iterable, loss_type: str = "lambda_DCE", mc_timesteps: int = 1, *,
                 sampling_eps: float = 1e-3, mc_batching: bool | None = None, token_budget: int | None = None,
                 mc_chunk: int | None = None, max_batches: int | None = None, progress: bool = True,
                 desc: str = "eval", static_rows: bool = False, compile: bool | str = False,
                 cuda_graphs: bool | None = None) -> PPLResult:
    """Zero-shot perplexity of ``model`` on ``dataloader`` (docs/EVALUATION.md); used by eval.py.

    Args:
        model: a ``RADD`` (or a DDP wrapper around one); its ``backend`` picks the kernels only.
        noise: the noise schedule the model was trained with (``load_model`` returns it).
        dataloader: yields ``[B, L]`` int64 token blocks (a tensor, a dict with ``input_ids`` or a
            tuple); under torch.distributed each rank passes its own shard.
        loss_type: one of ``LOSS_TYPES``; mc_timesteps: draws per batch (1 for the ar_* losses).
        mc_batching: replicate the batch so several draws share one forward. Default (None): on
            when the model is on a CUDA device, off elsewhere (the published one-draw-per-forward
            loop); it does not depend on the backend. Same expectation either way.
        token_budget / mc_chunk: tokens per batched forward / force the number of draws per
            forward (mc_chunk wins over both mc_batching and the budget).
        max_batches: stop after this many batches (per rank).
        static_rows: score with the training step's static-capacity masked rows (``StaticRowLoss``),
            for a loss whose registry entry has that form (the others: their own loss, as eager).
        compile / cuda_graphs: the shared policy's switches (``radd_fast.acceleration``; compile
            True / False / "auto", cuda_graphs None = on for CUDA). With static_rows the whole loss
            is compiled and replayed from CUDA graphs; without, the eager loss's masked rows change
            shape every batch, so only the body is compiled and graphs cannot be asked for.
    Returns:
        ``PPLResult`` with ``ppl = exp(mean_loss / L)``, the per-batch losses and variances, the
        throughput. Raises ``NonFiniteLossError`` at the first batch whose loss is NaN or infinite.

    Example::

        model, noise = load_model("JingyangOu/radd-lambda-dce", device="cuda", backend="fast")
        res = evaluate_ppl(model, noise, [torch.randint(0, 50257, (4, 1024), device="cuda")], mc_timesteps=8)
        print(res.ppl, res.ppl_stderr)
    """
    check_loss_type(loss_type, mc_timesteps)
    model = getattr(model, "module", model)  # DDP: evaluation needs no gradient sync
    was_training = model.training
    model.eval()
    device = model.device
    mc_batching = default_mc_batching(device) if mc_batching is None else bool(mc_batching)
    static_rows = static_rows and has_static_rows(loss_type)  # the entry's choice (see make_loss_fn)
    acceleration = evaluation_acceleration(device, static_rows, compile, cuda_graphs)
    loss_fn = make_loss_fn(model, noise, loss_type, sampling_eps, static_rows, acceleration)
    env = group_env(device)  # the process group a caller (eval.py --ngpus, torchrun) joined, if any
    bar = progress_bar(progress and env.is_main, _length_hint(dataloader, max_batches), desc, unit="batch")
    losses, variances, n_seq, length, k = [], [], 0, None, 1
    start = time.perf_counter()
    # The eager loss's masked rows change shape every batch: only its body is compiled (for this run).
    body = _compiled_body(model, acceleration) if acceleration.compile and not static_rows else contextlib.nullcontext()
    try:
        with body:
            for i, batch in enumerate(dataloader):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch_tokens(batch).to(device, non_blocking=True).long()
                if length is None:
                    length = x.shape[1]
                    k = mc_chunk or mc_per_forward(device, tuple(x.shape), mc_timesteps, loss_type, token_budget,
                                                   mc_batching)
                elif x.shape[1] != length:
                    raise ValueError(f"batch {i} has length {x.shape[1]}, earlier batches {length}: one block length per run")
                loss, var = batch_estimate(loss_fn, model, x, mc_timesteps, k)
                check_finite(loss, f"batch {i}")
                losses.append(loss)
                variances.append(var)
                n_seq += x.shape[0]
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(ppl=f"{perplexity(torch.stack(losses).mean().item(), length):.3f}")
    finally:
        bar.close()
        model.train(was_training)
    batch_losses, batch_vars, n_seq, length = _gather(losses, variances, n_seq, length, env)
    if not batch_losses:
        raise ValueError("the dataloader yielded no batches: nothing to evaluate")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    mean_loss = sum(batch_losses) / len(batch_losses)
    return PPLResult(ppl=perplexity(mean_loss, length), mean_loss=mean_loss, length=length, loss_type=loss_type,
                     mc_timesteps=mc_timesteps, num_batches=len(batch_losses), num_sequences=n_seq,
                     batch_losses=batch_losses, batch_vars=batch_vars, seconds=seconds, mc_per_forward=k,
                     scoring=("static rows, " if static_rows else "") + acceleration.describe())


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Raise ``NonFiniteLossError`` when a batch loss is NaN/inf (one host sync per batch, after its draws)."""
    value = float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(f"the loss of {where} is {value}: the model's weights or outputs are not finite "
                                 f"(a diverged or corrupt checkpoint?); no perplexity reported")


def evaluation_acceleration(device: torch.device, static_rows: bool, compile: bool | str,
                            cuda_graphs: bool | None) -> Acceleration:
    """The policy's decision for one evaluation: graphs only for the static-row loss."""
    if not static_rows:
        if cuda_graphs:
            raise ValueError("cuda_graphs=True needs static_rows=True (the eager loss's masked rows change shape "
                             "every batch)")
        cuda_graphs = False
    return resolve_acceleration(device, compile, cuda_graphs)


@contextlib.contextmanager
def _compiled_body(model, acceleration: Acceleration):
    """``model.hidden`` compiled while the block runs, then the model's own again (a body that
    ``compile_body`` compiled for good stays as it was)."""
    own = model.__dict__.get("hidden")
    model.hidden = acceleration.compiled(model.hidden)
    try:
        yield
    finally:
        if own is None:
            del model.hidden  # back to the class's method
        else:
            model.hidden = own


def compile_body(model):
    """torch.compile the transformer body (``model.hidden``) of a model used for evaluation only.

    Shapes are static per run ([k B, L]; a smaller last batch or last chunk of draws compiles once
    more); the masked-row gather and the fused head stay eager. The range check on the inputs is
    switched off (its host sync would break the graph). Returns the model (changed in place)."""
    model.validate_inputs = False
    model.hidden = torch.compile(model.hidden, dynamic=False)
    return model


# -- helpers -----------------------------------------------------------------------------------------
def _gather(losses: list, variances: list, n_seq: int, length: int | None,
            env: DistEnv) -> tuple[list, list, int, int]:
    """Per-batch losses and variances of every rank (rank order), total sequences, the block length."""
    local = (torch.stack(losses).cpu().tolist() if losses else [],
             torch.stack(variances).cpu().tolist() if variances else [])
    if env.world == 1:
        return local[0], local[1], n_seq, length
    parts = gather_objects((*local, n_seq, length), env)
    lengths = {p[3] for p in parts if p[3] is not None}
    if len(lengths) > 1:
        raise ValueError(f"ranks evaluated different block lengths {sorted(lengths)}")
    return ([v for p in parts for v in p[0]], [v for p in parts for v in p[1]], sum(p[2] for p in parts),
            lengths.pop() if lengths else None)


def _length_hint(dataloader, max_batches: int | None) -> int | None:
    try:
        n = len(dataloader)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)
