"""A tiny offline training config (bytes tokenizer, a generated text file) shared by the training tests."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

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
