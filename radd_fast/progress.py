"""The one progress bar of the package: tqdm with rate and ETA, or a silent stand-in.

Sampling (evaluations), evaluation (batches), generative perplexity (batches)
and training (steps) all use ``progress_bar``; ``write`` prints a line above a
running bar instead of into the middle of it.
"""
from __future__ import annotations

import logging
from typing import Callable

from tqdm.auto import tqdm


class _Silent:
    """The calls of a tqdm bar, doing nothing (progress switched off, or not rank 0)."""

    total = 0
    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0):
    """A tqdm bar (rate and ETA) when ``enabled``, else an object with the same calls that does nothing."""
    if not enabled:
        return _Silent()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


def write(line: str) -> None:
    """Print ``line`` without breaking a running bar."""
    tqdm.write(line)


class _AboveBar(logging.Handler):
    """A console handler's records, written with ``tqdm.write`` so they land above a running bar."""

    def __init__(self, inner: logging.StreamHandler):
        super().__init__(inner.level)
        self.inner = inner
        self.setFormatter(inner.formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.inner.stream)
        except Exception:  # a log line must never break the run; logging's own policy
            self.handleError(record)


def log_above_bars() -> Callable[[], None]:
    """Swap the root logger's console handlers for ones that print above tqdm bars; returns the undo."""
    root = logging.getLogger()
    swapped = [(h, _AboveBar(h)) for h in root.handlers
               if type(h) is logging.StreamHandler]  # console handlers only, not files
    for old, new in swapped:
        root.removeHandler(old)
        root.addHandler(new)

    def undo() -> None:
        for old, new in swapped:
            root.removeHandler(new)
            root.addHandler(old)
    return undo
