"""Writing files: never a partial file, and a full disk is one error naming the path.

Every writer of the package goes through here: training checkpoints (training/state.py),
metrics (training/metrics.py), evaluation reports and suite state (evaluation/), the token
cache (data/datasets.py), sample.py's ``--out`` and the gen-PPL suite's samples.

- ``atomic_write(path, write)``: ``write(fh)`` into ``.<name>.tmp<pid>`` beside ``path``,
  flushed, fsynced, renamed over ``path`` (``os.replace``), then the folder fsynced: a reader
  (or a resume) sees the old file or the new one, never half of one. On any failure,
  Ctrl-C included, the temporary is removed and ``path`` is as it was.
  ``atomic_write_text`` / ``atomic_write_json`` are the two common cases; ``atomic_save_as``
  serves a library that writes by file name (safetensors).
- ``LineFile(path)``: a streamed file of whole lines (JSONL): each ``write_lines`` is one
  unbuffered write, fsynced when asked; a write that fails (a full disk, Ctrl-C) is cut back to
  the last complete line, so the file always holds whole lines.
- ``LineLogHandler(path)``: a ``logging`` handler over a ``LineFile`` (a run's ``logs``).
- ``write_errors(path)``: a full disk (ENOSPC), an exceeded quota (EDQUOT), a read-only file
  system (EROFS) or a refused permission (EACCES / EPERM) anywhere in the exception chain (torch
  wraps its writer's OSError in a RuntimeError) becomes a ``WriteError`` (a ``UserError``: one
  ``error:`` line from the CLIs) that names the path: ``no space left on device while writing
  <path>: <advice>``. Callers print what they computed before they write it, so a result is
  never lost to its report file.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from .errors import UserError

# errno -> the words of the message; a failure for any other reason keeps its own traceback (a bug).
DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
REPLACED = "the file already there (if any) is unchanged; free some space (or write elsewhere) and run again"


class WriteError(UserError):
    """A file could not be written for a reason the user can fix (a full disk, a read-only folder)."""


def disk_problem(error: BaseException) -> str | None:
    """The words for a disk error anywhere in ``error``'s chain (see ``DISK_ERRORS``), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            return DISK_ERRORS[error.errno]
        if "no space left on device" in str(error).lower():  # a library that re-raised it as text
            return DISK_ERRORS[errno.ENOSPC]
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def write_errors(path: str | os.PathLike, advice: str = REPLACED, error_type: type[UserError] = WriteError):
    """Turn a disk error raised inside into ``error_type("<problem> while writing <path>: <advice>")``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        problem = disk_problem(e)
        if problem is None:
            raise
        raise error_type(f"{problem} while writing {path}: {advice}") from e


# ---- whole files, replaced atomically ------------------------------------------------------------------
def temporary_path(path: str | os.PathLike) -> Path:
    """``.<name>.tmp<pid>`` beside ``path``: hidden, on the same file system, one per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_temporary(path: str | os.PathLike, write: Callable, mode: str = "wb") -> Path:
    """``write(fh)`` into this process's temporary beside ``path``, flushed and fsynced; returns it."""
    tmp = temporary_path(path)
    try:
        with tmp.open(mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: Path, path: str | os.PathLike) -> None:
    """Rename the temporary over ``path`` and fsync the folder (the rename itself is durable)."""
    path = Path(path)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "wb", advice: str = REPLACED,
                 error_type: type[UserError] = WriteError) -> None:
    """``write(fh)`` to ``path`` through a temporary and a rename: ``path`` is the old or the new file.

    Example::

        atomic_write("out/result.bin", lambda fh: fh.write(b"..."))
    """
    path = Path(path)
    with write_errors(path, advice, error_type):
        path.parent.mkdir(parents=True, exist_ok=True)
        commit(write_temporary(path, write, mode), path)


def atomic_save_as(path: str | os.PathLike, save: Callable[[Path], None], advice: str = REPLACED,
                   error_type: type[UserError] = WriteError) -> None:
    """``save(temporary path)``, for a library that writes by file name (safetensors' ``save_file``), then
    fsync and rename as ``atomic_write`` does."""
    path = Path(path)
    tmp = temporary_path(path)
    with write_errors(path, advice, error_type):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            save(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        commit(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str, **kwargs) -> None:
    atomic_write(path, lambda fh: fh.write(text), mode="w", **kwargs)


def atomic_write_json(path: str | os.PathLike, obj, **kwargs) -> None:
    """``obj`` as indented JSON (standard JSON: callers turn NaN into null first)."""
    atomic_write_text(path, json.dumps(obj, indent=1), **kwargs)


# ---- streamed files of whole lines ----------------------------------------------------------------------
KEPT = "the lines written before are kept whole; free some space (or write elsewhere) and run again"


class LineFile:
    """A UTF-8 file of whole lines, written as they come: ``mode`` "w" (new) or "a" (append).

    Example::

        with LineFile("samples.jsonl", "w") as out:
            out.write_lines([json.dumps({"index": 0})])   # on disk now; a failed write is cut back
    """

    def __init__(self, path: str | os.PathLike, mode: str = "a", fsync: bool = False, advice: str = KEPT,
                 error_type: type[UserError] = WriteError):
        if mode not in ("w", "a"):
            raise ValueError(f"LineFile mode must be 'w' or 'a', got {mode!r}")
        self.path, self.fsync, self.advice, self.error_type = Path(path), fsync, advice, error_type
        with write_errors(self.path, advice, error_type):
            self.fh = self.path.open(mode + "b", buffering=0)  # unbuffered: nothing is left to flush at close
        self.size = self.fh.seek(0, os.SEEK_END)  # the end of the last complete line

    def write_lines(self, lines: Iterable[str]) -> None:
        """Append each line (without its newline) and a newline, in one write."""
        data = "".join(f"{line}\n" for line in lines).encode("utf-8")
        with write_errors(self.path, self.advice, self.error_type):
            try:
                view = memoryview(data)
                while view:  # a raw write may take part of the data
                    view = view[self.fh.write(view):]
                if self.fsync:
                    os.fsync(self.fh.fileno())
            except BaseException:
                self._cut_back()
                raise
        self.size += len(data)

    def _cut_back(self) -> None:
        """Drop the part of a failed write that reached the file (shrinking needs no space)."""
        try:
            os.ftruncate(self.fh.fileno(), self.size)
        except OSError:
            pass  # the write's own error is the one to report

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> "LineFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



class LineLogHandler(logging.Handler):
    """A ``logging`` handler that appends each record to a ``LineFile``: a failed write raises its
    ``WriteError`` to the code that logged (``logging.FileHandler`` would print a traceback per record
    and go on, and fail again when closed)."""

    def __init__(self, path: str | os.PathLike, advice: str = KEPT, level: int = logging.NOTSET):
        super().__init__(level)
        self.file = LineFile(path, "a", advice=advice)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a bad format string is logging's own problem: its usual report
            self.handleError(record)
            return
        self.file.write_lines([text])

    def close(self) -> None:
        self.file.close()
        super().close()
