"""One writer per run folder: an exclusive ``fcntl.flock`` on ``<run>/train.lock`` for a whole training run.

Two ``train.py`` processes on one folder would both write its checkpoints and ``metrics.jsonl``
(one resuming from the other's checkpoint with its own seed, the log holding each step twice).
The first takes the lock and writes its pid into the file; a second is refused in one line
naming the folder and that pid. The operating system releases a ``flock`` when its process
ends, however it ends: a run killed with SIGKILL leaves a file but no lock, and the next run
(a resume) simply takes it. A run that ends removes the file, while still holding the lock.

Why the inode check in ``_acquire``: a process that opened the file just before its holder
removed it could lock the removed file and believe it holds the folder; it checks that the
file it locked is still the one at the path, and opens it again when not.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ..errors import UserError

LOCK_NAME = "train.lock"


class RunFolderInUse(UserError):
    """Another process holds the run folder's lock (it is training or resuming there)."""


@contextlib.contextmanager
def run_folder_lock(run_dir: str | os.PathLike, enabled: bool = True):
    """Hold ``run_dir``'s lock while the block runs (creating the folder); ``RunFolderInUse`` when
    another process holds it. ``enabled=False`` (ranks > 0 of a run: rank 0 holds it) does nothing.

    Example::

        with run_folder_lock("runs/tiny"):
            ...  # write checkpoints and metrics
    """
    if not enabled:
        yield
        return
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: nobody can take the file between these two lines
        os.close(fd)  # releases the lock


def check_run_folder_free(run_dir: str | os.PathLike) -> None:
    """``RunFolderInUse`` when another process holds ``run_dir``'s lock now; creates nothing.

    train.py asks before Hydra writes ``.hydra/`` into a folder that another run is using; the
    lock taken by the run itself (``run_folder_lock``) is what decides.
    """
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        _try_lock(fd, path, shared=True)
    finally:
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _try_lock(fd, path)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # we locked a file its holder had just removed: open the one at the path


def _try_lock(fd: int, path: Path, shared: bool = False) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(path)
        who = f"another training process (pid {holder})" if holder else "another training process"
        raise RunFolderInUse(f"run folder {path.parent} is in use by {who}, which holds {path}: wait for it to "
                             f"end, or train into another folder") from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def _holder_pid(path: Path) -> int | None:
    """The pid the holder wrote, or None (not written yet, or unreadable)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
