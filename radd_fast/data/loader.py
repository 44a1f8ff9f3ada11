"""Resumable, sharded batches of token blocks.

The global batch of a step is a slice of one seeded permutation of the blocks per
epoch, so the data position is two ints (epoch, batch index in the epoch): it is
saved in the checkpoint and a resumed run reads exactly the batches the
uninterrupted run would have read. Each global batch of ``batch_size`` blocks is
cut into ``world * accum`` micro-batches; rank r gets micro-batches
``r*accum .. r*accum + accum - 1`` (DistributedSampler-like, no overlap). The
micro-batch's index in the global batch is returned with it, so per-micro-batch
randomness can be made independent of the number of ranks.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import ConfigError
from .datasets import DataError, TokenBlocks


def check_batch_split(batch_size: int, world: int, accum: int, what: str = "training.batch_size") -> int:
    """Per-rank micro-batch size, or a clear error when the global batch does not split evenly."""
    if batch_size < 1 or accum < 1:
        raise ConfigError(f"{what} ({batch_size}) and training.accum ({accum}) must be >= 1")
    if batch_size % (world * accum):
        raise ConfigError(f"{what} = {batch_size} is not divisible by ngpus x training.accum = {world} x {accum} "
                         f"= {world * accum}")
    return batch_size // (world * accum)


class ResumableLoader:
    """Yields, per step, this rank's ``accum`` micro-batches as ``(micro_index, tokens [mb, L] int64)``.

    Example::

        loader = ResumableLoader(blocks, batch_size=8, seed=0)          # one process, accum 1
        (i, x), = loader.next_step()                                    # x: [8, L] on the CPU
        state = loader.state_dict()                                     # {'epoch': 0, 'batch': 1}
    """

    def __init__(self, blocks: TokenBlocks, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 accum: int = 1, device="cpu", what: str = "training.batch_size"):
        self.micro = check_batch_split(batch_size, world, accum, what)
        if len(blocks) < batch_size:
            raise DataError(f"data source {blocks.name!r} has {len(blocks)} blocks of {blocks.length} tokens, "
                            f"fewer than one batch ({what} = {batch_size})")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.rank, self.world, self.accum = rank, world, accum
        self.device = torch.device(device)
        self.batches_per_epoch = len(blocks) // batch_size  # the last partial batch of an epoch is dropped
        self.epoch, self.batch = 0, 0
        self._perm_epoch, self._perm = None, None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self.blocks), generator=g).numpy()
            self._perm_epoch = self.epoch
        return self._perm

    def next_step(self) -> list[tuple[int, torch.Tensor]]:
        start = self.batch * self.batch_size
        global_batch = self._permutation()[start:start + self.batch_size]
        out = []
        for a in range(self.accum):
            m = self.rank * self.accum + a
            x = torch.from_numpy(self.blocks[global_batch[m * self.micro:(m + 1) * self.micro]])
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            out.append((m, x))
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "batch": int(self.batch)}

    def load_state_dict(self, state: dict) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch < self.batches_per_epoch:
            raise DataError(f"saved data position (epoch {epoch}, batch {batch}) does not fit this data source "
                            f"({self.batches_per_epoch} batches per epoch): did the data or batch size change?")
        self.epoch, self.batch = epoch, batch
