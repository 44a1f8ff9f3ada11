"""Training metrics: a JSONL file, a tqdm bar, optional TensorBoard / wandb (rank 0 only).

Throughput: tokens/s over the global batch. MFU = achieved model FLOPs / peak,
with model FLOPs per token = 6 N + 12 n_blocks T d (N: parameters outside the
input embedding, which is a lookup; the second term is attention's QK^T and AV,
forward + backward, PaLM appendix B). The losses run the output head only on
masked rows, so this counts more head FLOPs than are done: MFU is a slight
over-estimate of useful work, comparable across runs. Peak: dense bf16/fp16
tensor-core FLOP/s from a table by device name; none on CPU or fp32.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Dense 16-bit tensor-core peak FLOP/s, matched by substring of the device name (first match wins).
PEAK_FLOPS_16BIT = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]


def flops_per_token(model, length: int) -> float:
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("vocab_embed"))
    m = model.config.model
    return 6.0 * n + 12.0 * m.n_blocks * length * m.hidden_size


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS_16BIT if key in name), None)


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
