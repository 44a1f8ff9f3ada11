"""What the evaluation CLI and suite tests run on: a saved evaluation checkpoint with a short local
text (eval.py), the local stand-ins for the five zero-shot corpora with the suites' model, and the
argument lists for both. All offline."""
from __future__ import annotations

from pathlib import Path

from tests.support.models import EVAL_LENGTH, eval_model, suite_model


# -- eval.py on one text --------------------------------------------------------------------------------
def write_eval_checkpoint(folder: Path) -> Path:
    """``folder/model`` (the evaluation model) and ``folder/text.txt`` (a short English text)."""
    eval_model().save_pretrained(folder / "model")
    text = folder / "text.txt"
    text.write_text("A little text about a quick brown fox and a lazy dog, told twice. " * 6)
    return folder


def cli_args(ckpt: Path, tmp_path: Path, *extra) -> list:
    return ["--model_path", str(ckpt / "model"), "--valid_dataset", str(ckpt / "text.txt"), "--batch_size", "4",
            "--length", str(EVAL_LENGTH), "--work_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--device", "cpu", "--no_progress", *extra]


# -- the suites on local stand-ins for the five corpora ---------------------------------------------------
SUITE_LENGTH = 8
CORPUS_TEXTS = {
    "lambada": "\u201cCome in,\u201d she said, and the old man walked into the warm kitchen at last. " * 3,
    "wikitext2": " = = History = = \n The city 's walls , built in 1 @,@ 200 , stood well @-@ kept . " * 3,
    "ptb": "the company 's shares rose N N points and it does n't plan a $ N million sale \n " * 3,
    "wikitext103": " = Early life = \n He was born in the ( old ) town , near the river . " * 3,
    "lm1b": "He said : \" it is fine \" , then left . It 's late ! " * 3,
}


class Stop(Exception):
    """Raised from a callback: stands in for a kill between two batches."""


def write_suite_corpus(folder: Path) -> Path:
    """``folder/model`` (the suites' model, loss t_DCE) and ``folder/<corpus>.txt`` for each stand-in."""
    suite_model().save_pretrained(folder / "model")
    for name, text in CORPUS_TEXTS.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def suite_argv(corpus, work_dir, *extra) -> list:
    files = [f"{name}={corpus / f'{name}.txt'}" for name in CORPUS_TEXTS]
    return ["--suite", "zero_shot", "--model_path", str(corpus / "model"), "--dataset_files", *files,
            "--batch_size", "4", "--length", str(SUITE_LENGTH), "--monte_carlo_timesteps", "3", "--max_batches", "2",
            "--work_dir", str(work_dir), "--cache_dir", str(corpus / "cache"), "--device", "cpu", "--no_progress",
            *extra]
