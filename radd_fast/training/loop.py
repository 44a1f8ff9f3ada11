"""The training loop (spec 8) as a function: ``train(config, run_dir) -> history``.

One process or torchrun DDP (NCCL on GPU, gloo on CPU). Each step: ``accum``
micro-batches per rank, the loss averaged over the global batch, one optimizer
update (warmup, clipping, loss scaling for fp16), an EMA update. The step is
``training.step.TrainStep`` (docs/TRAINING.md): static shapes, compiled whole with
``training.compile``, and no host sync until a boundary step (a log, evaluation or
checkpoint step) reads the losses, the gradient norm and the non-finite flag back at once.

Run folder (published layout): ``checkpoints/checkpoint_<step>.pth`` and
``samples/iter_<step>/`` every ``snapshot_freq`` steps, ``checkpoints-meta/checkpoint.pth``
(the resume point) every ``snapshot_freq_for_preemption``, ``metrics.jsonl`` and ``logs``;
``train.lock`` while a run writes there (``lock.py``: a second process is refused).
A folder that holds a checkpoint is resumed (state.py verifies it, and falls back to the
newest intact snapshot). Faults lose nothing and leave no debris:
- within a step the meta checkpoint is written last, so a run killed anywhere resumes at a
  step whose snapshot and samples are on disk and redoes the rest: the resumed folder holds
  what the uninterrupted run's holds;
- on resume, stale checkpoint temporaries are removed and ``metrics.jsonl`` loses the
  records past the resumed step (they are logged again), so it reads as one run;
- weights that are not finite are never saved, and a non-finite loss, gradient norm or
  weight stops the run naming the checkpoint it can resume from (or saying there is none):
  a non-finite step's update, and every later one, is skipped on the device, the next
  boundary (every checkpoint step is one) names the step, and nothing after it is saved.

Reproducibility: before each micro-batch every generator is seeded from (seed, step, index
of the micro-batch in the global batch, stream); no generator state is saved or restored
(the reseeding makes it unnecessary). The masks, times and dropout of a step therefore do
not depend on the number of ranks or on where a run was interrupted. On CPU, training runs
under torch's deterministic algorithms (``deterministic_algorithms``: the embedding's
backward otherwise adds with atomics across threads) and the per-sequence loss is a
fixed-order segment sum (``losses.common.per_sequence``), so two processes with the same
config and thread count give the same losses and weights bit for bit, straight or killed
and resumed; 2 ranks x accum 1 matches 1 rank x accum 2 up to float summation order (the
gradient all-reduce).

On CUDA (not measured here) the same seeding holds and the embedding gradient (sort-based
``index_put_``), the per-sequence sum, the Triton kernels (no atomics), fused AdamW and the
EMA are deterministic. What is not: the attention backward of PyTorch SDPA's flash and
memory-efficient kernels and of flash-attn (atomic adds into dq; ``set_attention_impl("triton")``
avoids them), cuBLAS algorithm choice across GPU models or library versions, and the NCCL
all-reduce across topologies.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from ..acceleration import resolve_acceleration
from ..config import ConfigError, parse_dtype
from ..data import ResumableLoader, check_batch_split, get_tokenizer, load_blocks
from ..data.tokenizers import tokenizer_mismatch
from ..distributed import DistEnv, all_reduce_mean, barrier, cleanup, init_distributed
from ..ema import ExponentialMovingAverage
from ..errors import NonFiniteLossError
from ..evaluation.ppl import make_loss_fn
from ..files import LineLogHandler, atomic_write_text
from ..flops import MFU_FORMULA, peak_flops
from ..model import RADD
from ..noise import get_noise
from .config import RunConfig
from .lock import run_folder_lock
from .metrics import RESUME, Metrics
from .optim import build_optimizer, lr_at
from .snapshot import snapshot_samples
from .state import (
    META,
    SNAPSHOTS,
    all_finite,
    atomic_save,
    build_checkpoint,
    check_resume_settings,
    find_resume_checkpoint,
    remove_stale_temporaries,
    restore,
    resume_settings,
)
from .step import TrainStep

log = logging.getLogger("radd_fast.training")


def seed_for(seed: int, step: int, micro: int, stream: str = "train") -> None:
    """Seed every generator (CPU and all CUDA devices) from (seed, step, micro-batch, stream)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro}:{stream}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@contextlib.contextmanager
def deterministic_algorithms(device: torch.device):
    """On CPU, torch's deterministic algorithms for the duration of training.

    Why: the backward of the embedding lookup (``embedding[ids]``) is an ``index_put_`` with
    accumulate, which torch runs on CPU with atomic float adds across threads once it has
    32768 elements or more (the tiny preset at batch 16 x 64 tokens already): the order of the
    adds, hence the gradient's bits, changed from process to process whenever torch had more
    than one thread. Deterministic mode runs it in a fixed order (warn_only: an op without a
    deterministic version warns instead of stopping the run). Its NaN fill of every
    ``torch.empty`` is switched off: it guards against reading uninitialised memory, which
    no op here does, and costs a pass over each new buffer. CUDA is left as the user set it
    (see the module docstring). The previous settings are restored afterwards.
    """
    if device.type != "cpu" or torch.are_deterministic_algorithms_enabled():
        yield
        return
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = parse_dtype(name)
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("training.dtype=fp16 needs CUDA (loss scaling); use fp32 or bf16 on CPU")
    return dtype


def train(config, run_dir, device: str | None = None) -> dict:
    """Train, or resume when ``run_dir`` holds a checkpoint (the meta one, else the newest intact snapshot).

    config: a RunConfig, or the nested dict / Hydra config of configs/config.yaml.
    Returns ``{"step", "losses": [(step, loss)], "eval_losses": [(step, loss)]}`` (losses of this call).
    Example::

        cfg = OmegaConf.to_container(OmegaConf.load("configs/config.yaml")) | {...}
        history = train(cfg, "runs/tiny")
    """
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    owns_group = not torch.distributed.is_initialized()
    env = init_distributed(device)
    run_dir = Path(run_dir)
    try:
        with run_folder_lock(run_dir, enabled=env.is_main):  # one writer per folder: a second is refused
            handler = _setup_logging(run_dir, env)
            try:
                with deterministic_algorithms(env.device):
                    return _train(cfg, run_dir, env)
            finally:
                if handler is not None:
                    logging.getLogger("radd_fast").removeHandler(handler)
                    handler.close()
    finally:
        if owns_group:
            cleanup(env)


def _train(cfg: RunConfig, run_dir: Path, env: DistEnv) -> dict:
    t = cfg.training
    check_batch_split(t.batch_size, env.world, t.accum)  # fail before any data is touched
    if cfg.data.valid and t.eval_freq:
        check_batch_split(cfg.eval.batch_size, env.world, t.accum, "eval.batch_size")
    device = env.device
    dtype = resolve_dtype(t.dtype, device)
    if env.is_main:
        _write_config(cfg, run_dir)
        remove_stale_temporaries(run_dir)

    tokenizer = get_tokenizer(cfg.tokenizer)
    # Exact, as sample.py needs: a model with more tokens than its tokenizer has ids trains, but cannot be sampled.
    problem = tokenizer_mismatch(tokenizer.vocab_size, cfg.model.tokens, cfg.tokenizer, exact=True)
    if problem:
        raise ConfigError(f"{problem}: set tokens={tokenizer.vocab_size} (sample.py decodes only a model whose "
                          "tokens are its tokenizer's ids)")
    length = cfg.model.model.length
    train_loader = ResumableLoader(_blocks(cfg, cfg.data.train, "train", tokenizer, env), t.batch_size, t.seed,
                                   env.rank, env.world, t.accum, device)
    valid_loader = None
    if cfg.data.valid and t.eval_freq:
        valid_loader = ResumableLoader(_blocks(cfg, cfg.data.valid, "validation", tokenizer, env),
                                       cfg.eval.batch_size, t.seed + 1, env.rank, env.world, t.accum, device,
                                       what="eval.batch_size")

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = RADD(cfg.model).to(device)
    model.set_compute_dtype(dtype)
    noise = get_noise(cfg.model).to(device)
    params = list(model.parameters())
    ema = ExponentialMovingAverage(params, t.ema)
    optimizer = build_optimizer(params, cfg.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    settings = resume_settings(cfg)
    step, resume_point = _resume(run_dir, device, settings, model, ema, optimizer, scaler, train_loader,
                                 valid_loader)

    # The evaluation scores the static-row loss too: compiled and graphed like the step (same policy).
    eval_accel = resolve_acceleration(device, t.compile, None, world_size=env.world)
    eval_fn = make_loss_fn(model, noise, t.loss_type, t.sampling_eps, static_rows=True, acceleration=eval_accel,
                           time_sampler=t.time_sampler)
    wrap = None
    if env.world > 1:
        def wrap(module):
            return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    stepper = TrainStep(model, noise, t.loss_type, sampling_eps=t.sampling_eps, time_sampler=t.time_sampler,
                        compile=t.compile, wrap=wrap, world_size=env.world)  # policy: radd_fast.acceleration

    tokens_per_step = t.batch_size * length
    peak = peak_flops(device, dtype)
    log.info("model: %.2fM parameters, %s, %d rank(s), global batch %d x %d tokens, %s",
             sum(p.numel() for p in params) / 1e6, dtype, env.world, t.batch_size, length, t.loss_type)
    log.info("training step: %s", stepper.acceleration.describe())
    if peak:
        log.info("MFU: %s", MFU_FORMULA)
    metrics = Metrics(run_dir, env.is_main, t.n_iters, step, t.progress, cfg.logging.tensorboard,
                      cfg.logging.wandb_project if cfg.logging.wandb else None, cfg.raw)

    def save(path: Path) -> None:
        """Write a checkpoint of this step (rank 0), after checking that nothing in it is NaN / inf."""
        nonlocal resume_point
        if not all_finite([*params, *ema.shadow_params]):
            raise NonFiniteLossError(f"the weights are not finite after step {step}: {path} was not written; "
                                     f"{_last_good(resume_point)}")
        data = {"train": train_loader.state_dict()}
        if valid_loader is not None:
            data["valid"] = valid_loader.state_dict()
        if env.is_main:
            atomic_save(build_checkpoint(model, ema, optimizer, scaler, step, data, env.world, settings), path)
        # What a resume would read: the meta checkpoint once there is a good one, else the newest snapshot.
        if path == run_dir / META or resume_point is None or resume_point[0] != run_dir / META:
            resume_point = (path, step)

    history = {"losses": [], "eval_losses": []}
    # The host reads the device only at a boundary (a log, evaluation or checkpoint step): the window
    # is the training time and work since the last log (evaluation, checkpoints, samples excluded).
    window = {"seconds": 0.0, "steps": 0, "flops": 0.0, "overflows": 0}
    started = None
    try:
        while step < t.n_iters:
            started = time.perf_counter() if started is None else started
            _accumulate(stepper, train_loader.next_step(), scaler, step, t.seed, env)
            step += 1
            stepper.update(optimizer, params, lr_at(step, cfg.optim), cfg.optim.grad_clip, step, scaler)
            ema.update(params)
            metrics.progress(1)
            logs = step % t.log_freq == 0 or step == t.n_iters
            evaluates = valid_loader is not None and step % t.eval_freq == 0
            snapshots = step % t.snapshot_freq == 0 or step == t.n_iters
            resume_point_due = step % t.snapshot_freq_for_preemption == 0 or step == t.n_iters
            if not (logs or evaluates or snapshots or resume_point_due):
                continue
            report = stepper.read(env)  # the one host sync since the last boundary
            window["seconds"] += time.perf_counter() - started
            started = None
            first = step - len(report.losses) + 1
            history["losses"] += list(zip(range(first, step + 1), report.losses))
            if report.problem():
                raise NonFiniteLossError(f"{report.problem()}; {_last_good(resume_point)}")
            window["steps"] += len(report.losses)
            window["flops"] += report.flops
            window["overflows"] += report.overflows

            if logs:
                loss = report.losses[-1]
                tok_s = tokens_per_step * window["steps"] / window["seconds"]
                record = {"loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": report.grad_norm,
                          "tokens_per_s": tok_s, "capacity_overflows": window["overflows"],
                          "mfu": window["flops"] / (window["seconds"] * peak) if peak else None}
                if peak:
                    record["mfu_formula"] = MFU_FORMULA
                metrics.log(step, **record)
                metrics.progress(0, loss=loss, tok_s=tok_s, **({"mfu": record["mfu"]} if peak else {}))
                log.info("step %d: loss %.4f, %.0f tokens/s", step, loss, tok_s)
                window = {"seconds": 0.0, "steps": 0, "flops": 0.0, "overflows": 0}
            # Evaluation first: a checkpoint of this step then holds the validation position after it.
            if evaluates:
                eval_loss = _evaluate(model, ema, eval_fn, valid_loader, step, t.seed, env)
                history["eval_losses"].append((step, eval_loss))
                metrics.log(step, eval_loss=eval_loss)
                log.info("step %d: evaluation loss %.4f", step, eval_loss)
            # The resume point last: a kill before it redoes this step's snapshot and samples.
            if snapshots:
                save(run_dir / SNAPSHOTS / f"checkpoint_{step}.pth")
                if t.snapshot_sampling:
                    seed_for(t.seed, step, env.rank, "sample")
                    snapshot_samples(model, ema, noise, tokenizer, cfg, step, run_dir, env, metrics)
                barrier(env)
            if resume_point_due:
                save(run_dir / META)
    finally:
        metrics.close()
    history["step"] = step
    return history


def _resume(run_dir: Path, device, settings: dict, model, ema, optimizer, scaler, train_loader,
            valid_loader) -> tuple[int, tuple[Path, int] | None]:
    """Load the run folder's checkpoint into the training objects: (step, (path, step) or None)."""
    found = find_resume_checkpoint(run_dir, device)
    if found is None:
        log.info("no checkpoint in %s: starting at step 0", run_dir)
        return 0, None
    ckpt, path = found
    check_resume_settings(ckpt, settings, path)
    step = restore(ckpt, path, model, ema, optimizer, scaler)
    data = ckpt.get("data", {})
    if "train" in data:
        train_loader.load_state_dict(data["train"])
    else:
        log.warning("%s holds no data position (published format): the data starts again at its first batch", path)
    if valid_loader is not None and "valid" in data:
        valid_loader.load_state_dict(data["valid"])
    log.info("resumed %s at step %d from %s", run_dir, step, path)
    return step, (path, step)


def _last_good(resume_point: tuple[Path, int] | None) -> str:
    """The end of a non-finite error: which file a resume would start from, or that there is none."""
    if resume_point is None:
        return "no checkpoint has been written yet, so there is none to resume from"
    path, step = resume_point
    return f"the last good checkpoint is {path} (step {step}); a resume starts from it"


def _accumulate(stepper: TrainStep, micro_batches, scaler, step: int, seed: int, env: DistEnv) -> None:
    """Forward + backward over this rank's micro-batches (no host sync; the loss stays in ``stepper``).

    Each micro-batch is seeded from (seed, step, its index in the global batch) first: its host
    half (rates and masked counts) and its device half (positions, dropout) then do not depend
    on the number of ranks or on where a run was resumed.
    """
    n = len(micro_batches)
    for j, (micro, x) in enumerate(micro_batches):
        seed_for(seed, step, micro)
        sync = j == n - 1 or env.world == 1  # DDP: all-reduce the gradients with the last micro-batch only
        with contextlib.nullcontext() if sync else stepper.module.no_sync():
            stepper.micro_batch(x, weight=1 / n, scaler=scaler)


@torch.no_grad()
def _evaluate(model, ema, eval_fn, loader, step: int, seed: int, env: DistEnv) -> float:
    """Mean loss over one global evaluation batch, under the EMA weights (as published)."""
    total = torch.zeros((), device=env.device, dtype=torch.float64)
    micro_batches = loader.next_step()
    with ema.average_parameters(list(model.parameters())):
        for micro, x in micro_batches:
            seed_for(seed, step, micro, "eval")
            total += eval_fn(model, x).mean()
    model.train()
    return all_reduce_mean(total / len(micro_batches), env).item()


def _blocks(cfg: RunConfig, source: str, split: str, tokenizer, env: DistEnv):
    """Rank 0 tokenises and caches first; the others then read the cache."""
    kw = dict(tokenizer=tokenizer, length=cfg.model.model.length, cache_dir=cfg.data.cache_dir,
              num_proc=cfg.data.num_proc)
    if env.is_main:
        blocks = load_blocks(source, split, **kw)
    barrier(env)
    if not env.is_main:
        blocks = load_blocks(source, split, **kw)
    return blocks


def _write_config(cfg: RunConfig, run_dir: Path) -> None:
    """Hydra writes .hydra/config.yaml; a run started from Python gets one too (load_model reads it)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        atomic_write_text(path, yaml.safe_dump(cfg.raw, sort_keys=False))


def _setup_logging(run_dir: Path, env: DistEnv):
    """Rank 0 appends the package's log lines to <run>/logs (published name)."""
    if not env.is_main:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = LineLogHandler(run_dir / "logs", advice=RESUME)  # a full disk: one error line, not a traceback each
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger("radd_fast")
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    return handler
