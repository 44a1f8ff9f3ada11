"""Training metrics: a JSONL file, a progress bar, optional TensorBoard / wandb (rank 0 only).

Throughput: tokens/s over the global batch. MFU: the FLOPs the training step
executes (``radd_fast.flops.executed_train_flops``: the head at the planned rows only)
over the card's peak (``radd_fast.flops``, one table for the project); each record
that holds an MFU holds its formula too (``mfu_formula``).

A resumed run starts at the checkpoint's step, so every record after that step was
made by the interrupted process and is made again: they are dropped when the file is
opened (``drop_records_after``), and TensorBoard purges its events after that step, so
both read as one uninterrupted run. Lines are written whole (``radd_fast.files.LineFile``):
a full disk stops the run with one error line naming the file, and leaves whole lines.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..files import LineFile, atomic_write_text
from ..progress import log_above_bars, progress_bar

METRICS_FILE = "metrics.jsonl"
# What a failed write in the run folder (a full disk) adds to its one error line (radd_fast.files).
RESUME = "free some space and run again (load_dir=<run folder> resumes a run from its last checkpoint)"


def drop_records_after(path: str | os.PathLike, step: int) -> int:
    """Rewrite the JSONL file ``path`` without its records past ``step``; returns how many went.

    A line that does not parse (the process was killed while writing it) goes too. The file
    is replaced atomically, so a kill here leaves the old or the new file, never a mix.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept), advice=f"it is unchanged; {RESUME}")
    return dropped


class Metrics:
    """Rank 0 writes; other ranks get a no-op object. ``log(step, **values)`` appends one JSON line."""

    def __init__(self, run_dir, enabled: bool, total: int, initial: int, progress: bool = True,
                 tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.bar = self.tb = self.wandb = None
        self._undo_logging = None
        if not enabled:
            return
        drop_records_after(Path(run_dir) / METRICS_FILE, initial)
        self.file = LineFile(Path(run_dir) / METRICS_FILE, "a", advice=f"its earlier lines are kept whole; {RESUME}")
        if progress:
            self.bar = progress_bar(True, total=total, initial=initial, desc="train", unit="step")
            self._undo_logging = log_above_bars()  # evaluation / checkpoint lines above the bar, not inside it
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=initial + 1)
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config,
                                    name=Path(run_dir).name, resume="allow")

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write_lines([json.dumps(record)])  # on disk now; a full disk: one error line naming the file
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def progress(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self._undo_logging is not None:
            self._undo_logging()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
