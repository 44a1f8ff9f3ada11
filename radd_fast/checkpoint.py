"""Loading: hub folders / repo ids, older ``.bin`` uploads, training-run folders (writing: hub.py).

Layouts (docs/MODEL.md):
- hub: ``config.json`` (the run config, nested) + ``model.safetensors`` (or ``pytorch_model.bin``);
- run: ``.hydra/config.yaml`` + ``checkpoints-meta/checkpoint.pth`` holding
  ``{model, ema, optimizer, step}``, and ``checkpoints/checkpoint_<step>.pth`` snapshots;
  inference serves the EMA weights.
Pickled files are read with ``torch.load(weights_only=True)``: a checkpoint can
never execute code. Every mismatch, and every unreadable file (truncated, empty, not
JSON), raises ``CheckpointError`` naming the file and what is wrong with it.

Checksums: a weights file with a ``<name>.sha256`` sidecar beside it (training writes one
for every checkpoint; ``sha256sum -c`` reads it) is read only when its SHA-256 matches.
A run folder is read through ``newest_intact``, the one fallback that resuming a run uses
too: the meta checkpoint, else the newest intact snapshot, with a one-line warning naming
what was wrong with each file it passed over.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import load_file

from .config import ConfigError, RADDConfig, parse_dtype
from .errors import UserError

# save_pretrained / push_to_hub lived here before hub.py: still importable from here.
from .hub import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, hub_unreachable_hint, push_to_hub, save_pretrained  # noqa: F401
from .model import RADD
from .noise import Noise, get_noise

log = logging.getLogger(__name__)

RUN_CONFIG = Path(".hydra") / "config.yaml"
RUN_CHECKPOINT = Path("checkpoints-meta") / "checkpoint.pth"  # the resume point (published name)
RUN_SNAPSHOTS = Path("checkpoints")  # checkpoint_<step>.pth
SIDECAR_SUFFIX = ".sha256"
_SNAPSHOT = re.compile(r"^checkpoint_(\d+)\.pth$")
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
    if path_or_repo_id is None or not str(path_or_repo_id).strip():
        raise CheckpointError(f"load_model needs a hub repo id or a checkpoint folder, got {path_or_repo_id!r}")
    device = check_device(device)
    folder = _resolve_folder(path_or_repo_id)
    if (folder / RUN_CONFIG).exists() or (folder / RUN_CHECKPOINT).exists() or snapshot_paths(folder):
        config, state, weights = _read_run_folder(folder)
    else:
        config, state, weights = _read_hub_folder(folder)
    model = RADD(config, backend=backend, dtype=parse_dtype(dtype))
    try:
        load_state_dict_checked(model, state)
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e}") from e
    model = model.to(device).eval()
    return model, get_noise(config).to(device)


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device``, or a ``ConfigError`` when it is malformed or not present here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here "
                              f"(torch {torch.__version__}, no visible GPU); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


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
    try:  # the cache first: no network, no retries
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached (the hub library raises several types for it); fetch below
        pass
    hint = hub_unreachable_hint(f"model {repo_id!r}", "pass a local checkpoint folder or run folder")
    if hint is not None:
        raise CheckpointError(hint)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the hub library raises many types; name the repo and re-raise as ours
        raise CheckpointError(f"could not fetch {repo_id!r} from the Hugging Face hub: {e}") from e


def _read_hub_folder(folder: Path) -> tuple[RADDConfig, dict, Path]:
    """(config, state dict, the weights file) of a hub-layout folder."""
    config_file = folder / CONFIG_NAME
    if not config_file.exists():
        raise CheckpointError(f"{folder} holds neither {CONFIG_NAME} (hub layout) nor {RUN_CONFIG} (run layout)")
    config = _config_from(config_file, _read_json(config_file))
    if (folder / SAFETENSORS_NAME).exists():
        return config, _safetensors_load(folder / SAFETENSORS_NAME), folder / SAFETENSORS_NAME
    if (folder / BIN_NAME).exists():
        return config, _torch_load(folder / BIN_NAME), folder / BIN_NAME
    raise CheckpointError(f"{folder} has {CONFIG_NAME} but no weights ({SAFETENSORS_NAME} or {BIN_NAME})")


def _read_run_folder(folder: Path) -> tuple[RADDConfig, dict, Path]:
    """(config, EMA state dict, the checkpoint file) of a training-run folder: its newest intact checkpoint."""
    if not (folder / RUN_CONFIG).exists():
        raise CheckpointError(f"run folder {folder} is missing {RUN_CONFIG}")
    if not (folder / RUN_CHECKPOINT).exists() and not snapshot_paths(folder):
        raise CheckpointError(f"run folder {folder} is missing {RUN_CHECKPOINT} (and holds no "
                              f"{RUN_SNAPSHOTS}/checkpoint_<step>.pth)")
    config = _config_from(folder / RUN_CONFIG, _read_yaml(folder / RUN_CONFIG))
    ckpt, path = newest_intact(folder, _read_run_checkpoint, "loading")
    try:
        return config, ema_state_dict(config, ckpt["model"], ckpt["ema"]), path
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _read_run_checkpoint(path: Path) -> dict:
    """One run checkpoint, checksum-verified, with the entries inference needs."""
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a training checkpoint dict")
    for key in ("model", "ema"):
        if key not in ckpt:
            raise CheckpointError(f"{path} has no {key!r} entry (keys: {sorted(ckpt)})")
    return ckpt


# ---- checksums and the fallback over a run folder's checkpoints (resuming uses them too) ----------------
def sidecar_path(path: str | os.PathLike) -> Path:
    """``<path>.sha256``: the checksum file written beside a checkpoint."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):  # 16 MiB at a time: a multi-GB checkpoint never sits in memory twice
            digest.update(block)
    return digest.hexdigest()


def checksum_problem(path: Path) -> str | None:
    """Why the sidecar says ``path`` is not the file that was written, or None (matches, or no sidecar)."""
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        return None
    fields = sidecar.read_text(errors="replace").split()
    if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        return f"its checksum file {sidecar.name} is unreadable"
    if file_sha256(path) != fields[0]:
        return f"its SHA-256 does not match {sidecar.name} (truncated or corrupted)"
    return None


def snapshot_paths(run_dir: str | os.PathLike) -> list[Path]:
    """checkpoints/checkpoint_<step>.pth of a run folder, newest step first."""
    folder = Path(run_dir) / RUN_SNAPSHOTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), f) for f in folder.iterdir() if (m := _SNAPSHOT.match(f.name)) and f.is_file()]
    return [f for _, f in sorted(found, reverse=True)]


def newest_intact(run_dir: str | os.PathLike, read: Callable[[Path], dict], action: str) -> tuple[dict, Path] | None:
    """``(read(path), path)`` for the first checkpoint of ``run_dir`` that ``read`` accepts; None when it holds none.

    The meta checkpoint first, then the snapshots, newest first. ``read`` raises
    ``CheckpointError`` for a file it cannot use (a checksum mismatch, truncation, ...). Passing
    over a file logs one warning: what was wrong with each, and "<action> <path> (step N) instead".
    When every file fails: one ``CheckpointError`` naming each file and its problem (that file's
    own error when it was the only one).
    """
    run_dir = Path(run_dir)
    meta = run_dir / RUN_CHECKPOINT
    candidates = ([meta] if meta.exists() else []) + snapshot_paths(run_dir)
    if not candidates:
        return None
    errors: list[CheckpointError] = []
    problems = [] if meta.exists() else [f"{meta}: no such file"]
    for path in candidates:
        try:
            ckpt = read(path)
        except CheckpointError as e:
            errors.append(e)
            problems.append(str(e))
            continue
        if path != meta:
            step = f" (step {int(ckpt['step'])})" if "step" in ckpt else ""
            log.warning("%s; %s %s%s instead", "; ".join(problems), action, path, step)
        return ckpt, path
    if len(problems) == 1:
        raise errors[0]
    raise CheckpointError(f"no usable checkpoint in {run_dir}: " + "; ".join(problems))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a text file (not UTF-8); expected the model config as JSON") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _read_yaml(path: Path):
    # Plain YAML: the run config may hold Hydra interpolations that only Hydra resolves.
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None


def _config_from(path: Path, data) -> RADDConfig:
    """The model config of a parsed config file; a malformed one names the file."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a config mapping")
    try:
        return RADDConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def ema_state_dict(config: RADDConfig, model_state: dict, ema_state: dict) -> dict:
    """The model state with each trainable parameter replaced by its EMA shadow (parameters() order)."""
    shadow = ema_state.get("shadow_params")
    if shadow is None:
        raise CheckpointError(f"EMA state has no 'shadow_params' (keys: {sorted(ema_state)})")
    with torch.device("meta"):  # names and order only: no parameter memory is allocated
        names = [name for name, _ in RADD(config).named_parameters()]
    if len(shadow) != len(names):
        raise CheckpointError(f"EMA holds {len(shadow)} tensors but the model has {len(names)} parameters")
    state = dict(_strip_prefixes(model_state))
    state.update(zip(names, shadow))
    return state


def _torch_load(path: Path) -> dict:
    _check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling and zip errors come in many types; none may execute code
        raise CheckpointError(f"could not read {path} as a weights-only torch checkpoint (truncated or "
                              f"corrupt?): {_describe(e)}") from e


def _safetensors_load(path: Path) -> dict:
    _check_file(path)
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...: the library does not name the file
        raise CheckpointError(f"could not read {path} as safetensors (truncated or corrupt?): {_describe(e)}") from e


def _check_file(path: Path) -> None:
    """Not empty, and the same bytes its ``.sha256`` sidecar names (when it has one)."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes; an interrupted write or copy?)")
    problem = checksum_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def _describe(error: BaseException) -> str:
    """``Type: message`` on one line (some library errors have an empty message)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
