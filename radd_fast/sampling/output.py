"""sample.py's output: each sample printed and appended to ``--out`` as one whole JSONL line.

One record per sample, ``{"index", "text", "ids", "enfe", "sampler"}``, in sample order. The
samples that finish together are one write of a ``files.LineFile``, cut back to its last whole
line when the write fails (a full disk: one ``error:`` line naming the file) or is interrupted,
so the file only ever holds whole lines: Ctrl-C or a full disk keeps every sample written before.
Under torchrun each rank > 0 streams its share into ``<out>.rank<r>`` (kept if the run stops),
and rank 0 appends those shares to ``--out`` in rank order at the end (the CLI's ``_merge_ranks``).

Example::

    writer = SampleWriter(Path("out/s.jsonl"), tok, cfg.describe(), echo=True)
    writer.write(0, tokens, enfe)        # tokens [n, L] (CPU), enfe [n]: lines 0 .. n-1
    writer.close()
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import LineFile


def rank_path(out: Path, rank: int) -> Path:
    """Where rank ``rank`` streams its samples: ``--out`` itself on rank 0, ``<out>.rank<r>`` beside it."""
    return out if rank == 0 else out.with_name(f"{out.name}.rank{rank}")


class SampleWriter:
    """Prints samples (``echo``) and appends them to ``path`` (None: print only) as whole JSONL lines.

    tok: decodes ids to text; sampler: ``SamplerConfig.describe()``, recorded in every line.
    ``written``: the samples on disk (or printed, without a path), all whole lines.
    """

    def __init__(self, path: Path | None, tok, sampler: str, echo: bool):
        self.path, self.tok, self.sampler, self.echo = path, tok, sampler, echo
        self.written = 0
        self._file = None if path is None else LineFile(path, "w")

    def write(self, first: int, tokens: torch.Tensor, enfe) -> None:
        """Samples first .. first + n - 1: tokens [n, L], enfe [n]; printed, then on disk as whole lines."""
        lines = []
        for i, ids in enumerate(tokens.tolist()):
            text = self.tok.decode(ids)
            if self.echo:
                print(f"{'=' * 30} sample {first + i} {'=' * 30}\n{text}", flush=True)
            lines.append(json.dumps({"index": first + i, "text": text, "ids": ids, "enfe": int(enfe[i]),
                                     "sampler": self.sampler}))
        if self._file is not None:
            self._file.advice = (f"the {self.written} samples written before are kept, whole lines; free some "
                                 "space (or pass another --out) and run again")
            self._file.write_lines(lines)
        self.written += len(lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def note(self) -> str:
        """What is kept, for the interrupted line: ``12 samples in out/s.jsonl``."""
        where = f" in {self.path}" if self.path is not None else " printed"
        return f"{self.written} sample{'s' if self.written != 1 else ''}{where}"
