"""Training checkpoints: what they hold, written atomically, read back with weights_only=True.

Layout (published run format plus resume state; every value is a tensor, a number,
a string or a list/dict of those, so ``torch.load(weights_only=True)`` reads it
and ``radd_fast.load_model(<run>)`` serves its EMA weights)::

    {"model": state_dict, "ema": {decay, num_updates, shadow_params}, "optimizer": state_dict,
     "step": int, "scaler": state_dict, "data": {"train": {epoch, batch}, "valid": {...}},
     "rng": {"cpu": uint8 [world, n], "cuda": uint8 [world, m] (CUDA runs only)}, "world": int}

A save goes to a temporary file in the same folder, is fsynced, then renamed over
the target (and the folder fsynced): a crash mid-save leaves the previous
checkpoint intact, never a truncated one.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .distributed import DistEnv, all_gather_rows

log = logging.getLogger(__name__)

META = Path("checkpoints-meta") / "checkpoint.pth"  # for resuming (published name)
SNAPSHOTS = Path("checkpoints")  # checkpoint_<step>.pth


def atomic_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def capture_rng(env: DistEnv) -> dict:
    """Every rank's generator states, gathered (collective: call on all ranks)."""
    out = {"cpu": all_gather_rows(torch.get_rng_state(), env)}
    if env.device.type == "cuda":
        out["cuda"] = all_gather_rows(torch.cuda.get_rng_state(env.device), env)
    return out


def restore_rng(rng: dict, env: DistEnv) -> None:
    if rng["cpu"].shape[0] != env.world:
        log.warning("checkpoint holds RNG states of %d ranks, this run has %d: not restored",
                    rng["cpu"].shape[0], env.world)
        return
    torch.set_rng_state(rng["cpu"][env.rank])
    if env.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"][env.rank], env.device)


def build_checkpoint(model, ema, optimizer, scaler, step: int, data: dict, rng: dict, world: int) -> dict:
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "scaler": scaler.state_dict(),
        "data": data,
        "rng": rng,
        "world": int(world),
    }


def load_checkpoint(path: str | os.PathLike, device) -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def restore(ckpt: dict, model, ema, optimizer, scaler, env: DistEnv) -> int:
    """Load a checkpoint into the training objects; returns its step."""
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        restore_rng({k: v.cpu() for k, v in ckpt["rng"].items()}, env)
    return int(ckpt["step"])
