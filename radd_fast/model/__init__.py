from .model import RADD, logits_to_log_probs
from .ops import BACKENDS, FastOps, ReferenceOps, get_ops

__all__ = ["RADD", "logits_to_log_probs", "BACKENDS", "FastOps", "ReferenceOps", "get_ops"]
