"""The one progress bar of the package: tqdm with rate and ETA, or a silent stand-in.

Sampling (evaluations), evaluation (batches), generative perplexity (batches)
and training (steps) all use ``progress_bar``; ``write`` prints a line above a
running bar instead of into the middle of it.
"""
from __future__ import annotations

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
