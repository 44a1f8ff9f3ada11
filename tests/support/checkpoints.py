"""A published checkpoint (2 blocks, length 24) written in the hub layout, and the check that a
loaded model computes the published forward: the loading and saving tests' common ground."""
from __future__ import annotations

import json

import torch
import yaml
from safetensors.torch import save_file

from radd_fast.training.state import atomic_save
from tests.support.compare import assert_close
from tests.support.published_model import published_config, published_log_probs, published_logits, published_state_dict

TOKENS, D, H, BLOCKS, LENGTH = 29, 32, 2, 2, 24


def published_checkpoint():
    """(config dict, state dict) of the published layout, weights drawn with seed 7."""
    return published_config(TOKENS, D, H, BLOCKS, LENGTH), published_state_dict(TOKENS + 1, D, H, BLOCKS, seed=7)


def write_hub(folder, cfg, state, fmt="safetensors"):
    """``folder`` in the hub layout: config.json and model.safetensors (``fmt="bin"``: pytorch_model.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def check_parity(model, state, lengths=(1, 5, LENGTH)):
    """The model's logits and log-probs equal the independent published forward of ``state``."""
    for T in lengths:
        x = torch.randint(0, TOKENS + 1, (2, T))
        with torch.no_grad():
            assert_close(model.logits(x), published_logits(state, H, x), atol=1e-5, rtol=1e-5, name=f"logits T={T}")
            assert_close(model(x), published_log_probs(state, H, x), atol=1e-5, rtol=1e-5, name=f"forward T={T}")


def flip_bytes(path, count=64):
    """Invert ``count`` bytes in the middle of ``path`` (inside the tensor data of a checkpoint of any
    size worth the name): the file still loads, with different weights, unless its checksum is checked."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def write_run_folder(folder, model, snapshot_steps=(2, 4), meta_step=6) -> dict:
    """A run folder as training leaves it, written by training's own ``atomic_save`` (``.sha256``
    sidecars included): ``model``'s config, snapshots at ``snapshot_steps`` and the meta checkpoint
    at ``meta_step``, each with EMA weights of its own (the parameters times 1 + step / 10).
    Returns ``{step: shadow params}``."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(model.config.to_dict()))
    shadows = {}
    for step in (*snapshot_steps, meta_step):
        shadows[step] = [p.detach() * (1 + step / 10) for p in model.parameters()]
        path = folder / ("checkpoints-meta/checkpoint.pth" if step == meta_step else f"checkpoints/checkpoint_{step}.pth")
        atomic_save({"model": model.state_dict(), "ema": {"shadow_params": shadows[step]}, "optimizer": {},
                     "step": step}, path)
    return shadows
