"""Training checkpoints: what they hold, how they are written, how a resume finds an intact one.

Layout (the published run format plus resume state; every value is a tensor, a number,
a string or a list/dict of those, so ``torch.load(weights_only=True)`` reads it and
``radd_fast.load_model(<run>)`` serves its EMA weights)::

    {"model": state_dict, "ema": {decay, num_updates, shadow_params}, "optimizer": state_dict,
     "step": int, "scaler": state_dict, "data": {"train": {epoch, batch}, "valid": {...}},
     "world": int, "run": {"model.hidden_size": 768, ...: the settings a resume may not change}}

No generator state is saved: the loop reseeds every generator before each use
(``loop.seed_for``), so a resumed run draws what the uninterrupted run drew without one.

Writing (``atomic_save``, through ``radd_fast.files``): the data goes to ``.<name>.tmp<pid>`` in
the same folder, hashed (SHA-256) while it is written, fsynced, and renamed over the target; then the sidecar
``<name>.sha256`` (``sha256sum -c`` reads it) is written the same way. The old sidecar is
removed just before the rename, so at every instant the folder holds a matching pair or a
checkpoint without a sidecar, never a checkpoint with someone else's checksum. A kill leaves
at worst a temporary file, removed at the next start (``remove_stale_temporaries``). A full
disk (or quota, read-only folder) raises a ``CheckpointError`` that starts with "no space left
on device while writing <path>"; the checkpoint already there is untouched.

Reading (``find_resume_checkpoint``): ``checkpoints-meta/checkpoint.pth`` when it is intact
(its sidecar matches and it loads; without a sidecar -- a published run, or a kill between
the two renames -- it must load); otherwise the newest intact
``checkpoints/checkpoint_<step>.pth``, with a warning naming both; a ``CheckpointError``
saying what is wrong with each file when none is usable. The checksums and this fallback are
``radd_fast.checkpoint``'s (``checksum_problem``, ``newest_intact``): ``load_model`` reads a run
folder through the same ones.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch

from ..checkpoint import (  # noqa: F401  (sidecar_path, snapshot_paths: training's names for them too)
    RUN_CHECKPOINT,
    RUN_SNAPSHOTS,
    CheckpointError,
    checksum_problem,
    load_state_dict_checked,
    newest_intact,
    sidecar_path,
    snapshot_paths,
)
from ..files import commit, write_errors, write_temporary

log = logging.getLogger(__name__)

META = RUN_CHECKPOINT  # checkpoints-meta/checkpoint.pth: for resuming (published name)
SNAPSHOTS = RUN_SNAPSHOTS  # checkpoint_<step>.pth
REQUIRED_KEYS = ("model", "ema", "optimizer", "step")  # the published checkpoint's keys
# Settings that give the saved weights and the saved data position their meaning: a resume
# that changed one would load mismatched weights or read other batches than the run it continues.
_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")  # files.temporary_path: .checkpoint.pth.tmp<pid>, ....sha256.tmp<pid>
CHECKPOINT_KEPT = "the checkpoint already there (if any) is unchanged; free some space and resume from it"


# ---- writing ------------------------------------------------------------------------------------------
class _HashingWriter:
    """A write-only file object that hashes what passes through (torch.save writes sequentially)."""

    def __init__(self, fh, digest):
        self.fh, self.digest = fh, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file, then its checksum sidecar."""
    path = Path(path)
    digest = hashlib.sha256()
    with write_errors(path, CHECKPOINT_KEPT, CheckpointError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = write_temporary(path, lambda fh: torch.save(obj, _HashingWriter(fh, digest)))
        sidecar_path(path).unlink(missing_ok=True)  # from here until the new sidecar: no sidecar at all
        commit(tmp, path)
        line = f"{digest.hexdigest()}  {path.name}\n".encode()
        sidecar = sidecar_path(path)
        commit(write_temporary(sidecar, lambda fh: fh.write(line)), sidecar)


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed writers left in the checkpoint folders; returns them.

    Only a temporary whose writer is gone is removed: its pid is not a live process, or it is
    this process's own pid (reused by the system; this process has not written yet). One whose
    writer still runs -- another process writing in this folder -- is left alone.
    """
    removed = []
    for folder in (Path(run_dir) / META.parent, Path(run_dir) / SNAPSHOTS):
        if not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            match = _TEMPORARY.match(file.name)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid == os.getpid() or not _pid_alive(pid):
                file.unlink(missing_ok=True)
                removed.append(file)
                log.info("removed %s, left by a writer that was killed (pid %d)", file, pid)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# ---- what a checkpoint holds ---------------------------------------------------------------------------
def resume_settings(cfg) -> dict:
    """The settings a resumed run must share with its checkpoint, ``{config key: value}`` for a
    RunConfig (stored in the checkpoint as ``run``; a resume compares them key by key)."""
    model = cfg.model.model
    return {"tokens": cfg.model.tokens, "tokenizer": cfg.tokenizer, "model.type": model.type,
            "model.hidden_size": model.hidden_size, "model.n_heads": model.n_heads,
            "model.n_blocks": model.n_blocks, "model.length": model.length,
            "model.scale_by_sigma": model.scale_by_sigma, "training.batch_size": cfg.training.batch_size}


def build_checkpoint(model, ema, optimizer, scaler, step: int, data: dict, world: int, settings: dict) -> dict:
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "scaler": scaler.state_dict(),
        "data": data,
        "world": int(world),
        "run": dict(settings),
    }


def all_finite(tensors) -> bool:
    """True when every tensor holds only finite values (one host sync)."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


# ---- reading -------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, device) -> dict:
    """Read one training checkpoint, verified; ``CheckpointError`` naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (zero bytes)")
    problem = checksum_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # unpickling / zip errors come in many types; none may execute code
        raise CheckpointError(f"{path}: not a readable weights-only torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (no {missing} entry)")
    if not all_finite([*ckpt["model"].values(), *ckpt["ema"].get("shadow_params", [])]):
        raise CheckpointError(f"{path}: holds weights that are not finite (NaN / inf)")
    return ckpt


def find_resume_checkpoint(run_dir: str | os.PathLike, device) -> tuple[dict, Path] | None:
    """The checkpoint a run in ``run_dir`` resumes from, and its path; None when the folder holds none.

    The meta checkpoint first (the resume point, written last at each step); when it is missing
    or unusable, the newest intact snapshot, with a warning naming both (``checkpoint.newest_intact``).
    """
    return newest_intact(run_dir, lambda path: load_checkpoint(path, device), "resuming from")


def check_resume_settings(ckpt: dict, settings: dict, path: Path) -> None:
    """Refuse a resume whose model or batch settings differ from the checkpoint's (naming the keys)."""
    saved = ckpt.get("run")
    if not isinstance(saved, dict):
        return  # an older or published checkpoint: the weights' shapes are still checked on load
    changed = [f"{k}={saved[k]!r} -> {settings[k]!r}" for k in settings if k in saved and saved[k] != settings[k]]
    if changed:
        raise CheckpointError(f"cannot resume from {path}: the run changed {', '.join(changed)} (checkpoint -> "
                              f"now); resume with the checkpoint's values or start a new run folder")


def restore(ckpt: dict, path: Path, model, ema, optimizer, scaler) -> int:
    """Load the checkpoint read from ``path`` into the training objects; returns its step.

    Shape or key mismatches raise ``CheckpointError`` naming the file and every key at fault.
    """
    try:
        load_state_dict_checked(model, ckpt["model"])
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from e
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    # The saved groups hold the saving run's kernel choice (fused / foreach); this run's build_optimizer
    # decides it: a checkpoint of an unfused run must not switch off the fused step's device gate.
    for group in optimizer.param_groups:
        group.update({k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults})
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["step"])
