"""A disk that fills up, without root: writes to files under a folder fail with ENOSPC once ``free``
bytes have been written there (the write that crosses the limit puts its first bytes on disk, as a
real full disk does, then fails).

In process: ``full_disk(monkeypatch, folder, free)`` replaces ``open`` (pathlib's too). For a CLI
run as a subprocess: ``full_disk_env(tmp_path, folder, free)`` returns the environment that makes
the child do the same, through a test-only ``sitecustomize`` put first on its PYTHONPATH.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

from tests.support.paths import REPO

FOLDER_VAR, FREE_VAR = "RADD_TEST_FULL_DISK", "RADD_TEST_FULL_DISK_FREE"
SITECUSTOMIZE = "from tests.support.faults import install_from_env\n\ninstall_from_env()\n"


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _Disk:
    def __init__(self, folder, free: int):
        self.folder, self.free = os.path.realpath(folder), int(free)

    def covers(self, file) -> bool:
        path = os.path.realpath(os.fspath(file))
        return path == self.folder or path.startswith(self.folder + os.sep)


class _FillingFile:
    """A writable file object whose writes count against the disk's free bytes."""

    def __init__(self, fh, disk: _Disk):
        self._fh, self._disk = fh, disk

    def write(self, data):
        size = len(data.encode("utf-8")) if isinstance(data, str) else memoryview(data).nbytes
        if size <= self._disk.free:
            self._disk.free -= size
            return self._fh.write(data)
        keep, self._disk.free = self._disk.free, 0
        if keep:
            self._fh.write(data[:keep])  # (str: characters; the tests write ASCII)
            self._fh.flush()
        raise disk_full()

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __iter__(self):
        return iter(self._fh)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def filling_open(folder, free: int, real_open=io.open):
    """An ``open`` whose files under ``folder``, opened for writing, share ``free`` bytes."""
    disk = _Disk(folder, free)

    def open_(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and disk.covers(file):
            return _FillingFile(fh, disk)
        return fh

    return open_


def full_disk(monkeypatch, folder, free: int = 0) -> None:
    """In this process, until the test ends: the disk under ``folder`` has ``free`` bytes left."""
    fake = filling_open(folder, free)
    monkeypatch.setattr(io, "open", fake)
    monkeypatch.setattr(builtins, "open", fake)


def full_disk_env(tmp_path: Path, folder, free: int = 0) -> dict:
    """Environment variables for a subprocess whose disk under ``folder`` has ``free`` bytes left."""
    site = Path(tmp_path) / "full_disk_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), FOLDER_VAR: str(folder), FREE_VAR: str(free)}


def install_from_env() -> None:
    """Called by the test-only sitecustomize: install the full disk that the environment describes."""
    if os.environ.get(FOLDER_VAR):
        fake = filling_open(os.environ[FOLDER_VAR], int(os.environ.get(FREE_VAR, "0")))
        io.open = builtins.open = fake
