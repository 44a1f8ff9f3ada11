"""Loading and saving: hub folders / repo ids, older ``.bin`` uploads, training-run folders.

Layouts (spec 6):
- hub: ``config.json`` (the run config, nested) + ``model.safetensors`` (or ``pytorch_model.bin``);
- run: ``.hydra/config.yaml`` + ``checkpoints-meta/checkpoint.pth`` holding
  ``{model, ema, optimizer, step}``; inference serves the EMA weights.
Pickled files are read with ``torch.load(weights_only=True)``: a checkpoint can
never execute code. Every mismatch raises ``CheckpointError`` naming it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import RADDConfig, parse_dtype
from .errors import UserError
from .model import RADD
from .noise import Noise, get_noise

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
RUN_CONFIG = Path(".hydra") / "config.yaml"
RUN_CHECKPOINT = Path("checkpoints-meta") / "checkpoint.pth"
# Prefixes that wrappers add to state-dict keys (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(UserError):
    """A checkpoint is missing, malformed, or does not match the model."""


def load_model(path_or_repo_id: str | os.PathLike, device="cpu", backend: str | None = None,
               dtype=None) -> tuple[RADD, Noise]:
    """Drop-in for the published ``load_model``: returns ``(model, noise)`` in eval mode.

    ``path_or_repo_id``: a hub repo id (e.g. ``JingyangOu/radd-t-dce``), a local hub-layout
    folder, or a training-run folder (EMA weights are served). ``backend``: 'reference' or
    'fast' (default: the config's). ``dtype``: compute dtype override ('bf16', 'fp16', 'fp32').

    Example::

        model, noise = radd_fast.load_model("JingyangOu/radd-t-dce", device="cuda", backend="fast")
    """
    folder = _resolve_folder(path_or_repo_id)
    if (folder / RUN_CONFIG).exists() or (folder / RUN_CHECKPOINT).exists():
        config, state = _read_run_folder(folder)
    else:
        config, state = _read_hub_folder(folder)
    model = RADD(config, backend=backend, dtype=parse_dtype(dtype))
    load_state_dict_checked(model, state)
    model = model.to(device).eval()
    return model, get_noise(config).to(device)


def _resolve_folder(path_or_repo_id) -> Path:
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights")
    text = str(path_or_repo_id)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_local:
        raise CheckpointError(f"no such checkpoint folder: {path}")
    return _download_from_hub(text)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise CheckpointError("loading from the hub needs huggingface_hub (pip install huggingface_hub)") from e
    patterns = [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the hub library raises many types; name the repo and re-raise as ours
        raise CheckpointError(f"could not fetch {repo_id!r} from the Hugging Face hub: {e}") from e


def _read_hub_folder(folder: Path) -> tuple[RADDConfig, dict]:
    config_file = folder / CONFIG_NAME
    if not config_file.exists():
        raise CheckpointError(f"{folder} holds neither {CONFIG_NAME} (hub layout) nor {RUN_CONFIG} (run layout)")
    config = RADDConfig.from_dict(json.loads(config_file.read_text()))
    if (folder / SAFETENSORS_NAME).exists():
        from safetensors.torch import load_file

        return config, load_file(str(folder / SAFETENSORS_NAME))
    if (folder / BIN_NAME).exists():
        return config, _torch_load(folder / BIN_NAME)
    raise CheckpointError(f"{folder} has {CONFIG_NAME} but no weights ({SAFETENSORS_NAME} or {BIN_NAME})")


def _read_run_folder(folder: Path) -> tuple[RADDConfig, dict]:
    for needed in (RUN_CONFIG, RUN_CHECKPOINT):
        if not (folder / needed).exists():
            raise CheckpointError(f"run folder {folder} is missing {needed}")
    import yaml

    # Plain YAML: the run config may hold Hydra interpolations that only Hydra resolves.
    config = RADDConfig.from_dict(yaml.safe_load((folder / RUN_CONFIG).read_text()))
    ckpt = _torch_load(folder / RUN_CHECKPOINT)
    for key in ("model", "ema"):
        if key not in ckpt:
            raise CheckpointError(f"{folder / RUN_CHECKPOINT} has no {key!r} entry (keys: {sorted(ckpt)})")
    return config, ema_state_dict(config, ckpt["model"], ckpt["ema"])


def ema_state_dict(config: RADDConfig, model_state: dict, ema_state: dict) -> dict:
    """The model state with each trainable parameter replaced by its EMA shadow (parameters() order)."""
    shadow = ema_state.get("shadow_params")
    if shadow is None:
        raise CheckpointError(f"EMA state has no 'shadow_params' (keys: {sorted(ema_state)})")
    names = [name for name, _ in RADD(config).named_parameters()]
    if len(shadow) != len(names):
        raise CheckpointError(f"EMA holds {len(shadow)} tensors but the model has {len(names)} parameters")
    state = dict(_strip_prefixes(model_state))
    state.update(zip(names, shadow))
    return state


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; none may execute code
        raise CheckpointError(f"could not read {path} as a weights-only torch checkpoint: {e}") from e


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_state_dict_checked(model: RADD, state: dict) -> None:
    """``strict=True`` loading with errors that name every key and shape at fault."""
    state = _strip_prefixes(state)
    expected = model.state_dict()
    emb = state.get("vocab_embed.embedding")
    if emb is not None and emb.shape[0] != model.vocab_size:
        raise CheckpointError(f"vocab mismatch: checkpoint embedding has {emb.shape[0]} rows, the config says "
                              f"tokens + 1 = {model.vocab_size}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"state dict does not match the RADD layout: missing keys {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    bad = [f"{k}: expected {tuple(v.shape)}, found {tuple(state[k].shape)}"
           for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError("shape mismatch: " + "; ".join(bad))
    model.load_state_dict(state, strict=True)


def save_pretrained(model: RADD, folder) -> None:
    """Write the hub layout (config.json + model.safetensors) that the published class loads too."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2))
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})


def push_to_hub(model: RADD, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload the hub layout to ``repo_id``; returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        return str(api.upload_folder(repo_id=repo_id, folder_path=tmp))
