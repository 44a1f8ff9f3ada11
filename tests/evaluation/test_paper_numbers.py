"""The paper's numbers (radd_fast/evaluation/paper_numbers.py): the zero-shot table and the fp64
generative perplexities, as published."""
from __future__ import annotations

from radd_fast.evaluation.paper_numbers import GEN_PPL_FP64, ZERO_SHOT_TABLE


def test_paper_numbers_are_the_published_ones():
    assert ZERO_SHOT_TABLE["radd-t-dce"] == {"lambada": 50.56, "wikitext2": 39.02, "ptb": 109.03,
                                             "wikitext103": 36.38, "lm1b": 72.60}
    assert ZERO_SHOT_TABLE["radd-lambda-dce"] == {"lambada": 51.70, "wikitext2": 39.98, "ptb": 107.85,
                                                  "wikitext103": 37.98, "lm1b": 72.99}
    assert GEN_PPL_FP64 == {32: 158, 64: 113, 128: 96, 256: 89, 512: 84, 1024: 83, 2048: 81, 4096: 81}
