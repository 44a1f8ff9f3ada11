"""The generative-perplexity suite (radd_fast/evaluation/gen_suite.py), offline: the protocol on the
suites' tiny model with a one-layer GPT-2 scorer built here (a byte-level BPE trained on the corpus
stand-ins): its table (E-NFE, unigram entropy, the paper's fp64 column), its plot, and that a run
killed in the middle of a sample chunk resumes to exactly the uninterrupted files and rows.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from radd_fast import load_model
from radd_fast.data import get_tokenizer
from radd_fast.evaluation import cli
from radd_fast.evaluation.gen_ppl import load_scorer, unigram_entropy
from radd_fast.evaluation.gen_suite import run_gen_suite, sample_steps, samples_path
from radd_fast.files import WriteError
from tests.support.eval_inputs import CORPUS_TEXTS, Stop, write_suite_corpus
from tests.support.faults import full_disk


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_suite_corpus(tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    pytest.importorskip("transformers", reason="the scorer is a transformers causal LM")
    tokenizers = pytest.importorskip("tokenizers", reason="the scorer's tokenizer is a tokenizers BPE")
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("scorer")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(CORPUS_TEXTS.values()) * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder

def gen_argv(corpus, scorer_dir, work_dir) -> list:
    return ["--suite", "gen_ppl", "--model_path", str(corpus / "model"), "--steps", "2,4", "--num_samples", "5",
            "--sample_chunk", "2", "--rows_in_flight", "4", "--length", "16", "--scorer", str(scorer_dir),
            "--work_dir", str(work_dir), "--device", "cpu", "--no_progress", "--seed", "3"]

def test_gen_ppl_suite_table_and_resume(corpus, scorer_dir, tmp_path, capsys):
    assert cli.main(gen_argv(corpus, scorer_dir, tmp_path / "whole")) == 0
    out = capsys.readouterr().out
    whole = json.loads((tmp_path / "whole" / "gen_ppl_suite.json").read_text())
    assert [r["steps"] for r in whole["rows"]] == [2, 4]
    for r in whole["rows"]:
        records = [json.loads(s) for s in samples_path(tmp_path / "whole", r["steps"]).read_text().splitlines()]
        assert [x["index"] for x in records] == list(range(5)) and all(len(x["ids"]) == 16 for x in records)
        assert r["num_samples"] == 5 and 0 < r["enfe"] <= r["steps"]
        assert r["enfe"] == pytest.approx(np.mean([x["enfe"] for x in records]))
        assert r["mean_entropy"] == pytest.approx(np.mean([unigram_entropy(x["ids"]) for x in records]))
        assert r["mean_entropy_bits"] == pytest.approx(r["mean_entropy"] / math.log(2))
        assert math.isfinite(r["mean_ppl"]) and r["std_ppl"] >= 0 and r["paper_fp64_gen_ppl"] is None
        assert f"| {r['steps']} | {r['mean_ppl']:.2f} |" in out
    assert "entropy (nats)" in out and "E-NFE" in out and "paper fp64 gen-PPL" in out
    png = tmp_path / "whole" / "gen_ppl_suite.png"
    try:
        import matplotlib  # noqa: F401

        assert png.exists() and png.stat().st_size > 0
    except ImportError:
        assert "plot skipped" in out

    # Killed after the first chunk of the 4-step samples, with half a line written: resumes to the same files.
    model, noise = load_model(str(corpus / "model"))
    settings = {**whole["settings"]}

    def kill(steps, chunk):
        if (steps, chunk) == (4, 0):
            with samples_path(tmp_path / "cut", 4).open("a") as fh:
                fh.write('{"index": 2, "ids": [1, 2')  # a kill in the middle of a write
            raise Stop

    scorer = load_scorer(str(scorer_dir), "cpu")
    (tmp_path / "cut").mkdir()
    with pytest.raises(Stop):
        run_gen_suite(model, noise, settings, scorer, get_tokenizer("bytes"), tmp_path / "cut", device="cpu",
                      progress=False, on_chunk=kill)
    assert len(samples_path(tmp_path / "cut", 4).read_text().splitlines()) == 3  # 2 whole lines + the cut one
    resumed = run_gen_suite(model, noise, settings, scorer, get_tokenizer("bytes"), tmp_path / "cut", device="cpu",
                            progress=False)
    for steps in (2, 4):
        assert samples_path(tmp_path / "cut", steps).read_bytes() == samples_path(tmp_path / "whole", steps).read_bytes()
    assert resumed["rows"] == whole["rows"]

def test_gen_ppl_suite_fails_fast_on_a_missing_scorer(corpus, tmp_path, capsys):
    pytest.importorskip("transformers", reason="the scorer is a transformers causal LM")
    argv = gen_argv(corpus, tmp_path / "no_such_scorer", tmp_path / "w")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: scorer ") and "is not a folder; pass --scorer" in err and "Traceback" not in err
    assert not list((tmp_path / "w").glob("samples_*.jsonl"))  # refused before any sampling


def test_a_full_disk_while_sampling_keeps_whole_lines_and_resumes_to_the_same_samples(corpus, tmp_path, monkeypatch):
    """The samples file on a full disk: one error naming it, whole lines only; with space again the
    suite resumes to exactly the samples of an uninterrupted run."""
    model, noise = load_model(str(corpus / "model"))
    settings = {"num_samples": 5, "chunk": 2, "length": 16, "method": "tweedie", "sampling_dtype": "float64",
                "rows_in_flight": 4, "seed": 3}
    for folder in ("whole", "cut"):
        (tmp_path / folder).mkdir()
    whole = sample_steps(model, noise, 2, settings, tmp_path / "whole")
    first_chunk = sum(len(json.dumps(r)) + 1 for r in whole[:2])
    with monkeypatch.context() as m:
        full_disk(m, tmp_path / "cut", free=first_chunk + 40)  # the second chunk's first line is cut
        with pytest.raises(WriteError) as e:
            sample_steps(model, noise, 2, settings, tmp_path / "cut")
    path = samples_path(tmp_path / "cut", 2)
    assert str(e.value) == (f"no space left on device while writing {path}: the lines written before are kept "
                            f"whole; free some space (or write elsewhere) and run again")
    assert [json.loads(s) for s in path.read_text().splitlines(keepends=True)] == whole[:2]
    assert sample_steps(model, noise, 2, settings, tmp_path / "cut") == whole
    assert path.read_text() == samples_path(tmp_path / "whole", 2).read_text()
