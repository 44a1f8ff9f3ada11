"""Training metrics: a JSONL file, a tqdm bar, optional TensorBoard / wandb (rank 0 only).

Throughput: tokens/s over the global batch. MFU: the FLOP count and peak table
of ``radd_fast.flops`` (one for the project).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

class Metrics:
    """Rank 0 writes; other ranks get a no-op object. ``log(step, **values)`` appends one JSON line."""

    def __init__(self, run_dir, enabled: bool, total: int, initial: int, progress: bool = True,
                 tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.bar = self.tb = self.wandb = None
        if not enabled:
            return
        self.file = (Path(run_dir) / "metrics.jsonl").open("a", encoding="utf-8")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config,
                                    name=Path(run_dir).name, resume="allow")

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
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
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
