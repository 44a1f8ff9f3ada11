"""``EvalConfig``: every option of one ``eval.py`` call, typed and validated once.

Built from the flags by ``EvalConfig.from_flags`` (as ``SamplerConfig`` is for sample.py and
``RunConfig`` for train.py): the flag formats are parsed (``--steps 32,64``, ``--datasets a,b``,
``--dataset_files NAME=PATH``), every value is checked with the flag named in the error
(``EvalError``, one line from the CLI), the machine's defaults are settled (device, backend,
Monte Carlo batching; for one dataset its loss, draws and split) and the work folder is proved
writable, all before any model is read. What only the model knows (the block length, the
tokenizer; the suite's loss) is filled in by ``with_model``. The result records itself:
``flags()`` (one dataset's settings), ``zero_shot_settings()``, ``gen_suite_settings()`` and
``samples_settings()`` are what the result files and the resumable suites keep.

Example::

    cfg = EvalConfig(model_path="runs/tiny", valid_dataset="text.txt", device="cpu").resolved()
    cfg = cfg.with_model(model)            # after load_model: length and tokenizer from the model
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import check_device
from ..data.tokenizers import default_tokenizer_name
from ..errors import UserError
from ..sampling.schedule import METHODS
from .paper_numbers import GEN_PPL_STEPS, ZERO_SHOT_DATASETS
from .ppl import check_loss_type, default_mc_batching, evaluation_acceleration
from .protocol import (
    DEFAULT_LOSS_TYPE,
    PUBLISHED_SPLITS,
    EvalError,
    check_work_dir,
    default_mc_timesteps,
    model_loss_type,
    published_split,
    rank_batch_size,
)

HF_DATASETS = tuple(PUBLISHED_SPLITS)
BACKENDS = ("reference", "fast")
SUITES = ("zero_shot", "gen_ppl")
AR_COLUMNS = ("ar_forward", "ar_backward", "ar_random")
SAMPLING_DTYPES = ("float64", "float32")
ENGINE_GONE = ("--engine is gone: it meant two things; use --backend reference|fast for the kernels and "
               "--mc_batching / --no_mc_batching for batched Monte Carlo draws")
# The four things eval.py does, by the flags that pick them.
MODES = ("ppl", "zero_shot", "gen_ppl_suite", "score_samples")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation call. Field names are the flags' (``--scorer`` is ``eval_model``, its published name).

    One dataset (the published flags): model_path, batch_size (GLOBAL, divided over ngpus), length
    (None: the model's), valid_dataset, monte_carlo_timesteps (None: 1024, or 1 for the exact ar_*
    losses), ngpus, loss_type (None: lambda_DCE; the suite: the model's own), work_dir, cache_dir.
    Additions: tokenizer (None: the model config's), seed, device (None: cuda when visible), dtype,
    split (None: the published one), backend (None: fast on CUDA), mc_batching (None: on for CUDA),
    max_batches, token_budget, static_rows, compile, cuda_graphs, no_progress.
    Suites: suite ('zero_shot' | 'gen_ppl'), datasets, dataset_files (name -> local file), ar_column;
    steps, num_samples, sample_chunk, rows_in_flight, sampling_dtype, method (the gen_ppl suite).
    Samples: gen_ppl (a JSONL file to score), eval_model (the scorer), gen_batch_size.
    """

    model_path: str = "JingyangOu/radd-lambda-dce"
    batch_size: int = 16
    length: int | None = None
    valid_dataset: str = "ptb"
    monte_carlo_timesteps: int | None = None
    ngpus: int = 1
    loss_type: str | None = None
    work_dir: str = "runs/eval"
    cache_dir: str = "data"
    tokenizer: str | None = None
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    split: str | None = None
    backend: str | None = None
    mc_batching: bool | None = None
    max_batches: int | None = None
    token_budget: int | None = None
    static_rows: bool = False
    compile: bool = False
    cuda_graphs: bool | None = None
    no_progress: bool = False
    suite: str | None = None
    datasets: tuple = ZERO_SHOT_DATASETS
    dataset_files: dict = field(default_factory=dict)
    ar_column: str | None = None
    steps: tuple = GEN_PPL_STEPS
    num_samples: int = 1024
    sample_chunk: int = 256
    rows_in_flight: int = 64
    sampling_dtype: str = "float64"
    method: str = "tweedie"
    gen_ppl: str | None = None
    eval_model: str = "gpt2-large"
    gen_batch_size: int = 8

    def __post_init__(self):
        """The checks that need neither the machine nor the model (the flag named in each error)."""
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "dataset_files", dict(self.dataset_files))
        for name in ("monte_carlo_timesteps", "max_batches", "token_budget", "gen_batch_size", "num_samples",
                     "sample_chunk", "rows_in_flight", "length"):
            _check_count(name, getattr(self, name))
        _choice("backend", self.backend, BACKENDS)
        _choice("suite", self.suite, SUITES)
        _choice("ar_column", self.ar_column, AR_COLUMNS)
        _choice("sampling_dtype", self.sampling_dtype, SAMPLING_DTYPES)
        _choice("method", self.method, METHODS)
        if not self.steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.steps):
            raise EvalError(f"--steps needs step counts >= 1, got {','.join(map(str, self.steps))!r}")
        if self.loss_type is not None:
            _check_losses(self.loss_type, self.monte_carlo_timesteps or default_mc_timesteps(self.loss_type))
        if self.mode == "ppl":
            rank_batch_size(self.batch_size, self.ngpus)
            check_dataset(self.valid_dataset)
        elif self.mode == "zero_shot":
            if self.ngpus != 1:
                raise EvalError("--suite zero_shot runs on one device: use --ngpus 1")
            for d in self.datasets:
                if d not in HF_DATASETS and d not in self.dataset_files:
                    raise EvalError(f"--datasets: unknown corpus {d!r}; expected some of {', '.join(HF_DATASETS)} "
                                    f"(or map it to a file with --dataset_files {d}=PATH)")

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> "EvalConfig":
        """The checked, resolved config of ``eval.py``'s parsed flags (``build_parser().parse_args``)."""
        values = dict(vars(args))
        if values.pop("engine", None) is not None:
            raise EvalError(ENGINE_GONE)
        values["datasets"] = tuple(d for d in values["datasets"].split(",") if d)
        values["dataset_files"] = parse_dataset_files(values["dataset_files"])
        values["steps"] = parse_steps(values["steps"])
        return cls(**values).resolved()

    def resolved(self) -> "EvalConfig":
        """The machine's defaults settled and checked, and the work folder proved writable (it is created)."""
        device = _checked_device(self.device)
        if self.mode == "score_samples":
            out = self.replace(device=device)
        else:
            dev = torch.device(device)
            try:
                evaluation_acceleration(dev, self.static_rows, self.compile, self.cuda_graphs)
            except ValueError as e:
                raise EvalError(f"--cuda_graphs: {e}".replace("static_rows=True", "--static_rows")) from e
            if dev.type == "cuda" and self.ngpus > torch.cuda.device_count():
                raise EvalError(f"--ngpus {self.ngpus} but only {torch.cuda.device_count()} CUDA device(s) are visible")
            out = self.replace(device=device, backend=self.backend or ("fast" if dev.type == "cuda" else "reference"),
                               mc_batching=default_mc_batching(dev) if self.mc_batching is None else self.mc_batching)
            if self.mode == "ppl":
                loss_type = self.loss_type or DEFAULT_LOSS_TYPE
                out = out.replace(loss_type=loss_type,
                                  monte_carlo_timesteps=self.monte_carlo_timesteps or default_mc_timesteps(loss_type),
                                  split=self.split or published_split(self.valid_dataset))
        check_work_dir(out.work_dir)
        return out

    def with_model(self, model) -> "EvalConfig":
        """The length and tokenizer from the loaded model when not given (and the suite's loss: the model's own)."""
        if self.length is not None and self.length > model.length:
            raise EvalError(f"--length {self.length} is larger than the model's length {model.length} (model.length)")
        try:
            tokenizer = self.tokenizer or default_tokenizer_name(model.config)
        except ValueError as e:  # the config names no tokenizer and the vocabulary size fits none
            raise EvalError(str(e)) from e
        out = self.replace(length=self.length or model.length, tokenizer=tokenizer)
        if self.mode == "zero_shot":
            loss_type = self.loss_type or model_loss_type(model.config, self.model_path)
            out = out.replace(loss_type=loss_type,
                              monte_carlo_timesteps=self.monte_carlo_timesteps or default_mc_timesteps(loss_type))
        return out

    def replace(self, **changes) -> "EvalConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- what it is --------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """One of ``MODES``: score a samples file (--gen_ppl), a suite (--suite), or one dataset."""
        if self.gen_ppl:
            return "score_samples"
        if self.suite == "zero_shot":
            return "zero_shot"
        if self.suite == "gen_ppl":
            return "gen_ppl_suite"
        return "ppl"

    @property
    def progress(self) -> bool:
        return not self.no_progress

    # -- what the result files record ----------------------------------------------------------------
    def flags(self) -> dict:
        """Every flag as resolved, in the flags' order and form (comma lists, NAME=PATH): one dataset's
        ``settings``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "no_progress"}
        out["datasets"] = ",".join(self.datasets)
        out["dataset_files"] = [f"{name}={path}" for name, path in self.dataset_files.items()]
        out["steps"] = ",".join(map(str, self.steps))
        return out

    def zero_shot_settings(self) -> dict:
        """What the zero-shot suite's results depend on (a resumed suite must match them)."""
        return {"model_path": str(self.model_path), "loss_type": self.loss_type, "mc_timesteps": self.monte_carlo_timesteps,
                "length": self.length, "batch_size": self.batch_size, "seed": self.seed, "datasets": list(self.datasets),
                "dataset_files": dict(self.dataset_files), "ar_column": self.ar_column,
                "mc_batching": bool(self.mc_batching), "token_budget": self.token_budget,
                "max_batches": self.max_batches, "tokenizer": self.tokenizer, "split": self.split,
                "backend": self.backend, "dtype": self.dtype}

    def gen_suite_settings(self) -> dict:
        """What the generative-perplexity suite's results depend on (a resumed suite must match them)."""
        return {"model_path": str(self.model_path), "steps": list(self.steps), "num_samples": self.num_samples,
                "length": self.length, "chunk": self.sample_chunk, "rows_in_flight": self.rows_in_flight,
                "method": self.method, "sampling_dtype": self.sampling_dtype, "seed": self.seed,
                "scorer": str(self.eval_model), "score_batch_size": self.gen_batch_size, "tokenizer": self.tokenizer}

    def samples_settings(self) -> dict:
        """What the score of a samples file records."""
        return {"samples": str(self.gen_ppl), "eval_model": self.eval_model, "tokenizer": self.tokenizer or "gpt2",
                "device": self.device}


# -- the flags' formats and the checks ----------------------------------------------------------------
def parse_steps(text: str) -> tuple[int, ...]:
    """``--steps 32,64,128`` -> (32, 64, 128)."""
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise EvalError(f"--steps expects comma-separated whole numbers, got {text!r}") from e
    if not steps or min(steps) < 1:
        raise EvalError(f"--steps needs step counts >= 1, got {text!r}")
    return steps


def parse_dataset_files(items: list[str]) -> dict:
    """``--dataset_files NAME=PATH ...`` -> {NAME: PATH}; each file must exist."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--dataset_files expects NAME=PATH, got {item!r}")
        if not Path(path).expanduser().exists():
            raise EvalError(f"--dataset_files {name}: no such file {path}")
        out[name] = path
    return out


def check_dataset(dataset: str) -> None:
    """A corpus name of the published protocol or an existing local file."""
    if not Path(dataset).expanduser().exists() and dataset not in HF_DATASETS:
        raise EvalError(f"unknown dataset {dataset!r}: expected one of {', '.join(HF_DATASETS)} "
                        f"or the path of an existing local text file (.txt / .jsonl / folder of .txt)")


def _check_losses(loss_type: str, mc: int) -> None:
    try:
        check_loss_type(loss_type, mc)
    except ValueError as e:
        raise EvalError(str(e)) from e


def _check_count(name: str, value) -> None:
    """A count that must be >= 1 when given (0 or negative would mean "all" or slice from the end)."""
    if value is not None and value < 1:
        raise EvalError(f"--{name} must be >= 1, got {value}")


def _choice(name: str, value, choices: tuple) -> None:
    if value is not None and value not in choices:
        raise EvalError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")


def _checked_device(device: str | None) -> str:
    """--device (default: cuda when visible) checked by the loader's own rule, the flag named."""
    try:
        return str(check_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    except UserError as e:
        raise EvalError(f"{e} (--device)") from None
