"""Evaluation: zero-shot perplexity (``evaluate_ppl``) and generative perplexity of samples."""
from .gen_ppl import read_samples, score_samples, unigram_entropy
from .ppl import EXACT_LOSS_TYPES, LOSS_TYPES, PPLResult, check_loss_type, evaluate_ppl

__all__ = ["evaluate_ppl", "PPLResult", "check_loss_type", "LOSS_TYPES", "EXACT_LOSS_TYPES",
           "score_samples", "read_samples", "unigram_entropy"]
