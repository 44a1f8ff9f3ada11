"""Training loop, run folder, checkpoints, resume, Hydra entry point, clear errors (CPU, offline)."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import radd_fast
from radd_fast.config import ConfigError
from radd_fast.data import DataError
from radd_fast.training import NonFiniteLossError, train
from radd_fast.training import loop as loop_module
from radd_fast.training.config import OptimConfig
from radd_fast.training.optim import lr_at
from tests.train_helpers import assert_same_state, load_meta, poison_gradients_at, tiny_config

ROOT = Path(__file__).resolve().parents[1]


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


def test_snapshot_sampling_writes_samples_or_skips(tmp_path):
    cfg = tiny_config(tmp_path, training={"n_iters": 3, "snapshot_sampling": True, "eval_freq": 0})
    train(cfg, tmp_path / "run")
    try:
        from radd_fast.sampling import generate  # noqa: F401
    except ImportError:
        assert not (tmp_path / "run" / "samples" / "iter_3").exists()
        return
    text = (tmp_path / "run" / "samples" / "iter_3" / "sample_0.txt").read_text(encoding="utf-8")
    assert text.count("=" * 92) == 2


def test_warmup_schedule():
    cfg = OptimConfig(lr=1.0, warmup=4)
    assert [lr_at(s, cfg) for s in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_at(1, OptimConfig(lr=0.5, warmup=0)) == 0.5


# ---- clear errors ----------------------------------------------------------------------------------
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


def test_length_above_model_length_is_rejected():
    from radd_fast import LogLinearNoise
    from radd_fast.losses import get_loss_fn

    model = radd_fast.RADD(radd_fast.RADDConfig(tokens=10, model=radd_fast.ModelConfig(
        hidden_size=16, n_heads=2, n_blocks=1, length=8)))
    with pytest.raises(ValueError, match="exceeds the model's length 8"):
        get_loss_fn(LogLinearNoise(), 11, True)(model, torch.zeros(2, 9, dtype=torch.long))


# ---- the Hydra entry point ---------------------------------------------------------------------------
def test_train_py_runs_and_resumes(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello radd " * 400)
    common = ["model=tiny", "tokenizer=bytes", "tokens=256", f"data.train={text}", f"data.valid={text}",
              f"data.cache_dir={tmp_path / 'cache'}", "model.length=32", "training.batch_size=2", "training.accum=1",
              "training.log_freq=1", "training.eval_freq=2", "eval.batch_size=2", "training.snapshot_sampling=false",
              "training.progress=false", "training.snapshot_freq=2"]
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for extra in (["training.n_iters=2", f"hydra.run.dir={run}"], [f"load_dir={run}", "training.n_iters=3"]):
        out = subprocess.run([sys.executable, "train.py", *common, *extra], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert load_meta(run)["step"] == 3
    assert (run / ".hydra" / "config.yaml").exists() and (run / "checkpoints" / "checkpoint_2.pth").exists()
    assert list((run / "resumes").iterdir())  # the resume call's own .hydra, not over the run's
    radd_fast.load_model(run)
