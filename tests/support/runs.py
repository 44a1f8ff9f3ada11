"""A tiny offline training config (bytes tokenizer, a generated text file) shared by the training tests."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from radd_fast.training import loop as loop_module

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7} times.\n" for i in range(60))


def write_text(folder: Path) -> Path:
    path = Path(folder) / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tiny_config(folder: Path, **sections) -> dict:
    """Config dict of configs/config.yaml's shape; ``sections`` update sections (e.g. training={...})."""
    text = str(write_text(folder))
    cfg = {
        "tokens": 256,
        "tokenizer": "bytes",
        "model": {"name": "test", "type": "ddit_wot", "hidden_size": 32, "n_heads": 2, "n_blocks": 1, "length": 16,
                  "dropout": 0.1, "dtype": "float32"},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "training": {"batch_size": 4, "accum": 2, "n_iters": 6, "snapshot_freq": 3, "log_freq": 1, "eval_freq": 2,
                     "snapshot_freq_for_preemption": 2, "snapshot_sampling": False, "ema": 0.9, "progress": False,
                     "loss_type": "lambda_DCE", "seed": 3},
        "data": {"train": text, "valid": text, "cache_dir": str(Path(folder) / "cache")},
        "optim": {"lr": 3e-3, "warmup": 2},
        "eval": {"batch_size": 4, "perplexity": False},
        "sampling": {"steps": 8, "num_samples": 2},
    }
    cfg = copy.deepcopy(cfg)
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg[name].update(values)
        else:
            cfg[name] = values
    return cfg


def load_meta(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoints-meta" / "checkpoint.pth", weights_only=True)


def assert_same_state(a: dict, b: dict, exact: bool = True, atol: float = 0.0) -> None:
    """Model weights, EMA shadows and optimizer moments of two checkpoints agree."""
    for k in a["model"]:
        if exact:
            assert torch.equal(a["model"][k], b["model"][k]), f"model {k} differs"
        else:
            torch.testing.assert_close(a["model"][k], b["model"][k], atol=atol, rtol=1e-5, msg=f"model {k}")
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y) if exact else torch.allclose(x, y, atol=atol, rtol=1e-5)
    for i, s in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            y = b["optimizer"]["state"][i][key]
            assert torch.equal(s[key], y) if exact else torch.allclose(s[key], y, atol=atol, rtol=1e-4)


class Killed(BaseException):
    """Stands for a SIGKILL inside the loop: not an Exception, so nothing on the way catches it."""


def metric_records(run_dir: Path, keys=("loss", "eval_loss", "grad_norm", "lr", "gen_ppl")) -> list[tuple]:
    """metrics.jsonl as (step, key, value) for the keys that do not depend on wall-clock time."""
    import json

    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out += [(record["step"], k, record[k]) for k in keys if k in record]
    return out


def run_files(run_dir: Path) -> dict[str, bytes | None]:
    """What a run folder holds besides logs and configs: every file's name, and the samples' content.

    (Checkpoint bytes are not compared: pickle shares equal strings only when they are the same
    object, so a resumed run's equal state can pickle to other bytes. ``assert_same_checkpoint``.)
    """
    run_dir = Path(run_dir)
    out = {}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir).as_posix()
        if path.is_dir() or rel.startswith((".hydra", "resumes", "cache")) or rel in ("logs", "metrics.jsonl"):
            continue
        out[rel] = path.read_bytes() if rel.startswith("samples/") else None
    return out


def assert_same_checkpoint(a, b, where: str = "") -> None:
    """Two loaded checkpoints are equal in every entry: same keys, same values, tensors bit for bit."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_same_checkpoint(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_checkpoint(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_checkpoints(run_a: Path, run_b: Path) -> None:
    """Every checkpoint of two run folders (meta and snapshots) holds the same state."""
    names = sorted(p.relative_to(run_a).as_posix() for p in Path(run_a).glob("checkpoints*/checkpoint*.pth"))
    assert names == sorted(p.relative_to(run_b).as_posix() for p in Path(run_b).glob("checkpoints*/checkpoint*.pth"))
    for name in names:
        assert_same_checkpoint(torch.load(Path(run_a) / name, weights_only=True),
                               torch.load(Path(run_b) / name, weights_only=True), name)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, cfg: dict, run_dir: str, out: str) -> None:
    """One rank of a CPU (gloo) run on 127.0.0.1; rank 0 writes the history as JSON."""
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from radd_fast.training import train

    history = train(cfg, run_dir, device="cpu")
    if rank == 0:
        Path(out).write_text(json.dumps(history))


def poison_gradients_at(step_index: int):
    """A loop ``_accumulate`` whose gradients are NaN at the step with this (0-based) index
    (``monkeypatch.setattr(loop_module, "_accumulate", poison_gradients_at(3))``)."""
    real = loop_module._accumulate

    def poisoned(stepper, micro_batches, scaler, step, seed, env):
        real(stepper, micro_batches, scaler, step, seed, env)
        if step == step_index:
            next(stepper.model.parameters()).grad.fill_(float("nan"))
    return poisoned
