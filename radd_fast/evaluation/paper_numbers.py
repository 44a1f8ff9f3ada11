"""The paper's numbers, as data: what our measurements are compared against.

Source: Ou et al., "Your Absorbing Discrete Diffusion Secretly Models the
Conditional Distributions of Clean Data", arXiv 2406.03736 (RADD).

- ``ZERO_SHOT_TABLE``: Table 1, zero-shot perplexity (upper bounds, lower is
  better) of the RADD-small models after 400k training iterations, 1024-token
  blocks; one row per published checkpoint, keyed by our dataset names
  (``lm1b`` is One Billion Words).
- ``GEN_PPL_FP64``: generative perplexity (GPT-2 large) of RADD-medium samples
  drawn with float64 Gumbel noise, by number of sampling steps.
- ``FP32_COUNTEREXAMPLE``: float32 Gumbel noise lowers gen-PPL by lowering the
  diversity of the samples (unigram entropy), which is why entropy is always
  printed beside gen-PPL (docs/EVALUATION.md).
"""
from __future__ import annotations

SOURCE = "Ou et al. 2024, RADD, arXiv 2406.03736"
ZERO_SHOT_DATASETS = ("lambada", "wikitext2", "ptb", "wikitext103", "lm1b")
DATASET_TITLES = {"lambada": "LAMBADA", "wikitext2": "WikiText2", "ptb": "PTB", "wikitext103": "WikiText103",
                  "lm1b": "1BW"}

ZERO_SHOT_TABLE = {
    "radd-t-dce": dict(zip(ZERO_SHOT_DATASETS, (50.56, 39.02, 109.03, 36.38, 72.60))),
    "radd-lambda-dce": dict(zip(ZERO_SHOT_DATASETS, (51.70, 39.98, 107.85, 37.98, 72.99))),
}
ZERO_SHOT_NOTE = "Table 1: RADD-small, 400k iterations, zero-shot PPL upper bounds"
# The loss each published checkpoint was trained (and is evaluated) with.
ROW_OF_LOSS = {"t_DCE": "radd-t-dce", "lambda_DCE": "radd-lambda-dce"}

GEN_PPL_STEPS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
GEN_PPL_FP64 = dict(zip(GEN_PPL_STEPS, (158, 113, 96, 89, 84, 83, 81, 81)))
GEN_PPL_NOTE = "RADD-medium, float64 Gumbel noise, GPT-2 large scorer"
FP32_COUNTEREXAMPLE = {"fp32": {"gen_ppl": 22, "entropy": 7.27}, "fp64": {"gen_ppl": 81, "entropy": 8.13}}


def paper_row(loss_type: str, model_path: str = "") -> str | None:
    """The Table 1 row to compare a model with: the published checkpoint named in its path, else the
    one trained with its loss type; None when neither matches."""
    name = str(model_path).lower().rstrip("/")
    for row in ZERO_SHOT_TABLE:
        if name.endswith(row):
            return row
    return ROW_OF_LOSS.get(loss_type)
