"""The published evaluation protocol (radd_fast/evaluation/protocol.py): which split, detokenizer and
hub dataset each corpus uses, and the loss type (and paper row) a model is evaluated with."""
from __future__ import annotations

from radd_fast.data import (
    DETOKENIZERS,
    HF_CORPORA,
    lambada_detokenizer,
    lm1b_detokenizer,
    ptb_detokenizer,
    wikitext_detokenizer,
)
from radd_fast.evaluation.paper_numbers import paper_row
from radd_fast.evaluation.protocol import PUBLISHED_SPLITS, detokenizer_of, model_loss_type, published_split
from tests.support.models import suite_model


def test_each_corpus_uses_the_published_split_and_detokenizer():
    """The published evaluation reads WikiText2's TRAIN split and the others' test split."""
    assert PUBLISHED_SPLITS == {"lambada": "test", "wikitext2": "train", "ptb": "test", "wikitext103": "test",
                                "lm1b": "test"}
    assert published_split("input.txt") == "test"
    expected = {"lambada": lambada_detokenizer, "wikitext2": wikitext_detokenizer, "ptb": ptb_detokenizer,
                "wikitext103": wikitext_detokenizer, "lm1b": lm1b_detokenizer}
    for name, detok in expected.items():
        assert detokenizer_of(name) is detok and DETOKENIZERS[name] is detok
        assert PUBLISHED_SPLITS[name] in HF_CORPORA[name].splits
    hub = {name: (HF_CORPORA[name].path, HF_CORPORA[name].name, HF_CORPORA[name].text_field,
                  HF_CORPORA[name].splits[PUBLISHED_SPLITS[name]]) for name in expected}
    assert hub == {"lambada": ("EleutherAI/lambada_openai", "default", "text", "test"),  # OpenAI's LAMBADA test set
                   "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", "train"),
                   "ptb": ("ptb_text_only", None, "sentence", "test"),
                   "wikitext103": ("wikitext", "wikitext-103-raw-v1", "text", "test"),
                   "lm1b": ("lm1b", None, "text", "test")}


def test_the_model_decides_its_loss_and_paper_row():
    assert model_loss_type(suite_model("k_DCE").config, "anything") == "k_DCE"  # recorded by training
    assert model_loss_type(suite_model(None).config, "JingyangOu/radd-t-dce") == "t_DCE"
    assert model_loss_type(suite_model(None).config, "JingyangOu/radd-lambda-dce") == "lambda_DCE"
    assert paper_row("lambda_DCE", "/models/radd-t-dce/") == "radd-t-dce"  # the checkpoint's name wins
    assert paper_row("lambda_DCE", "runs/mine") == "radd-lambda-dce" and paper_row("k_DCE", "runs/mine") is None
