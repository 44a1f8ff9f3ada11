"""The training loop (radd_fast/training/loop.py).

Whole runs: the run folder's layout, a resumed run equal to the uninterrupted one, the NaN guard and
what train() refuses before any work. Then each piece against an independent expectation (a run
compared with itself cannot see a loop that logs the wrong throughput, seeds every run the same
wrong way, averages evaluation micro-batches wrongly or writes the wrong log line, as long as it
does so every time): the seed derivation (a resumed run of a newer version must draw what the older
one drew) and the reseeding before every draw (no generator state is saved or restored), torch's
deterministic mode during CPU training, the boundary schedule (which steps log, evaluate, snapshot,
write the resume point), the logged figures under a fake clock, the evaluation mean, the micro-batch
weights and DDP's no_sync, and the user-facing log lines word for word.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

import radd_fast
from radd_fast import RADD, ExponentialMovingAverage, LogLinearNoise, ModelConfig, RADDConfig
from radd_fast.acceleration import Acceleration
from radd_fast.checkpoint import CheckpointError
from radd_fast.config import ConfigError
from radd_fast.data import ByteTokenizer, DataError, ResumableLoader, load_blocks
from radd_fast.distributed import DistEnv
from radd_fast.training import NonFiniteLossError, train
from radd_fast.training import loop as loop_module
from radd_fast.training.config import RunConfig
from radd_fast.training.state import META, atomic_save
from radd_fast.training.step import TrainStep
from tests.support.runs import (
    assert_same_state,
    load_meta,
    poison_gradients_at,
    tiny_config,
    write_text,
)


def expected_seed(seed: int, step: int, micro: int, stream: str) -> int:
    """The derivation written out: blake2b-64 of "seed:step:micro:stream", little-endian, top bit cleared."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


# ---- whole runs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 steps in one go: the reference for the resume tests."""
    folder = tmp_path_factory.mktemp("straight")
    history = train(tiny_config(folder), folder / "run")
    return folder / "run", history


def test_run_folder_layout_and_load_model(straight_run):
    run, history = straight_run
    assert history["step"] == 6 and len(history["losses"]) == 6
    assert [s for s, _ in history["eval_losses"]] == [2, 4, 6]
    for rel in (".hydra/config.yaml", "checkpoints/checkpoint_3.pth", "checkpoints/checkpoint_6.pth",
                "checkpoints-meta/checkpoint.pth", "logs", "metrics.jsonl"):
        assert (run / rel).exists(), rel
    ckpt = load_meta(run)  # weights_only=True: plain tensors, numbers and dicts only
    assert set(ckpt) == {"model", "ema", "optimizer", "step", "scaler", "data", "world", "run"}
    assert "rng" not in ckpt  # every generator is reseeded before use: no state to save
    assert ckpt["step"] == 6 and set(ckpt["ema"]) == {"decay", "num_updates", "shadow_params"}
    assert ckpt["data"]["train"] == {"epoch": ckpt["data"]["train"]["epoch"], "batch": ckpt["data"]["train"]["batch"]}
    assert ckpt["run"]["training.batch_size"] == 4 and ckpt["run"]["model.hidden_size"] == 32
    for rel in ("checkpoints-meta/checkpoint.pth", "checkpoints/checkpoint_3.pth", "checkpoints/checkpoint_6.pth"):
        digest, name = (run / (rel + ".sha256")).read_text().split()  # sha256sum -c format
        assert name == Path(rel).name and digest == hashlib.sha256((run / rel).read_bytes()).hexdigest()
    model, noise = radd_fast.load_model(run)  # the run format: EMA weights served
    names = [n for n, _ in model.named_parameters()]
    for name, shadow in zip(names, ckpt["ema"]["shadow_params"]):
        assert torch.equal(model.state_dict()[name], shadow)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4, 5, 6]
    assert all(x["tokens_per_s"] > 0 and x["mfu"] is None for x in train_lines)  # no MFU on CPU
    assert [x["loss"] for x in train_lines] == [loss for _, loss in history["losses"]]


def test_resume_reproduces_the_uninterrupted_run(straight_run, tmp_path):
    run, straight = straight_run
    cfg = tiny_config(tmp_path)
    half = train(dict(cfg, training=dict(cfg["training"], n_iters=3)), tmp_path / "run")
    rest = train(cfg, tmp_path / "run")
    assert half["losses"] + rest["losses"] == straight["losses"]  # exactly, not approximately
    assert half["eval_losses"] + rest["eval_losses"] == straight["eval_losses"]
    assert_same_state(load_meta(tmp_path / "run"), load_meta(run))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(straight_run, tmp_path, monkeypatch):
    """A NaN at step 5 stops the run before the update; the step-4 checkpoint is intact and
    resuming from it (the interruption) reproduces the straight run."""
    run, straight = straight_run
    real = loop_module._accumulate
    monkeypatch.setattr(loop_module, "_accumulate", poison_gradients_at(4))  # index 4: the 5th step
    meta = tmp_path / "run" / "checkpoints-meta" / "checkpoint.pth"
    with pytest.raises(NonFiniteLossError, match=f"not finite at step 5: no update from that step on was applied; "
                                                 f"the last good checkpoint is {re.escape(str(meta))} \\(step 4\\)"):
        train(tiny_config(tmp_path), tmp_path / "run")
    ckpt = load_meta(tmp_path / "run")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    monkeypatch.setattr(loop_module, "_accumulate", real)
    rest = train(tiny_config(tmp_path), tmp_path / "run")
    assert rest["losses"] == straight["losses"][4:]
    assert rest["eval_losses"] == straight["eval_losses"][2:]  # the validation position resumed too
    assert_same_state(load_meta(tmp_path / "run"), load_meta(run))


@pytest.mark.parametrize("loss_type", ["t_DCE", "t_DSE", "k_DCE"])
def test_other_losses_train(tmp_path, loss_type):
    cfg = tiny_config(tmp_path, training={"n_iters": 2, "loss_type": loss_type, "eval_freq": 0})
    assert train(cfg, tmp_path / "run")["step"] == 2


# ---- seeding: every generator reseeded before use ------------------------------------------------------------
@pytest.mark.parametrize("key", [(3, 7, 1, "train"), (0, 0, 0, "eval"), (2**40, 123456, 5, "sample")])
def test_seed_for_is_the_documented_derivation(key):
    loop_module.seed_for(*key)
    assert torch.initial_seed() == expected_seed(*key)


def test_seed_for_defaults_to_the_training_stream():
    loop_module.seed_for(4, 9, 2)
    assert torch.initial_seed() == expected_seed(4, 9, 2, "train")


def test_seed_for_depends_on_every_part_of_its_key():
    def draw(*key):
        loop_module.seed_for(*key)
        return torch.rand(4)

    assert torch.equal(draw(1, 5, 0), draw(1, 5, 0))
    keys = [(1, 5, 0), (2, 5, 0), (1, 6, 0), (1, 5, 1), (1, 5, 0, "eval")]
    draws = [draw(*k) for k in keys]
    assert all(not torch.equal(draws[i], draws[j]) for i in range(len(keys)) for j in range(i))


def test_a_step_draws_the_same_whatever_the_generator_held_before(tmp_path):
    """The reseeding is the whole mechanism: with it removed (or skipped for a micro-batch) the
    loss of a step depends on what was drawn before, and a resumed run would differ."""
    model = RADD(RADDConfig(tokens=256, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=16,
                                                          dropout=0.1))).train()
    blocks = load_blocks(str(write_text(tmp_path)), "train", ByteTokenizer(), 16, cache_dir=tmp_path / "cache")
    batches = ResumableLoader(blocks, 4, seed=0, accum=2).next_step()
    stepper = TrainStep(model, LogLinearNoise(), "lambda_DCE")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for prior in (0, 12345):
        torch.manual_seed(prior)
        torch.rand(prior % 97)  # leave the generator somewhere else
        loop_module._accumulate(stepper, batches, scaler, 7, 3, DistEnv())
        stepper.update(optimizer, list(model.parameters()), lr=0.0, max_norm=0.0, step=8)
        losses += stepper.read().losses
    assert losses[0] == losses[1]


# ---- deterministic mode --------------------------------------------------------------------------------------
def test_cpu_training_runs_under_deterministic_algorithms_and_restores_the_mode():
    assert not torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    with loop_module.deterministic_algorithms(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory == fill
    with loop_module.deterministic_algorithms(torch.device("cuda")):  # only a device object: no GPU needed
        assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_mode_skips_the_nan_fill_and_leaves_a_mode_the_user_set():
    with loop_module.deterministic_algorithms(torch.device("cpu")):
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    torch.use_deterministic_algorithms(True)
    try:
        with loop_module.deterministic_algorithms(torch.device("cpu")):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()  # the user's (strict) mode
        assert torch.are_deterministic_algorithms_enabled()  # not switched off on exit
    finally:
        torch.use_deterministic_algorithms(False)


# ---- dtype ---------------------------------------------------------------------------------------------------
def test_resolve_dtype_auto_bf16_and_fp16():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # device objects only: no GPU needed
    assert loop_module.resolve_dtype("auto", cpu) == torch.float32
    assert loop_module.resolve_dtype("auto", cuda) == torch.bfloat16
    assert loop_module.resolve_dtype("bf16", cpu) == torch.bfloat16
    assert loop_module.resolve_dtype("fp16", cuda) == torch.float16
    with pytest.raises(ConfigError) as err:
        loop_module.resolve_dtype("fp16", cpu)
    assert str(err.value) == "training.dtype=fp16 needs CUDA (loss scaling); use fp32 or bf16 on CPU"


# ---- messages ------------------------------------------------------------------------------------------------
def test_last_good_names_the_file_and_step_or_says_there_is_none():
    assert loop_module._last_good(None) == "no checkpoint has been written yet, so there is none to resume from"
    assert loop_module._last_good((Path("r/c.pth"), 4)) == "the last good checkpoint is r/c.pth (step 4); a resume starts from it"


# ---- micro-batches -------------------------------------------------------------------------------------------
class RecordingStepper:
    """Stands for TrainStep in ``_accumulate``: records each micro-batch's weight, seed and no_sync."""

    def __init__(self):
        self.calls = []
        self.in_no_sync = False
        self.module = self

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False

    def micro_batch(self, x, weight, scaler=None):
        self.calls.append((int(x), weight, torch.initial_seed(), self.in_no_sync, scaler))


@pytest.mark.parametrize("world, expected_no_sync", [(1, [False, False, False]), (2, [True, True, False])])
def test_accumulate_weights_seeds_and_no_sync(world, expected_no_sync):
    stepper, scaler = RecordingStepper(), object()
    micro_batches = [(4, torch.tensor(40)), (5, torch.tensor(50)), (6, torch.tensor(60))]  # rank 1's share
    loop_module._accumulate(stepper, micro_batches, scaler, step=11, seed=2, env=DistEnv(rank=1, world=world))
    assert [c[0] for c in stepper.calls] == [40, 50, 60]
    assert [c[1] for c in stepper.calls] == [1 / 3] * 3
    assert [c[2] for c in stepper.calls] == [expected_seed(2, 11, m, "train") for m in (4, 5, 6)]
    assert [c[3] for c in stepper.calls] == expected_no_sync  # DDP all-reduces with the last micro-batch only
    assert all(c[4] is scaler for c in stepper.calls)


# ---- evaluation ----------------------------------------------------------------------------------------------
class FixedLoader:
    def __init__(self, micro_batches):
        self.micro_batches = micro_batches

    def next_step(self):
        return self.micro_batches


def test_evaluate_is_the_mean_of_micro_batch_means_under_the_ema_weights(tmp_path):
    cfg = RunConfig.from_dict(tiny_config(tmp_path))
    model = RADD(cfg.model)
    params = list(model.parameters())
    ema = ExponentialMovingAverage(params, 0.9)
    ema.shadow_params = [torch.full_like(p, 0.5) for p in params]
    trained = [p.detach().clone() for p in params]
    seen = []

    def eval_fn(m, x):
        assert m is model and all(torch.equal(p, torch.full_like(p, 0.5)) for p in m.parameters())
        seen.append(torch.initial_seed())
        m.eval()  # the real scorer switches to eval mode: _evaluate must switch back
        return x.double()

    loader = FixedLoader([(2, torch.tensor([1.0, 2.0, 6.0])), (3, torch.tensor([10.0, 20.0, 30.0]))])
    value = loop_module._evaluate(model, ema, eval_fn, loader, step=8, seed=5, env=DistEnv())
    assert value == pytest.approx((3.0 + 20.0) / 2, rel=1e-15)
    assert seen == [expected_seed(5, 8, 2, "eval"), expected_seed(5, 8, 3, "eval")]
    assert model.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), trained))  # training weights back


# ---- run-folder helpers --------------------------------------------------------------------------------------
def test_write_config_keeps_the_key_order_and_never_overwrites(tmp_path):
    cfg = RunConfig.from_dict(tiny_config(tmp_path))
    run = tmp_path / "run"
    loop_module._write_config(cfg, run)
    path = run / ".hydra" / "config.yaml"
    assert path.read_text() == yaml.safe_dump(cfg.raw, sort_keys=False)
    assert list(yaml.safe_load(path.read_text())) == list(cfg.raw)  # the config's order, not sorted
    path.write_text("hydra: wrote this\n")
    loop_module._write_config(cfg, run)  # a Hydra run already wrote it: left alone
    assert path.read_text() == "hydra: wrote this\n"
    other = tmp_path / "other"
    (other / ".hydra").mkdir(parents=True)  # the folder without the file (Hydra's overrides.yaml only)
    loop_module._write_config(cfg, other)
    assert (other / ".hydra" / "config.yaml").read_text() == yaml.safe_dump(cfg.raw, sort_keys=False)


def test_setup_logging_appends_formatted_lines_on_rank_0_only(tmp_path):
    assert loop_module._setup_logging(tmp_path / "other", DistEnv(rank=1, world=2)) is None
    assert not (tmp_path / "other").exists()
    run = tmp_path / "run" / "nested"
    pkg = logging.getLogger("radd_fast")
    level = pkg.level
    handler = loop_module._setup_logging(run, DistEnv())
    try:
        assert pkg.level == logging.INFO
        logging.getLogger("radd_fast.training").info("hello %d", 3)
        handler.flush()
        line = (run / "logs").read_text().splitlines()[-1]
        assert line.endswith(" INFO radd_fast.training: hello 3")
        assert handler.formatter._fmt == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    finally:
        pkg.removeHandler(handler)
        handler.close()
        pkg.setLevel(level)


@pytest.mark.parametrize("rank, expected", [(0, ["load", "barrier"]), (1, ["barrier", "load"])])
def test_blocks_rank_0_tokenises_first(tmp_path, monkeypatch, rank, expected):
    cfg = RunConfig.from_dict(tiny_config(tmp_path, data={"num_proc": 3}))
    events = []

    def fake_load(source, split, **kw):
        events.append("load")
        assert (source, split) == ("corpus", "validation")
        assert kw == {"tokenizer": "tok", "length": 16, "cache_dir": cfg.data.cache_dir, "num_proc": 3}
        return "blocks"

    monkeypatch.setattr(loop_module, "load_blocks", fake_load)
    monkeypatch.setattr(loop_module, "barrier", lambda env: events.append("barrier"))
    assert loop_module._blocks(cfg, "corpus", "validation", "tok", DistEnv(rank=rank, world=2)) == "blocks"
    assert events == expected


# ---- the loop: boundaries, logged figures, log lines ---------------------------------------------------------
class FakeClock:
    """Stands for the loop's ``time`` module: ``perf_counter`` advances ``per_call`` seconds each time it
    is read (1: a window's seconds are its reads); a test may also move ``now`` itself (``per_call=0``)."""

    def __init__(self, per_call: float = 1.0):
        self.now, self.per_call = 0.0, per_call

    def perf_counter(self):
        self.now += self.per_call
        return self.now


@pytest.fixture
def boundary_run(tmp_path, monkeypatch):
    """7 steps: log every 3, evaluate every 2, snapshot every 4, resume point every 5 (and all at the end),
    under a fake clock and a fake 1 TFLOP/s peak; every StepReport and progress call recorded."""
    reports, progress = [], []
    real_read = TrainStep.read

    def read(self, *args, **kwargs):
        report = real_read(self, *args, **kwargs)
        report.overflows = len(reports) + 1  # distinct per read: the window must sum them
        reports.append(report)
        return report

    real_progress = loop_module.Metrics.progress

    def record_progress(self, n, **postfix):
        progress.append((n, postfix))
        return real_progress(self, n, **postfix)

    monkeypatch.setattr(TrainStep, "read", read)
    monkeypatch.setattr(loop_module.Metrics, "progress", record_progress)
    monkeypatch.setattr(loop_module, "time", FakeClock())
    monkeypatch.setattr(loop_module, "peak_flops", lambda device, dtype: 1e12)
    cfg = tiny_config(tmp_path, training={"n_iters": 7, "log_freq": 3, "eval_freq": 2, "snapshot_freq": 4,
                                          "snapshot_freq_for_preemption": 5, "accum": 1})
    run = tmp_path / "run"
    logger = logging.getLogger("radd_fast.training")
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        history = train(cfg, run)
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return dict(history=history, reports=reports, progress=progress, lines=lines, messages=records, run=run)


def test_boundaries_are_the_configured_multiples_and_the_last_step(boundary_run):
    run, lines = boundary_run["run"], boundary_run["lines"]
    assert [x["step"] for x in lines if "loss" in x] == [3, 6, 7]
    assert [x["step"] for x in lines if "eval_loss" in x] == [2, 4, 6]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pth")) == ["checkpoint_4.pth", "checkpoint_7.pth"]
    assert load_meta(run)["step"] == 7
    # one read per boundary: 2 (eval), 3 (log), 4 (eval, snapshot), 5 (resume point), 6 (log, eval), 7 (all)
    assert [len(r.losses) for r in boundary_run["reports"]] == [2, 1, 1, 1, 1, 1]
    history = boundary_run["history"]
    assert history["step"] == 7
    assert [s for s, _ in history["losses"]] == [1, 2, 3, 4, 5, 6, 7]
    assert [loss for _, loss in history["losses"]] == [loss for r in boundary_run["reports"] for loss in r.losses]
    assert [s for s, _ in history["eval_losses"]] == [2, 4, 6]
    assert [e for _, e in history["eval_losses"]] == [x["eval_loss"] for x in lines if "eval_loss" in x]


def test_logged_throughput_mfu_and_overflows_cover_the_window_since_the_last_log(boundary_run):
    """Fake clock: each read closes one second; a window is every read since the last log line."""
    reports = boundary_run["reports"]
    logged = [x for x in boundary_run["lines"] if "loss" in x]
    windows = [reports[0:2], reports[2:5], reports[5:6]]  # logs at 3 (reads 2, 3), 6 (4, 5, 6), 7
    tokens_per_step = 4 * 16
    for record, window in zip(logged, windows):
        seconds = float(len(window))
        steps = sum(len(r.losses) for r in window)
        assert record["tokens_per_s"] == tokens_per_step * steps / seconds
        assert record["mfu"] == pytest.approx(sum(r.flops for r in window) / (seconds * 1e12), rel=1e-12, abs=0)
        assert record["mfu_formula"] == loop_module.MFU_FORMULA
        assert record["capacity_overflows"] == sum(r.overflows for r in window)
        assert record["grad_norm"] == window[-1].grad_norm and record["loss"] == window[-1].losses[-1]
    assert [x["lr"] for x in logged] == [3e-3, 3e-3, 3e-3]  # warmup 2: the full rate from step 2 on
    assert all(r.flops > 0 for r in reports)


def test_the_progress_bar_advances_per_step_and_shows_the_logged_figures(boundary_run):
    progress = boundary_run["progress"]
    assert [n for n, _ in progress if n] == [1] * 7
    shown = [post for n, post in progress if n == 0]
    logged = [x for x in boundary_run["lines"] if "loss" in x]
    assert shown == [{"loss": x["loss"], "tok_s": x["tokens_per_s"], "mfu": x["mfu"]} for x in logged]


def test_the_log_lines_a_user_reads(boundary_run):
    messages = boundary_run["messages"]
    params = sum(p.numel() for p in RADD(RunConfig.from_dict(tiny_config(boundary_run["run"].parent)).model)
                 .parameters())
    assert f"model: {params / 1e6:.2f}M parameters, torch.float32, 1 rank(s), global batch 4 x 16 tokens, lambda_DCE" \
        in messages
    assert any(m.startswith("training step: ") for m in messages)
    assert f"MFU: {loop_module.MFU_FORMULA}" in messages
    assert f"no checkpoint in {boundary_run['run']}: starting at step 0" in messages
    logged = [x for x in boundary_run["lines"] if "loss" in x]
    for x in logged:
        assert f"step {x['step']}: loss {x['loss']:.4f}, {x['tokens_per_s']:.0f} tokens/s" in messages
    for x in (x for x in boundary_run["lines"] if "eval_loss" in x):
        assert f"step {x['step']}: evaluation loss {x['eval_loss']:.4f}" in messages


def test_no_mfu_without_a_known_peak(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tmp_path, training={"n_iters": 2, "eval_freq": 0}), run)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["mfu"] for x in logged] == [None, None] and not any("mfu_formula" in x for x in logged)


def test_the_loop_logs_the_pre_clip_norm_and_passes_grad_clip(tmp_path, monkeypatch):
    seen = []
    real = TrainStep.update

    def spy(self, optimizer, params, lr, max_norm, step, scaler=None):
        grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
        seen.append((torch.cat(grads).norm().item(), max_norm))
        return real(self, optimizer, params, lr, max_norm, step, scaler)

    monkeypatch.setattr(TrainStep, "update", spy)
    cfg = tiny_config(tmp_path, training={"n_iters": 2, "snapshot_freq": 2, "snapshot_freq_for_preemption": 2,
                                          "eval_freq": 100, "accum": 1},
                      optim={"lr": 1e-3, "warmup": 0, "grad_clip": 0.05})
    train(cfg, run_dir=tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in logged if "grad_norm" in r]
    assert len(seen) == 2 and len(norms) == 2
    for (before, max_norm), logged_norm in zip(seen, norms):
        assert max_norm == 0.05 and before > 0.05
        assert logged_norm == pytest.approx(before, rel=1e-5)


def test_resume_logs_where_it_resumed_and_restores_the_validation_position(tmp_path, caplog):
    cfg = tiny_config(tmp_path, training={"n_iters": 2})
    run = tmp_path / "run"
    train(cfg, run)
    saved = load_meta(run)["data"]["valid"]
    restored = []
    real = loop_module.ResumableLoader.load_state_dict

    def spy(self, state):
        restored.append(state)
        return real(self, state)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, "radd_fast"):
        mp.setattr(loop_module.ResumableLoader, "load_state_dict", spy)
        train(dict(cfg, training=dict(cfg["training"], n_iters=4)), run)
    assert len(restored) == 2 and restored[1] == saved  # train first, then validation
    assert f"resumed {run} at step 2 from {run / 'checkpoints-meta' / 'checkpoint.pth'}" in caplog.messages


# ---- set-up checks before any work ---------------------------------------------------------------------------
def test_batch_not_divisible_by_ranks_times_accum(tmp_path):
    with pytest.raises(ValueError, match="training.batch_size = 6 is not divisible by ngpus x training.accum = 1 x 4"):
        train(tiny_config(tmp_path, training={"batch_size": 6, "accum": 4}), tmp_path / "run")


def test_empty_and_too_short_datasets(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="fewer than one block of 16"):
        train(tiny_config(tmp_path, data={"train": str(empty)}), tmp_path / "run")
    with pytest.raises(DataError, match="unknown dataset 'owt'"):
        train(tiny_config(tmp_path, data={"train": "owt"}), tmp_path / "run2")


def test_bad_config_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown training.loss_type 'dce'"):
        train(tiny_config(tmp_path, training={"loss_type": "dce"}), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['training.batchsize'\]"):
        train(tiny_config(tmp_path, training={"batchsize": 4}), tmp_path / "run")
    with pytest.raises(ConfigError, match="set tokens=256"):
        train(dict(tiny_config(tmp_path), tokens=100), tmp_path / "run")
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        train(tiny_config(tmp_path, training={"dtype": "fp16"}), tmp_path / "run")


def test_an_eval_batch_that_does_not_split_is_refused_only_when_evaluation_runs(tmp_path):
    cfg = tiny_config(tmp_path, eval={"batch_size": 3, "perplexity": False}, training={"n_iters": 1})
    with pytest.raises(ConfigError, match=r"^eval\.batch_size = 3 is not divisible by ngpus x training\.accum"):
        train(cfg, tmp_path / "a")
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    history = train(dict(cfg, training=dict(cfg["training"], eval_freq=0)), tmp_path / "b")
    assert history["step"] == 1 and history["eval_losses"] == []


def test_a_tokenizer_that_does_not_fit_the_model_says_which_tokens_to_set(tmp_path):
    """Exactly the tokenizer's ids, as sample.py needs: fewer tokens cannot hold the ids, more (e.g.
    tokenizer=bytes with the default tokens=50257) train a model sample.py refuses."""
    reason = "(sample.py decodes only a model whose tokens are its tokenizer's ids)"
    with pytest.raises(ConfigError) as err:
        train(tiny_config(tmp_path, tokens=100), tmp_path / "run")
    assert str(err.value) == f"tokenizer 'bytes' has 256 ids but the model only 100 tokens: set tokens=256 {reason}"
    with pytest.raises(ConfigError) as err:
        train(tiny_config(tmp_path, tokens=300), tmp_path / "big")
    assert str(err.value) == f"the model has 300 tokens but tokenizer 'bytes' decodes only 256 ids: set tokens=256 {reason}"


def test_the_validation_loader_is_shuffled_by_seed_plus_one(tmp_path, monkeypatch):
    made = []
    real = loop_module.ResumableLoader

    def spy(blocks, batch_size, seed, rank, world, accum, device, **kw):
        made.append((batch_size, seed, kw))
        return real(blocks, batch_size, seed, rank, world, accum, device, **kw)

    monkeypatch.setattr(loop_module, "ResumableLoader", spy)
    train(tiny_config(tmp_path, training={"n_iters": 1, "seed": 11}, eval={"batch_size": 6, "perplexity": False}),
          tmp_path / "run")
    assert made == [(4, 11, {}), (6, 12, {"what": "eval.batch_size"})]


def test_initial_weights_come_from_the_seed_and_no_scaler_runs_off_fp16(tmp_path, monkeypatch):
    """The weights the step starts from are what torch.manual_seed(seed) + RADD(cfg) makes (on every rank)."""
    initial = {}
    real_init = TrainStep.__init__

    def spy(self, model, *args, **kwargs):
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        real_init(self, model, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__init__", spy)
    cfg = tiny_config(tmp_path, training={"n_iters": 1, "seed": 9, "eval_freq": 0})
    train(cfg, tmp_path / "run")
    torch.manual_seed(9)
    expected = RADD(RunConfig.from_dict(cfg).model).state_dict()
    assert initial.keys() == expected.keys() and all(torch.equal(initial[k], v) for k, v in expected.items())
    assert load_meta(tmp_path / "run")["scaler"] == torch.amp.GradScaler("cpu", enabled=False).state_dict()


def test_a_bf16_run_computes_in_bf16(tmp_path, monkeypatch):
    dtypes = []
    real = RADD.set_compute_dtype

    def spy(self, dtype):
        dtypes.append(dtype)
        return real(self, dtype)

    monkeypatch.setattr(RADD, "set_compute_dtype", spy)
    train(tiny_config(tmp_path, training={"n_iters": 1, "eval_freq": 0, "dtype": "bf16"}), tmp_path / "run")
    assert dtypes[0] == torch.bfloat16


# ---- resuming: what the user is told -------------------------------------------------------------------------
def test_no_checkpoint_says_it_starts_at_step_0(tmp_path, caplog):
    cfg = tiny_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="radd_fast"):
        train(dict(cfg, training=dict(cfg["training"], n_iters=1)), tmp_path / "run")
    assert f"no checkpoint in {tmp_path / 'run'}: starting at step 0" in caplog.messages
    assert "starting at step 0" in (tmp_path / "run" / "logs").read_text()


def test_resume_messages_name_the_file(tmp_path, caplog):
    cfg = tiny_config(tmp_path, training={"n_iters": 2})
    run = tmp_path / "run"
    train(cfg, run)
    ckpt = load_meta(run)
    atomic_save({k: ckpt[k] for k in ("model", "ema", "optimizer", "step")}, run / META)  # published format
    with caplog.at_level(logging.WARNING, "radd_fast"):
        train(dict(cfg, training=dict(cfg["training"], n_iters=3)), run)
    assert (f"{run / META} holds no data position (published format): the data starts again at its first batch"
            in caplog.messages)
    ckpt = load_meta(run)
    atomic_save({k: ckpt[k] for k in ("model", "ema", "optimizer", "step")}, run / META)  # no settings to compare
    wider = dict(cfg, model=dict(cfg["model"], hidden_size=64), training=dict(cfg["training"], n_iters=4))
    with pytest.raises(CheckpointError) as err:
        train(wider, run)
    assert str(err.value).startswith(f"cannot resume from {run / META}: ")


# ---- the NaN guard -------------------------------------------------------------------------------------------
def test_nonfinite_weights_are_never_written_and_the_real_last_good_file_is_named(tmp_path, monkeypatch):
    real = TrainStep.update
    updates = []

    def explodes_in_step_3(self, optimizer, *args, **kwargs):
        real(self, optimizer, *args, **kwargs)
        updates.append(1)
        if len(updates) == 3:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")

    monkeypatch.setattr(TrainStep, "update", explodes_in_step_3)
    run = tmp_path / "run"
    meta = run / META
    with pytest.raises(NonFiniteLossError, match=f"the weights are not finite after step 3: .*checkpoint_3.pth was not "
                                                 f"written; the last good checkpoint is {re.escape(str(meta))} "
                                                 r"\(step 2\)"):
        train(tiny_config(tmp_path), run)
    assert not (run / "checkpoints" / "checkpoint_3.pth").exists() and load_meta(run)["step"] == 2


def test_nan_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "_accumulate", poison_gradients_at(0))
    with pytest.raises(NonFiniteLossError, match="not finite at step 1: .*no checkpoint has been written yet, "
                                                 "so there is none to resume from"):
        train(tiny_config(tmp_path), tmp_path / "run")


def test_nan_after_only_a_snapshot_names_the_snapshot(tmp_path, monkeypatch):
    """Without a meta checkpoint a resume starts from the newest snapshot: that is the file to name."""
    monkeypatch.setattr(loop_module, "_accumulate", poison_gradients_at(3))
    cfg = tiny_config(tmp_path, training={"snapshot_freq_for_preemption": 100})
    snapshot = tmp_path / "run" / "checkpoints" / "checkpoint_3.pth"
    with pytest.raises(NonFiniteLossError, match=f"not finite at step 4: .*{re.escape(str(snapshot))} \\(step 3\\)"):
        train(cfg, tmp_path / "run")


def test_a_nan_after_a_snapshot_names_the_meta_checkpoint_a_resume_would_read(tmp_path, monkeypatch):
    """Meta at step 2, snapshot 3 (no meta), NaN at 4: a resume reads the meta checkpoint, so it is named."""
    monkeypatch.setattr(loop_module, "_accumulate", poison_gradients_at(3))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(tiny_config(tmp_path), run)  # snapshots every 3, meta every 2
    assert str(err.value).endswith(f"the last good checkpoint is {run / META} (step 2); a resume starts from it")
    assert (run / "checkpoints" / "checkpoint_3.pth").exists()


# ---- what a call leaves behind -------------------------------------------------------------------------------
def test_train_takes_a_run_config_object(tmp_path):
    cfg = RunConfig.from_dict(tiny_config(tmp_path, training={"n_iters": 1, "eval_freq": 0}))
    assert train(cfg, tmp_path / "run")["step"] == 1


def test_train_removes_and_closes_its_log_handler(tmp_path):
    pkg = logging.getLogger("radd_fast")
    before = list(pkg.handlers)
    opened = []
    real = loop_module._setup_logging

    def spy(run_dir, env):
        opened.append(real(run_dir, env))
        return opened[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_module, "_setup_logging", spy)
        train(tiny_config(tmp_path, training={"n_iters": 1, "eval_freq": 0}), tmp_path / "run")
    assert pkg.handlers == before and logging.getLogger().handlers.count(opened[0]) == 0
    assert opened[0].file.fh.closed  # closed: the run folder's log file is not held open


@pytest.mark.parametrize("initialized_before", [False, True])
def test_train_ends_only_the_process_group_it_started(tmp_path, monkeypatch, initialized_before):
    ended = []
    monkeypatch.setattr(loop_module, "cleanup", lambda env: ended.append(env))
    monkeypatch.setattr(loop_module.torch.distributed, "is_initialized", lambda: initialized_before)
    train(tiny_config(tmp_path, training={"n_iters": 1, "eval_freq": 0}), tmp_path / "run")
    assert len(ended) == (0 if initialized_before else 1)


# ---- wiring: what the loop hands its parts -------------------------------------------------------------------
def test_the_periodic_evaluation_scores_the_training_loss_through_static_rows(tmp_path, monkeypatch):
    """Its semantics are tested in tests/evaluation/test_ppl.py; here, that the loop asks for it."""
    made = []
    real = loop_module.make_loss_fn
    monkeypatch.setattr(loop_module, "make_loss_fn", lambda *a, **kw: made.append((a, kw)) or real(*a, **kw))
    cfg = tiny_config(tmp_path, training={"n_iters": 2, "loss_type": "t_DCE", "sampling_eps": 0.02,
                                          "time_sampler": "naive", "compile": False})
    train(cfg, tmp_path / "run")
    (args, kwargs), = made
    assert isinstance(args[0], RADD) and type(args[1]).__name__ == "LogLinearNoise"
    assert args[2:] == ("t_DCE", 0.02)
    assert kwargs == {"static_rows": True, "acceleration": Acceleration(compile=False, cuda_graphs=False),
                      "time_sampler": "naive"}


class RecordingDDP:
    """Stands for DistributedDataParallel: records how the loop wraps the model, then wraps it for real."""

    calls: list = []

    def __new__(cls, module, **kwargs):
        cls.calls.append((module, kwargs))
        return torch.nn.parallel.DistributedDataParallel(module, **kwargs)


def test_two_ranks_wrap_the_step_in_ddp_with_no_device_ids_on_the_cpu(tmp_path, monkeypatch):
    """One real gloo rank stands for a two-rank run (env.world = 2): the wrap is what is under test."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        RecordingDDP.calls = []
        monkeypatch.setattr(loop_module, "DistributedDataParallel", RecordingDDP)
        monkeypatch.setattr(loop_module, "init_distributed", lambda device: DistEnv(rank=0, world=2))
        train(tiny_config(tmp_path, training={"n_iters": 1, "eval_freq": 0, "compile": False}), tmp_path / "run")
        (module, kwargs), = RecordingDDP.calls
        assert isinstance(module.model, RADD) and kwargs == {"device_ids": None}  # the step's loss module
        RecordingDDP.calls = []
        monkeypatch.setattr(loop_module, "init_distributed", lambda device: DistEnv())
        train(tiny_config(tmp_path, training={"n_iters": 1, "eval_freq": 0, "compile": False}), tmp_path / "one")
        assert RecordingDDP.calls == []  # one rank: no DDP
    finally:
        torch.distributed.destroy_process_group()


def test_the_loop_reads_each_split_by_name_and_builds_the_step_from_the_config(tmp_path, monkeypatch):
    splits, steps = [], []
    real_load, real_init = loop_module.load_blocks, TrainStep.__init__
    monkeypatch.setattr(loop_module, "load_blocks", lambda source, split, **kw: splits.append(split) or
                        real_load(source, split, **kw))

    def spy(self, model, noise, loss_type, **kwargs):
        steps.append((loss_type, kwargs))
        real_init(self, model, noise, loss_type, **kwargs)

    monkeypatch.setattr(TrainStep, "__init__", spy)
    train(tiny_config(tmp_path, training={"n_iters": 1, "loss_type": "t_DCE", "sampling_eps": 0.02,
                                          "time_sampler": "naive", "compile": False}), tmp_path / "run")
    assert splits == ["train", "validation"]
    assert steps == [("t_DCE", {"sampling_eps": 0.02, "time_sampler": "naive", "compile": False, "wrap": None,
                                "world_size": 1})]


# ---- more of what the loop hands on --------------------------------------------------------------------------
def test_every_seed_the_loop_draws_comes_from_the_run_seed(tmp_path, monkeypatch):
    """Micro-batches, evaluations and snapshot samples each reseed from (training.seed, step, index, stream)."""
    seeds = []
    real_seed = loop_module.seed_for
    monkeypatch.setattr(loop_module, "seed_for", lambda *key: seeds.append(key) or real_seed(*key))
    monkeypatch.setattr(loop_module, "snapshot_samples", lambda *args: None)
    cfg = tiny_config(tmp_path, training={"n_iters": 3, "seed": 13, "accum": 1, "eval_freq": 2, "snapshot_freq": 3,
                                          "snapshot_sampling": True})
    train(cfg, tmp_path / "run")
    assert seeds == [(13, 0, 0), (13, 1, 0), (13, 2, 0, "eval"), (13, 2, 0), (13, 3, 0, "sample")]


def test_the_progress_bar_gets_no_mfu_without_a_peak(tmp_path, monkeypatch):
    shown = []
    real = loop_module.Metrics.progress
    monkeypatch.setattr(loop_module.Metrics, "progress", lambda self, n, **post: shown.append(post) or real(self, n, **post))
    train(tiny_config(tmp_path, training={"n_iters": 2, "eval_freq": 0}), tmp_path / "run")
    assert [sorted(p) for p in shown if p] == [["loss", "tok_s"], ["loss", "tok_s"]]


def test_the_peak_is_asked_for_the_runs_device_and_dtype(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(loop_module, "peak_flops", lambda device, dtype: asked.append((device, dtype)))
    train(tiny_config(tmp_path, training={"n_iters": 1, "eval_freq": 0, "dtype": "bf16"}), tmp_path / "run")
    assert asked == [(torch.device("cpu"), torch.bfloat16)]


class RecordingMetrics:
    """Stands for training.metrics.Metrics (no file, no bar, no tensorboard or wandb): records its arguments."""

    made: list = []

    def __init__(self, *args):
        RecordingMetrics.made.append(args)

    def log(self, step, **values):
        pass

    def progress(self, n, **postfix):
        pass

    def close(self):
        pass


def test_metrics_get_the_runs_settings_and_its_starting_step(tmp_path, monkeypatch):
    RecordingMetrics.made = []
    monkeypatch.setattr(loop_module, "Metrics", RecordingMetrics)
    cfg = tiny_config(tmp_path, training={"n_iters": 2, "eval_freq": 0, "progress": True})
    cfg["logging"] = {"wandb": True, "wandb_project": "proj", "tensorboard": True}
    run = tmp_path / "run"
    train(cfg, run)
    train(dict(cfg, training=dict(cfg["training"], n_iters=3)), run)  # resumed at step 2
    raw = RunConfig.from_dict(cfg).raw
    first, resumed = RecordingMetrics.made
    assert first == (run, True, 2, 0, True, True, "proj", raw)
    assert resumed[:4] == (run, True, 3, 2)
    RecordingMetrics.made = []
    train(tiny_config(tmp_path, training={"n_iters": 1, "eval_freq": 0}), tmp_path / "b")  # wandb off by default
    assert RecordingMetrics.made[0][6] is None  # no wandb: no project


def test_the_log_line_names_the_policy(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "radd_fast"):
        train(tiny_config(tmp_path, training={"n_iters": 1, "eval_freq": 0, "compile": False}), tmp_path / "run")
    assert "training step: eager" in caplog.messages


def test_reads_get_the_runs_environment(tmp_path, monkeypatch):
    envs = []
    real = TrainStep.read
    monkeypatch.setattr(TrainStep, "read", lambda self, env=None: envs.append(env) or real(self, env))
    monkeypatch.setattr(loop_module, "init_distributed", lambda device: DistEnv(rank=0, world=1))
    train(tiny_config(tmp_path, training={"n_iters": 2, "eval_freq": 0}), tmp_path / "run")
    assert envs == [DistEnv(rank=0, world=1)] * 2


def test_throughput_counts_the_training_time_of_the_whole_window_and_no_evaluation(tmp_path, monkeypatch):
    # one second per micro-batch, 100 per evaluation: a window's seconds are its training steps,
    # and evaluation time, which the throughput leaves out, is large
    clock = FakeClock(per_call=0.0)
    real_micro, real_eval = TrainStep.micro_batch, loop_module._evaluate

    def micro_batch(self, *args, **kwargs):
        clock.now += 1.0
        return real_micro(self, *args, **kwargs)

    def evaluate(*args):
        clock.now += 100.0
        return real_eval(*args)

    monkeypatch.setattr(loop_module, "time", clock)
    monkeypatch.setattr(TrainStep, "micro_batch", micro_batch)
    monkeypatch.setattr(loop_module, "_evaluate", evaluate)
    run = tmp_path / "run"
    train(tiny_config(tmp_path, training={"n_iters": 6, "accum": 1, "log_freq": 3, "eval_freq": 2,
                                          "snapshot_freq": 6, "snapshot_freq_for_preemption": 6}), run)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # windows of 3 steps (3 s of training each, an evaluation of 100 s inside): 4 x 16 tokens a second
    assert [x["tokens_per_s"] for x in logged if "loss" in x] == [64.0, 64.0]
