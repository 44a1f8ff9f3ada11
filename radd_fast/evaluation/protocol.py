"""The published evaluation protocol as data, and the checks every evaluation command shares.

Which split each corpus is evaluated on (WikiText2: its *train* split, as the
published ``evaluation_modeling.py`` does, so the paper's table uses it; the
others: test), the block length and Monte Carlo draws of the paper's table, the
model's own loss type, how a global batch is divided over ranks, and the
validation done before any model work (a writable --work_dir). Why these
choices: docs/EVALUATION.md.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from ..data.detokenizers import DETOKENIZERS
from ..errors import UserError
from ..losses.registry import EXACT_LOSS_TYPES

# The split the published evaluation reads for each corpus.
PUBLISHED_SPLITS = {"lambada": "test", "wikitext2": "train", "ptb": "test", "wikitext103": "test", "lm1b": "test"}
DEFAULT_SPLIT = "test"  # local files and anything else
PAPER_LENGTH = 1024  # tokens per block in Table 1
PAPER_MC_TIMESTEPS = 1024  # noise draws per batch for the diffusion losses
DEFAULT_LOSS_TYPE = "lambda_DCE"  # the published CLI's default
# What a failed write of a result file (a full disk) adds to its one error line (radd_fast.files): the
# results are printed before they are written, and the suites' state file is replaced atomically.
PRINTED = "the results are printed above; free some space (or pass another --work_dir) to keep them in a file"
RESUME = "the state saved before it is unchanged; free some space and run the same command to resume"


class EvalError(UserError):
    """A user-facing problem with the evaluation's arguments or data (printed without a traceback)."""


def published_split(dataset: str) -> str:
    """The split the published evaluation uses for ``dataset`` (a corpus name); 'test' otherwise."""
    return PUBLISHED_SPLITS.get(dataset, DEFAULT_SPLIT)


def detokenizer_of(dataset: str):
    """The published detokenizer of a corpus name (None for a corpus without one)."""
    return DETOKENIZERS.get(dataset)


def default_mc_timesteps(loss_type: str) -> int:
    """1 for the exact ar_* losses (no noise to average over), else the paper's 1024 draws."""
    return 1 if loss_type in EXACT_LOSS_TYPES else PAPER_MC_TIMESTEPS


def model_loss_type(config, model_path: str = "") -> str:
    """The loss a checkpoint was trained with: its config's ``training.loss_type`` when recorded, else
    the one in a published checkpoint's name (radd-t-dce / radd-lambda-dce), else lambda_DCE."""
    training = config.extra.get("training") if isinstance(config.extra, dict) else None
    if isinstance(training, dict) and training.get("loss_type"):
        return str(training["loss_type"])
    name = str(model_path).lower()
    if "t-dce" in name and "lambda" not in name:
        return "t_DCE"
    return DEFAULT_LOSS_TYPE


def rank_batch_size(batch_size: int, ngpus: int) -> int:
    """The per-rank batch of a GLOBAL ``--batch_size`` divided over ``--ngpus`` (as published)."""
    if batch_size < 1 or ngpus < 1:
        raise EvalError(f"--batch_size and --ngpus must be >= 1, got {batch_size} and {ngpus}")
    if batch_size % ngpus:
        raise EvalError(f"--batch_size {batch_size} (the global batch) is not divisible by --ngpus {ngpus}")
    return batch_size // ngpus


def check_work_dir(work_dir) -> Path:
    """Create ``work_dir`` and prove it writable now, before hours of evaluation (raises EvalError)."""
    path = Path(work_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test", delete=True):
            pass
    except OSError as e:
        raise EvalError(f"cannot write results to --work_dir {path}: {e.strerror or e}") from e
    return path


def derived_seed(*parts) -> int:
    """A 63-bit seed from any parts (seed, dataset, batch index): the same on every run and machine,
    so a resumed evaluation draws exactly the noise the uninterrupted one would have."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def json_safe(values: list) -> list:
    """NaN -> None, so the JSON files stay standard JSON."""
    return [None if isinstance(v, float) and v != v else v for v in values]
