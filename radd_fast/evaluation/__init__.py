"""Evaluation: zero-shot perplexity (``evaluate_ppl``), the paper's zero-shot suite, and the
generative perplexity of samples (docs/EVALUATION.md); ``EvalConfig``, eval.py's options typed and checked."""
from ..errors import NonFiniteLossError
from .config import EvalConfig
from .gen_ppl import read_samples, score_samples, unigram_entropy
from .ppl import EXACT_LOSS_TYPES, LOSS_TYPES, PPLResult, check_loss_type, evaluate_ppl
from .protocol import EvalError

__all__ = ["evaluate_ppl", "PPLResult", "EvalConfig", "NonFiniteLossError", "EvalError", "check_loss_type", "LOSS_TYPES",
           "EXACT_LOSS_TYPES", "score_samples", "read_samples", "unigram_entropy"]
