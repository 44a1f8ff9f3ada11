"""radd-fast: a fast, faithful implementation of RADD (arXiv 2406.03736)."""
from .checkpoint import CheckpointError, load_model
from .config import PRESETS, ConfigError, ModelConfig, NoiseConfig, RADDConfig
from .ema import ExponentialMovingAverage
from .evaluation import evaluate_ppl
from .integrations import register_with_transformers
from .losses import get_loss_fn
from .model import RADD
from .noise import GeometricNoise, LogLinearNoise, get_noise
from .sampling import DiffusionSampler, OrderedSampler, generate

__version__ = "0.1.0"

# transformers' AutoConfig / AutoModelForMaskedLM learn model type 'radd' when transformers loads
# (nothing is imported now: docs/INTEGRATIONS.md).
register_with_transformers()

__all__ = ["RADD", "RADDConfig", "ModelConfig", "NoiseConfig", "PRESETS", "ConfigError", "CheckpointError",
           "load_model", "get_noise", "LogLinearNoise", "GeometricNoise", "ExponentialMovingAverage",
           "get_loss_fn", "generate", "DiffusionSampler", "OrderedSampler", "evaluate_ppl"]
