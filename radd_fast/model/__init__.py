from .model import RADD, logits_to_log_probs
from .ops import ReferenceOps, get_ops

__all__ = ["RADD", "logits_to_log_probs", "ReferenceOps", "get_ops"]
