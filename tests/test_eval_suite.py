"""The paper-reproduction suites, offline: the zero-shot table on local stand-ins for the five
corpora, and the generative-perplexity protocol with a tiny causal LM built here.

Checked: the table (rows, splits, the model's own loss type, the paper's numbers and the
difference), the Monte Carlo standard errors against an independent computation, and that a
killed suite resumes at the dataset / batch (or sample chunk) where it stopped and ends with
exactly the uninterrupted result.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from radd_fast import RADD, RADDConfig, load_model
from radd_fast.config import ModelConfig
from radd_fast.data import ByteTokenizer, get_tokenizer, load_blocks
from radd_fast.evaluation import cli
from radd_fast.evaluation.gen_ppl import load_scorer, unigram_entropy
from radd_fast.evaluation.gen_suite import run_gen_suite, samples_path
from radd_fast.evaluation.paper_numbers import GEN_PPL_FP64, ZERO_SHOT_DATASETS, ZERO_SHOT_TABLE, paper_row
from radd_fast.evaluation.protocol import EvalError, derived_seed, detokenizer_of, model_loss_type
from radd_fast.evaluation.suite import STATE_FILE, run_zero_shot
from radd_fast.losses import get_loss_fn
from radd_fast.noise import get_noise

L = 8
TEXTS = {
    "lambada": "\u201cCome in,\u201d she said, and the old man walked into the warm kitchen at last. " * 3,
    "wikitext2": " = = History = = \n The city 's walls , built in 1 @,@ 200 , stood well @-@ kept . " * 3,
    "ptb": "the company 's shares rose N N points and it does n't plan a $ N million sale \n " * 3,
    "wikitext103": " = Early life = \n He was born in the ( old ) town , near the river . " * 3,
    "lm1b": "He said : \" it is fine \" , then left . It 's late ! " * 3,
}


class Stop(Exception):
    """Raised from a callback: stands in for a kill between two batches."""


def tiny_model(loss_type: str | None = "t_DCE") -> RADD:
    torch.manual_seed(0)
    extra = {"training": {"loss_type": loss_type}} if loss_type else {}
    cfg = RADDConfig(tokens=256, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=32, dropout=0.0),
                     extra=extra)
    model = RADD(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("suite")
    tiny_model().save_pretrained(folder / "model")
    for name, text in TEXTS.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def suite_argv(corpus, work_dir, *extra) -> list:
    files = [f"{name}={corpus / f'{name}.txt'}" for name in TEXTS]
    return ["--suite", "zero_shot", "--model_path", str(corpus / "model"), "--dataset_files", *files,
            "--batch_size", "4", "--length", str(L), "--monte_carlo_timesteps", "3", "--max_batches", "2",
            "--work_dir", str(work_dir), "--cache_dir", str(corpus / "cache"), "--device", "cpu", "--no_progress",
            *extra]


def independent_batches(corpus, name: str, split: str, n: int, b: int = 4) -> list:
    blocks = load_blocks(str(corpus / f"{name}.txt"), split, ByteTokenizer(), L, cache_dir=corpus / "cache2",
                         detokenizer=detokenizer_of(name))
    x = torch.from_numpy(blocks[np.arange(len(blocks))])
    return list(x.split(b))[:n]


def test_zero_shot_table_on_local_stand_ins(corpus, tmp_path, capsys):
    assert cli.main(suite_argv(corpus, tmp_path / "w", "--ar_column", "ar_forward")) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "w" / "zero_shot.json").read_text())
    md = (tmp_path / "w" / "zero_shot.md").read_text()
    assert res["settings"]["loss_type"] == "t_DCE" and res["paper_row"] == "radd-t-dce"  # the model's own loss
    assert [r["dataset"] for r in res["rows"]] == list(ZERO_SHOT_DATASETS)
    assert {r["dataset"]: r["split"] for r in res["rows"]} == {"lambada": "test", "wikitext2": "train", "ptb": "test",
                                                               "wikitext103": "test", "lm1b": "test"}
    for r in res["rows"]:
        assert r["paper"] == ZERO_SHOT_TABLE["radd-t-dce"][r["dataset"]]
        assert r["difference"] == pytest.approx(r["ppl"] - r["paper"])
        assert r["num_blocks"] == 8 and r["columns"]["bound"]["num_batches"] == 2
        assert r["ppl_stderr"] > 0 and r["columns"]["ar_forward"]["ppl_stderr"] == 0.0
        assert math.isfinite(r["columns"]["ar_forward"]["ppl"])
    header = "| dataset | split | blocks | ours (t_DCE, 3 draws) | MC s.e. | paper (radd-t-dce) | difference | ar_forward (exact) |"
    assert header in md and header in out
    assert "| WikiText2 | train | 8 |" in md and "| 1BW | test | 8 |" in md
    assert "wikitext2: split train, 8 blocks of 8 tokens in 2 batches" in out


def test_zero_shot_standard_errors_match_an_independent_computation(corpus, tmp_path):
    """The published loop by hand (one draw per forward, the suite's per-batch seeds), then the delta
    method in numpy: se(PPL) = PPL * sqrt(sum_b var_b) / n / L, var_b = draw variance / draws."""
    assert cli.main(suite_argv(corpus, tmp_path / "w", "--datasets", "wikitext2,ptb")) == 0
    res = json.loads((tmp_path / "w" / "zero_shot.json").read_text())
    model, noise = load_model(str(corpus / "model"))
    loss_fn = get_loss_fn(noise, model.vocab_size, train=False, loss_type="t_DCE")
    for row in res["rows"]:
        means, variances = [], []
        for i, x in enumerate(independent_batches(corpus, row["dataset"], row["split"], 2)):
            torch.manual_seed(derived_seed(0, row["dataset"], "bound", i))
            with torch.no_grad():
                draws = np.array([loss_fn(model.eval(), x).double().mean().item() for _ in range(3)])
            means.append(draws.mean())
            variances.append(draws.var(ddof=1) / 3)
        ppl = math.exp(np.mean(means) / L)
        assert row["ppl"] == pytest.approx(ppl, rel=1e-9)
        assert row["ppl_stderr"] == pytest.approx(ppl * math.sqrt(np.sum(variances)) / len(means) / L, rel=1e-6)


def test_zero_shot_resumes_where_it_stopped(tmp_path):
    model = tiny_model()
    noise = get_noise(model.config)
    gen = torch.Generator().manual_seed(3)
    data = {d: torch.randint(0, 256, (9, L), generator=gen) for d in ("lambada", "ptb")}
    settings = {"model_path": "tiny", "loss_type": "t_DCE", "mc_timesteps": 2, "length": L, "batch_size": 3,
                "seed": 1, "datasets": ["lambada", "ptb"], "ar_column": "ar_backward", "mc_batching": False,
                "token_budget": None, "max_batches": None}
    blocks_of = lambda d: (data[d], "test", "in memory")  # noqa: E731
    whole = run_zero_shot(model, noise, settings, blocks_of, tmp_path / "whole", progress=False)

    seen = []

    def kill_after(dataset, column, i):
        seen.append((dataset, column, i))
        if (dataset, column, i) == ("ptb", "bound", 1):
            raise Stop

    (tmp_path / "cut").mkdir()
    with pytest.raises(Stop):
        run_zero_shot(model, noise, settings, blocks_of, tmp_path / "cut", progress=False, on_batch=kill_after)
    state = json.loads((tmp_path / "cut" / STATE_FILE).read_text())
    assert state["datasets"]["lambada"]["done"] and len(state["datasets"]["ptb"]["bound"]["batch_losses"]) == 2
    seen.clear()
    resumed = run_zero_shot(model, noise, settings, blocks_of, tmp_path / "cut", progress=False, on_batch=kill_after)
    assert seen == [("ptb", "bound", 2)] + [("ptb", "ar_backward", i) for i in range(3)]  # only what was left
    assert resumed["rows"] == whole["rows"]
    # the same folder with other settings is refused, naming what changed
    with pytest.raises(EvalError, match=r"other settings \(mc_timesteps\)"):
        run_zero_shot(model, noise, {**settings, "mc_timesteps": 4}, blocks_of, tmp_path / "cut", progress=False)


@pytest.mark.parametrize("extra, message", [
    (["--datasets", "lambada,nope"], "unknown corpus 'nope'"),
    (["--dataset_files", "ptb"], "expects NAME=PATH"),
    (["--ngpus", "2"], "runs on one device"),
])
def test_zero_shot_errors(corpus, tmp_path, capsys, extra, message):
    assert cli.main(suite_argv(corpus, tmp_path / "w") + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


# -- generative perplexity -----------------------------------------------------------------------------
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
    bpe.train_from_iterator(list(TEXTS.values()) * 4, trainer)
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


def test_a_hub_scorer_offline_fails_at_once(monkeypatch):
    """No network (HF_HUB_OFFLINE) and not cached: one line saying what to pass, no hub retries."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # not cached here
    with pytest.raises(EvalError, match="HF_HUB_OFFLINE is set; pass --scorer <local folder"):
        load_scorer("gpt2-large", "cpu")


def test_the_model_decides_its_loss_and_paper_row():
    assert model_loss_type(tiny_model("k_DCE").config, "anything") == "k_DCE"  # recorded by training
    assert model_loss_type(tiny_model(None).config, "JingyangOu/radd-t-dce") == "t_DCE"
    assert model_loss_type(tiny_model(None).config, "JingyangOu/radd-lambda-dce") == "lambda_DCE"
    assert paper_row("lambda_DCE", "/models/radd-t-dce/") == "radd-t-dce"  # the checkpoint's name wins
    assert paper_row("lambda_DCE", "runs/mine") == "radd-lambda-dce" and paper_row("k_DCE", "runs/mine") is None


def test_paper_numbers_are_the_published_ones():
    assert ZERO_SHOT_TABLE["radd-t-dce"] == {"lambada": 50.56, "wikitext2": 39.02, "ptb": 109.03,
                                             "wikitext103": 36.38, "lm1b": 72.60}
    assert ZERO_SHOT_TABLE["radd-lambda-dce"] == {"lambada": 51.70, "wikitext2": 39.98, "ptb": 107.85,
                                                  "wikitext103": 37.98, "lm1b": 72.99}
    assert GEN_PPL_FP64 == {32: 158, 64: 113, 128: 96, 256: 89, 512: 84, 1024: 83, 2048: 81, 4096: 81}
