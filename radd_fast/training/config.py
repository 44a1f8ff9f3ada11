"""Typed run configuration: the published Hydra keys (docs/TRAINING.md), validated on construction.

``RunConfig.from_dict`` takes the composed Hydra config (or a plain nested dict,
as the tests pass) and builds one dataclass per section. Published keys keep
their names and meanings; the extra keys are documented in configs/config.yaml.
A misspelt key inside a known section raises ``ConfigError`` naming the valid keys;
a number that is not finite, not a number, or out of its range raises one naming the
key (``optim.lr=nan`` is refused here, not by torch or by a NaN run).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DTYPES, ConfigError, RADDConfig, _to_plain
from ..losses import LOSS_TYPES, TIME_SAMPLERS
from ..sampling.config import SamplerConfig

INF = math.inf
# Suffixes of a data file: a data.train / data.valid value with one (or a '/') names a path, not a corpus.
DATA_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".npy", ".bin")


def check_number(key: str, value, whole: bool = False, low: float = -INF, high: float = INF,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``value`` is a finite number in the range.

    whole: an integer is required (2.0 is accepted, 2.5 is not); low / high: bounds, inclusive
    unless ``low_open`` / ``high_open``; optional: None is accepted.
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a {'whole number' if whole else 'number'}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value}")
    if whole and value != int(value):
        raise ConfigError(f"{key} must be a whole number, got {value}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise ConfigError(f"{key} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, "
                          f"got {value}")


@dataclass
class TrainingConfig:
    batch_size: int = 512  # global, over all ranks and accumulation steps
    accum: int = 1
    n_iters: int = 400_000
    snapshot_freq: int = 50_000
    log_freq: int = 50
    eval_freq: int = 100  # 0: no evaluation during training
    snapshot_freq_for_preemption: int = 10_000
    snapshot_sampling: bool = True
    ema: float = 0.9999
    loss_type: str = "lambda_DCE"
    weight: str = "standard"  # published key, unused by RADD
    # extra keys
    time_sampler: str | None = None  # None: the loss's own (vdm for t-losses, decoupled for lambda_DCE)
    sampling_eps: float = 1e-3
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or fp32 / bf16 / fp16 (fp16 uses a GradScaler)
    compile: bool | str = "auto"  # auto: the step compiled whole on CUDA, eager on CPU; or true / false
    seed: int = 42
    progress: bool = True

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"unknown training.loss_type {self.loss_type!r}; expected one of {list(LOSS_TYPES)}")
        if self.time_sampler is not None and self.time_sampler not in TIME_SAMPLERS:
            raise ConfigError(f"unknown training.time_sampler {self.time_sampler!r}; expected one of "
                              f"{sorted(TIME_SAMPLERS)} or null")
        if self.compile != "auto" and not isinstance(self.compile, bool):
            raise ConfigError(f"training.compile must be auto, true or false, got {self.compile!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"unknown training.dtype {self.dtype!r}; expected 'auto' or one of {sorted(DTYPES)}")
        for name in ("batch_size", "accum", "snapshot_freq", "log_freq", "snapshot_freq_for_preemption"):
            check_number(f"training.{name}", getattr(self, name), whole=True, low=1)
        for name in ("n_iters", "eval_freq"):
            check_number(f"training.{name}", getattr(self, name), whole=True, low=0)
        check_number("training.ema", self.ema, low=0.0, high=1.0)
        check_number("training.sampling_eps", self.sampling_eps, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("training.seed", self.seed, whole=True)


@dataclass
class OptimConfig:
    weight_decay: float = 0.0
    optimizer: str = "AdamW"
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup: int = 2500
    grad_clip: float = 1.0  # <= 0: no clipping (the norm is still logged)

    def __post_init__(self):
        if self.optimizer not in ("AdamW", "Adam"):
            raise ConfigError(f"unknown optim.optimizer {self.optimizer!r}; expected 'AdamW' or 'Adam'")
        check_number("optim.lr", self.lr, low=0.0, low_open=True)
        check_number("optim.warmup", self.warmup, whole=True, low=0)
        check_number("optim.weight_decay", self.weight_decay, low=0.0)
        for name in ("beta1", "beta2"):
            check_number(f"optim.{name}", getattr(self, name), low=0.0, high=1.0, high_open=True)
        check_number("optim.eps", self.eps, low=0.0, low_open=True)
        check_number("optim.grad_clip", self.grad_clip)


@dataclass
class DataConfig:
    train: str = "openwebtext"
    valid: str | None = "wikitext103"  # null: no evaluation loss
    cache_dir: str = "data"
    num_proc: int | None = 8  # tokenisation workers for Hugging Face corpora

    def __post_init__(self):
        check_number("data.num_proc", self.num_proc, whole=True, low=1, optional=True)
        for key in ("train", "valid"):
            value = getattr(self, key)
            if value is not None and _names_a_path(str(value)) and not Path(value).expanduser().exists():
                raise ConfigError(f"data.{key}={value}: no such file or folder")


def _names_a_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith(DATA_FILE_SUFFIXES)


@dataclass
class SamplingConfig:
    predictor: str = "euler"  # passed to radd_fast.sampling.generate as `method`
    steps: int = 128
    noise_removal: bool = True  # published key; RADD's last step reveals every MASK anyway
    strategy: str = "direct"
    num_samples: int = 4  # per rank

    def __post_init__(self):
        check_number("sampling.steps", self.steps, whole=True, low=1)
        check_number("sampling.num_samples", self.num_samples, whole=True, low=1)
        try:  # every sampling option checked now, not at the first snapshot hours later
            self.sampler()
        except ValueError as e:
            raise ConfigError(f"sampling.predictor / sampling.strategy: {e}") from None

    def sampler(self) -> SamplerConfig:
        """The snapshot's options as the engine's typed config (the published ``predictor`` is the method)."""
        return SamplerConfig(steps=int(self.steps), method=self.predictor, strategy=self.strategy)


@dataclass
class TrainingEvalConfig:
    """The run config's ``eval:`` section: evaluation during training (not eval.py's ``evaluation.EvalConfig``)."""

    batch_size: int = 512  # global, split over ranks and evaluated in training.accum chunks
    perplexity: bool = True  # generative PPL of the snapshot samples
    perplexity_batch_size: int = 32
    perplexity_model: str = "gpt2-large"

    def __post_init__(self):
        check_number("eval.batch_size", self.batch_size, whole=True, low=1)
        check_number("eval.perplexity_batch_size", self.perplexity_batch_size, whole=True, low=1)


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "radd-fast"
    tensorboard: bool = False


SECTIONS = {"training": TrainingConfig, "optim": OptimConfig, "data": DataConfig, "sampling": SamplingConfig,
            "eval": TrainingEvalConfig, "logging": LoggingConfig}


@dataclass
class RunConfig:
    model: RADDConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: TrainingEvalConfig = field(default_factory=TrainingEvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tokenizer: str = "gpt2"
    raw: dict = field(default_factory=dict)  # the whole plain config, written to the run folder

    @classmethod
    def from_dict(cls, cfg: Any) -> "RunConfig":
        cfg = _to_plain(cfg)
        sections = {}
        for name, kind in SECTIONS.items():
            section = _to_plain(cfg.get(name) or {})
            valid = {f.name for f in dataclasses.fields(kind)}
            unknown = sorted(set(section) - valid)
            if unknown:
                raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid: {sorted(valid)}")
            sections[name] = kind(**section)
        return cls(model=RADDConfig.from_dict(cfg), tokenizer=str(cfg.get("tokenizer", "gpt2")), raw=cfg, **sections)
