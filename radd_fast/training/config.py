"""Typed run configuration: the published Hydra keys (spec 8), validated on construction.

``RunConfig.from_dict`` takes the composed Hydra config (or a plain nested dict,
as the tests pass) and builds one dataclass per section. Published keys keep
their names and meanings; the extra keys are documented in configs/config.yaml.
A misspelt key inside a known section raises ``ConfigError`` naming the valid keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import DTYPES, ConfigError, RADDConfig, _to_plain
from ..losses import LOSS_TYPES, TIME_SAMPLERS


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
    compile: bool = False
    seed: int = 42
    progress: bool = True

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"unknown training.loss_type {self.loss_type!r}; expected one of {list(LOSS_TYPES)}")
        if self.time_sampler is not None and self.time_sampler not in TIME_SAMPLERS:
            raise ConfigError(f"unknown training.time_sampler {self.time_sampler!r}; expected one of "
                              f"{sorted(TIME_SAMPLERS)} or null")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"unknown training.dtype {self.dtype!r}; expected 'auto' or one of {sorted(DTYPES)}")
        for name in ("batch_size", "accum", "snapshot_freq", "log_freq", "snapshot_freq_for_preemption"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_iters < 0 or self.eval_freq < 0:
            raise ConfigError(f"training.n_iters and training.eval_freq must be >= 0, got {self.n_iters}, "
                              f"{self.eval_freq}")
        if not 0.0 <= self.ema <= 1.0:
            raise ConfigError(f"training.ema must be in [0, 1], got {self.ema}")


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
        if self.lr <= 0 or self.warmup < 0:
            raise ConfigError(f"optim.lr must be > 0 and optim.warmup >= 0, got {self.lr}, {self.warmup}")


@dataclass
class DataConfig:
    train: str = "openwebtext"
    valid: str | None = "wikitext103"  # null: no evaluation loss
    cache_dir: str = "data"
    num_proc: int | None = 8  # tokenisation workers for Hugging Face corpora


@dataclass
class SamplingConfig:
    predictor: str = "euler"  # passed to radd_fast.sampling.generate as `method`
    steps: int = 128
    noise_removal: bool = True  # published key; RADD's last step reveals every MASK anyway
    strategy: str = "direct"
    num_samples: int = 4  # per rank


@dataclass
class EvalConfig:
    batch_size: int = 512  # global, split over ranks and evaluated in training.accum chunks
    perplexity: bool = True  # generative PPL of the snapshot samples
    perplexity_batch_size: int = 32
    perplexity_model: str = "gpt2-large"


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "radd-fast"
    tensorboard: bool = False


SECTIONS = {"training": TrainingConfig, "optim": OptimConfig, "data": DataConfig, "sampling": SamplingConfig,
            "eval": EvalConfig, "logging": LoggingConfig}


@dataclass
class RunConfig:
    model: RADDConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
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
