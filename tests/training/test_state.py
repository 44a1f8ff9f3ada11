"""Run state on disk (radd_fast/training/state.py): a run killed anywhere, or fed damaged files,
loses nothing and leaves no debris (CPU, offline, in process).

Checkpoints are written atomically with a SHA-256 sidecar, verified on load, found for a resume
(falling back past damaged files, with the reason) and refused when the run changed. A kill is
simulated by raising ``Killed`` (a BaseException) at a chosen point of the loop; the real SIGKILL of
a ``train.py`` process is in tests/cli/test_train.py. Each resumed run is compared with the
uninterrupted one: losses, metrics.jsonl, the files of the run folder, and the weights / EMA /
optimizer state bit for bit.
"""
import errno
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import radd_fast
from radd_fast import RADD, ExponentialMovingAverage
from radd_fast.checkpoint import CheckpointError
from radd_fast.training import loop as loop_module
from radd_fast.training import state as state_module
from radd_fast.training import train
from radd_fast.training.config import OptimConfig
from radd_fast.training.optim import build_optimizer
from radd_fast.training.state import atomic_save, find_resume_checkpoint, remove_stale_temporaries, sidecar_path
from tests.support.models import tiny_config as tiny_radd_config
from tests.support.runs import (
    Killed,
    assert_same_checkpoints,
    assert_same_state,
    load_meta,
    metric_records,
    run_files,
    tiny_config,
)

META = os.path.join("checkpoints-meta", "checkpoint.pth")


def fake_samples(model, ema, noise, tokenizer, cfg, step, run_dir, env, metrics):
    """Stands for snapshot sampling: one file per snapshot, and a metrics record, like the real one."""
    folder = run_dir / "samples" / f"iter_{step}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sample_0.txt").write_text(f"samples of step {step}\n")
    metrics.log(step, gen_ppl=float(step))


def sampling_config(folder):
    return tiny_config(folder, training={"snapshot_sampling": True})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 uninterrupted steps with (fake) snapshot samples at 3 and 6: the reference."""
    folder = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_module, "snapshot_samples", fake_samples)
        history = train(sampling_config(folder), folder / "run")
    return folder / "run", history


@pytest.fixture(scope="module")
def five_steps(tmp_path_factory):
    """A run stopped after step 5: meta at 5, snapshots 3 and 5 (copied by the tests that damage it)."""
    folder = tmp_path_factory.mktemp("five")
    cfg = tiny_config(folder)
    train(dict(cfg, training=dict(cfg["training"], n_iters=5)), folder / "run")
    return folder


def assert_same_as_straight(run, straight_run):
    assert metric_records(run) == metric_records(straight_run)
    assert run_files(run) == run_files(straight_run)
    assert_same_checkpoints(run, straight_run)


# ---- write ordering: a kill anywhere in a snapshot step ------------------------------------------------------
@pytest.mark.parametrize("where", ["after_snapshot_checkpoint", "after_samples", "inside_meta_write"])
def test_killed_in_a_snapshot_step_resumes_to_the_same_folder(straight, tmp_path, monkeypatch, where):
    """Step 6 writes checkpoint_6, samples/iter_6, then the meta checkpoint (the resume point) last:
    killed between any two, the resumed run redoes step 6 and its folder equals the straight run's."""
    run = tmp_path / "run"
    real_save, real_samples = state_module.atomic_save, fake_samples

    def save(obj, path):
        if where == "inside_meta_write" and obj["step"] == 6 and path.name == "checkpoint.pth":
            path.parent.joinpath(f".{path.name}.tmp{os.getpid()}").write_bytes(b"half a checkpoint")
            raise Killed
        real_save(obj, path)
        if where == "after_snapshot_checkpoint" and obj["step"] == 6:
            raise Killed

    def samples(*args):
        real_samples(*args)
        if where == "after_samples" and args[5] == 6:
            raise Killed

    monkeypatch.setattr(loop_module, "atomic_save", save)
    monkeypatch.setattr(loop_module, "snapshot_samples", samples)
    with pytest.raises(Killed):
        train(sampling_config(tmp_path), run)
    assert load_meta(run)["step"] == 4
    monkeypatch.setattr(loop_module, "atomic_save", real_save)
    monkeypatch.setattr(loop_module, "snapshot_samples", fake_samples)
    rest = train(sampling_config(tmp_path), run)
    assert rest["losses"] == straight[1]["losses"][4:]
    assert_same_as_straight(run, straight[0])  # no temporary left, no duplicate metrics, same samples


# ---- metrics.jsonl after a kill ------------------------------------------------------------------------------
def test_metrics_after_kill_and_resume_read_as_one_run(straight, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = loop_module._accumulate

    def dies_in_step_6(step_module, micro_batches, scaler, step, seed, env):
        if step == 5:
            raise Killed
        return real(step_module, micro_batches, scaler, step, seed, env)

    monkeypatch.setattr(loop_module, "_accumulate", dies_in_step_6)
    monkeypatch.setattr(loop_module, "snapshot_samples", fake_samples)
    with pytest.raises(Killed):
        train(sampling_config(tmp_path), run)
    assert max(step for step, _, _ in metric_records(run)) == 5  # step 5 logged, resume point at 4
    monkeypatch.setattr(loop_module, "_accumulate", real)
    train(sampling_config(tmp_path), run)
    records = metric_records(run)
    assert [s for s, k, _ in records if k == "loss"] == [1, 2, 3, 4, 5, 6]
    assert_same_as_straight(run, straight[0])


# ---- stale temporaries ---------------------------------------------------------------------------------------
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    meta_dir, snap_dir = tmp_path / "checkpoints-meta", tmp_path / "checkpoints"
    meta_dir.mkdir()
    snap_dir.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = [meta_dir / f".checkpoint.pth.tmp{dead_pid()}", snap_dir / f".checkpoint_3.pth.tmp{dead_pid()}",
                meta_dir / f".checkpoint.pth.sha256.tmp{dead_pid()}", meta_dir / f".checkpoint.pth.tmp{os.getpid()}"]
        kept = [meta_dir / f".checkpoint.pth.tmp{alive.pid}", meta_dir / "checkpoint.pth", snap_dir / "notes.tmp1"]
        for path in dead + kept:
            path.write_bytes(b"x" * 10)
        assert sorted(remove_stale_temporaries(tmp_path)) == sorted(dead)
        assert all(p.exists() for p in kept) and not any(p.exists() for p in dead)
    finally:
        alive.kill()
        alive.wait()


def test_a_training_run_starts_by_removing_stale_temporaries(five_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(five_steps / "run", run)
    stale = run / "checkpoints-meta" / f".checkpoint.pth.tmp{dead_pid()}"
    stale.write_bytes(b"\0" * 1000)
    cfg = tiny_config(tmp_path)
    train(dict(cfg, training=dict(cfg["training"], n_iters=5)), run)  # nothing to do but start
    assert not stale.exists()


# ---- corrupt checkpoints -------------------------------------------------------------------------------------
def corrupt(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "zero_bytes": b"",
                      "random_bytes": torch.randint(0, 256, (len(data),), dtype=torch.uint8).numpy().tobytes(),
                      "one_flipped_byte": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]}[how])


@pytest.mark.parametrize("how", ["truncated", "zero_bytes", "random_bytes", "one_flipped_byte"])
def test_corrupt_meta_falls_back_to_the_newest_intact_snapshot(five_steps, straight, tmp_path, how, caplog):
    run = tmp_path / "run"
    shutil.copytree(five_steps / "run", run)
    corrupt(run / META, how)
    with caplog.at_level(logging.WARNING, logger="radd_fast"):
        history = train(tiny_config(tmp_path), run)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(run / META) in warning and f"resuming from {run / 'checkpoints' / 'checkpoint_5.pth'} (step 5)" in warning
    assert history["losses"] == straight[1]["losses"][5:]
    assert_same_state(load_meta(run), load_meta(straight[0]))  # the new meta checkpoint is whole again


def test_fallback_skips_every_damaged_snapshot_and_says_why(five_steps, straight, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(five_steps / "run", run)
    corrupt(run / META, "zero_bytes")
    corrupt(run / "checkpoints" / "checkpoint_5.pth", "one_flipped_byte")
    with caplog.at_level(logging.WARNING, logger="radd_fast"):
        history = train(tiny_config(tmp_path), run)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "the file is empty (zero bytes)" in warning and "SHA-256 does not match checkpoint_5.pth.sha256" in warning
    assert "checkpoint_3.pth (step 3)" in warning
    assert history["losses"] == straight[1]["losses"][3:]
    assert_same_state(load_meta(run), load_meta(straight[0]))


def test_no_usable_checkpoint_is_a_clear_error(five_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(five_steps / "run", run)
    for path in [run / META, *(run / "checkpoints").glob("checkpoint_*.pth")]:
        corrupt(path, "truncated")
    with pytest.raises(CheckpointError, match=f"no usable checkpoint in {re.escape(str(run))}: ") as info:
        train(tiny_config(tmp_path), run)
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in ("checkpoint.pth", "checkpoint_5.pth",
                                                                      "checkpoint_3.pth"))


def test_a_checkpoint_without_sidecar_is_verified_by_loading(five_steps, tmp_path):
    """Published runs have no sidecar, and a kill between the data rename and the sidecar leaves none."""
    run = tmp_path / "run"
    shutil.copytree(five_steps / "run", run)
    sidecar_path(run / META).unlink()
    ckpt, path = find_resume_checkpoint(run, "cpu")
    assert path == run / META and ckpt["step"] == 5
    corrupt(run / META, "truncated")
    assert find_resume_checkpoint(run, "cpu")[1].name == "checkpoint_5.pth"


def test_a_checkpoint_with_nonfinite_weights_is_not_resumed_from(five_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(five_steps / "run", run)
    ckpt = load_meta(run)
    next(iter(ckpt["model"].values())).view(-1)[0] = float("nan")
    atomic_save(ckpt, run / META)  # a valid sidecar: only the values are wrong
    with pytest.raises(CheckpointError, match="not finite"):
        state_module.load_checkpoint(run / META, "cpu")
    assert find_resume_checkpoint(run, "cpu")[1].name == "checkpoint_5.pth"


def test_the_published_loader_still_reads_the_run(five_steps):
    model, _ = radd_fast.load_model(five_steps / "run")
    assert torch.equal(next(model.parameters()), load_meta(five_steps / "run")["ema"]["shadow_params"][0])


# ---- what a resume refuses -----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, expected", [
    ({"training": {"batch_size": 8}}, "training.batch_size=4 -> 8"),
    ({"model": {"hidden_size": 64}}, "model.hidden_size=32 -> 64"),
    ({"model": {"length": 32}}, "model.length=16 -> 32"),
])
def test_resume_with_changed_model_or_batch_size_is_refused(five_steps, tmp_path, change, expected):
    run = tmp_path / "run"
    shutil.copytree(five_steps / "run", run)
    cfg = tiny_config(tmp_path)
    for section, values in change.items():
        cfg[section] = dict(cfg[section], **values)
    with pytest.raises(CheckpointError, match=f"cannot resume from {re.escape(str(run / META))}: the run changed "
                                              f"{re.escape(expected)}"):
        train(cfg, run)


def test_an_older_checkpoint_without_settings_still_names_the_shape_mismatch(five_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(five_steps / "run", run)
    ckpt = load_meta(run)
    del ckpt["run"]
    atomic_save(ckpt, run / META)
    cfg = tiny_config(tmp_path)
    cfg["model"] = dict(cfg["model"], hidden_size=64)
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*expected \(257, 64\), found \(257, 32\)"):
        train(cfg, run)


def test_a_published_format_checkpoint_resumes_from_the_first_batch(five_steps, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(five_steps / "run", run)
    ckpt = load_meta(run)
    atomic_save({k: ckpt[k] for k in ("model", "ema", "optimizer", "step")}, run / META)
    with caplog.at_level(logging.WARNING, logger="radd_fast"):
        assert train(tiny_config(tmp_path), run)["step"] == 6
    assert any("holds no data position (published format)" in m for m in caplog.messages)


def test_a_cpu_run_trains_with_fused_adamw(five_steps):
    """The update path of a GPU run (fused Adam(W), its device gate): recorded in the checkpoint."""
    groups = load_meta(five_steps / "run")["optimizer"]["param_groups"]
    assert [g["fused"] for g in groups] == [True] * len(groups)


def test_a_resume_keeps_this_runs_fused_update_whatever_the_checkpoint_used(tmp_path):
    """A checkpoint of an unfused run (CPU runs before fused AdamW was used there) restored into the
    fused optimizer leaves it fused: the saved groups' kernel flags would otherwise switch the step to
    the for-each kernel, which ignores the device gate (found_inf) that TrainStep.update sets."""
    model = RADD(tiny_radd_config(tokens=8, length=4))
    params = list(model.parameters())
    old = torch.optim.AdamW(params, lr=1e-3, fused=False)
    for p in params:
        p.grad = torch.ones_like(p)
    old.step()
    ema = ExponentialMovingAverage(params, 0.9)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": old.state_dict(), "step": 1}
    new = build_optimizer(params, OptimConfig(), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert state_module.restore(ckpt, tmp_path / "checkpoint.pth", model, ema, new, scaler) == 1
    assert [(g["fused"], g["foreach"]) for g in new.param_groups] == [(True, None)]
    assert torch.equal(new.state[params[0]]["exp_avg"], old.state[params[0]]["exp_avg"])  # the moments restored


# ---- disk full -----------------------------------------------------------------------------------------------
def enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDisk:
    """Installs a disk that fills up: writes through state._HashingWriter fail once ``room`` bytes went."""

    def __init__(self, monkeypatch, room: int):
        self.room, self.full = room, False
        real_write = state_module._HashingWriter.write

        def write(writer, data):
            if self.full:
                self.room -= len(data)
                if self.room < 0:
                    raise enospc()
            return real_write(writer, data)

        monkeypatch.setattr(state_module._HashingWriter, "write", write)


@pytest.mark.parametrize("where", ["while_torch_writes", "at_fsync"])
def test_disk_full_says_so_first_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    """torch.save turns the writer's ENOSPC into 'RuntimeError: [enforce fail at inline_container.cc...]'
    (the OSError only in its context); a filesystem with delayed allocation reports it at fsync."""
    path = tmp_path / "checkpoint.pth"
    atomic_save({"step": 1, "weights": torch.zeros(100)}, path)
    before = path.read_bytes(), sidecar_path(path).read_bytes()
    if where == "while_torch_writes":
        FullDisk(monkeypatch, room=500).full = True
    else:
        def fsync(fd):
            raise enospc()

        monkeypatch.setattr(state_module.os, "fsync", fsync)
    with pytest.raises(CheckpointError) as info:
        atomic_save({"step": 2, "weights": torch.ones(10_000)}, path)
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith(f"no space left on device while writing {path}: the checkpoint already there")
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "checkpoint.pth.sha256"]


def test_disk_full_during_training_stops_and_resumes_from_the_intact_checkpoint(straight, tmp_path, monkeypatch):
    run = tmp_path / "run"
    disk = FullDisk(monkeypatch, room=1000)
    real_save = state_module.atomic_save

    def save(obj, path):
        disk.full = obj["step"] == 4  # the disk fills up during the step-4 meta checkpoint
        real_save(obj, path)

    monkeypatch.setattr(loop_module, "atomic_save", save)
    monkeypatch.setattr(loop_module, "snapshot_samples", fake_samples)
    with pytest.raises(CheckpointError, match="^no space left on device while writing"):
        train(sampling_config(tmp_path), run)
    assert load_meta(run)["step"] == 2
    disk.full = False
    monkeypatch.setattr(loop_module, "atomic_save", real_save)
    train(sampling_config(tmp_path), run)
    assert_same_as_straight(run, straight[0])
