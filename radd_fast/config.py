"""Typed configuration of a RADD model and its noise schedule.

Built from the published ``config.json`` (the whole run config as nested JSON;
unknown keys are ignored and recorded in ``extra``) or from a Hydra/OmegaConf
node. Validated on construction: a bad value raises ``ConfigError`` naming it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
NOISE_TYPES = ("loglinear", "geometric")
BACKENDS = ("reference", "fast", "auto")  # auto: fast on CUDA, reference elsewhere


class ConfigError(UserError):
    """A configuration value is missing or invalid."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None stays None; anything else raises."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "")
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


@dataclass
class ModelConfig:
    hidden_size: int = 768
    n_heads: int = 12
    n_blocks: int = 12
    length: int = 1024
    dropout: float = 0.02
    use_checkpoint: bool = False
    # The autocast dtype at inference (training uses training.dtype). Published configs say float16;
    # the published code falls back to bf16 when missing.
    dtype: str = "bfloat16"
    name: str = "small"
    type: str = "ddit_wot"
    scale_by_sigma: bool = False
    backend: str = "reference"  # auto: the fast kernels on CUDA, the reference ops elsewhere

    def __post_init__(self) -> None:
        if self.hidden_size <= 0 or self.n_heads <= 0 or self.n_blocks <= 0 or self.length <= 0:
            raise ConfigError(f"model sizes must be positive: hidden_size={self.hidden_size} n_heads={self.n_heads} "
                              f"n_blocks={self.n_blocks} length={self.length}")
        if self.hidden_size % self.n_heads:
            raise ConfigError(f"model.hidden_size {self.hidden_size} is not divisible by model.n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} (hidden_size / n_heads) is odd; rotary needs an even head dim")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown model.backend {self.backend!r}; expected one of {BACKENDS}")
        parse_dtype(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


@dataclass
class NoiseConfig:
    type: str = "loglinear"
    sigma_min: float = 1e-4
    sigma_max: float = 20.0
    eps: float = 1e-3  # loglinear only: the schedule stops at 1 - eps masked

    def __post_init__(self) -> None:
        if self.type not in NOISE_TYPES:
            raise ConfigError(f"unknown noise.type {self.type!r}; expected one of {NOISE_TYPES}")
        if self.type == "geometric" and not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"geometric noise needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")


@dataclass
class RADDConfig:
    tokens: int = 50257
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    # Everything else the run config carried (training, data, ...), kept so save_pretrained writes it back.
    extra: dict = field(default_factory=dict)
    ignored_keys: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ConfigError(f"tokens must be >= 1, got {self.tokens}")

    @property
    def vocab_size(self) -> int:
        """V = tokens + 1: the last id is the absorbing MASK token."""
        return self.tokens + 1

    @property
    def mask_id(self) -> int:
        return self.tokens

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "RADDConfig":
        """Build from the published nested config dict (or an OmegaConf node)."""
        cfg = _to_plain(cfg)
        if "tokens" not in cfg or "model" not in cfg:
            raise ConfigError(f"config has no 'tokens' or 'model' section (keys: {sorted(cfg)}); is this a RADD config?")
        model, ignored_m = _take_fields(ModelConfig, cfg["model"], "model")
        noise, ignored_n = _take_fields(NoiseConfig, cfg.get("noise", {}), "noise")
        extra = {k: v for k, v in cfg.items() if k not in ("tokens", "model", "noise")}
        return cls(tokens=int(cfg["tokens"]), model=model, noise=noise, extra=extra, ignored_keys=ignored_m + ignored_n)

    def to_dict(self) -> dict:
        """The nested dict written as config.json (published layout, extra sections kept)."""
        out = dict(self.extra)
        out["tokens"] = self.tokens
        out["model"] = dataclasses.asdict(self.model)
        out["noise"] = dataclasses.asdict(self.noise)
        return out


def _to_plain(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # omegaconf is only needed for Hydra runs
        pass
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"expected a mapping for the config, got {type(cfg).__name__}")
    return dict(cfg)


def _take_fields(kind: type, section: Any, prefix: str) -> tuple[Any, list]:
    section = _to_plain(section) if section is not None else {}
    names = {f.name for f in dataclasses.fields(kind)}
    known = {k: v for k, v in section.items() if k in names}
    ignored = [f"{prefix}.{k}" for k in section if k not in names]
    return kind(**known), ignored


# The named architectures, the one place their sizes are written: train.py's `model=tiny|small|medium`
# are these (radd_fast/training/cli.py registers them as Hydra's "model" group, with backend auto).
PRESETS = {
    "tiny": ModelConfig(hidden_size=64, n_heads=4, n_blocks=2, length=128, name="tiny"),
    "small": ModelConfig(hidden_size=768, n_heads=12, n_blocks=12, length=1024, name="small"),
    "medium": ModelConfig(hidden_size=1024, n_heads=16, n_blocks=24, length=1024, name="medium"),
}
