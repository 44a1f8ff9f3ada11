"""The zero-shot suite (radd_fast/evaluation/suite.py), offline: the paper's table on local stand-ins
for the five corpora.

Checked: the table (rows, splits, the model's own loss type, the paper's numbers and the
difference), the Monte Carlo standard errors against an independent computation, and that a
killed suite resumes at the dataset / batch where it stopped and ends with exactly the
uninterrupted result.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from radd_fast import load_model
from radd_fast.data import ByteTokenizer, load_blocks
from radd_fast.evaluation import cli
from radd_fast.evaluation.paper_numbers import ZERO_SHOT_DATASETS, ZERO_SHOT_TABLE
from radd_fast.evaluation.protocol import EvalError, derived_seed, detokenizer_of
from radd_fast.evaluation.suite import STATE_FILE, column_summary, run_zero_shot, table_markdown, write_results
from radd_fast.files import WriteError
from radd_fast.losses import get_loss_fn
from radd_fast.noise import get_noise
from tests.support.eval_inputs import SUITE_LENGTH, Stop, suite_argv, write_suite_corpus
from tests.support.faults import full_disk
from tests.support.models import suite_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_suite_corpus(tmp_path_factory.mktemp("suite"))


def independent_batches(corpus, name: str, split: str, n: int, b: int = 4) -> list:
    blocks = load_blocks(str(corpus / f"{name}.txt"), split, ByteTokenizer(), SUITE_LENGTH, cache_dir=corpus / "cache2",
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

def test_a_full_work_dir_prints_the_table_before_the_one_error(corpus, tmp_path, capsys, monkeypatch):
    assert cli.main(suite_argv(corpus, tmp_path / "w")) == 0
    results = json.loads((tmp_path / "w" / "zero_shot.json").read_text())
    capsys.readouterr()
    full = tmp_path / "full"
    full.mkdir()
    full_disk(monkeypatch, full)
    with pytest.raises(WriteError) as e:
        write_results(results, full)
    assert table_markdown(results) in capsys.readouterr().out
    assert str(e.value) == (f"no space left on device while writing {full / 'zero_shot.json'}: the results are "
                            f"printed above; free some space (or pass another --work_dir) to keep them in a file")
    assert list(full.iterdir()) == []


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
        ppl = math.exp(np.mean(means) / SUITE_LENGTH)
        assert row["ppl"] == pytest.approx(ppl, rel=1e-9)
        assert row["ppl_stderr"] == pytest.approx(ppl * math.sqrt(np.sum(variances)) / len(means) / SUITE_LENGTH, rel=1e-6)

def test_zero_shot_resumes_where_it_stopped(tmp_path):
    model = suite_model()
    noise = get_noise(model.config)
    gen = torch.Generator().manual_seed(3)
    data = {d: torch.randint(0, 256, (9, SUITE_LENGTH), generator=gen) for d in ("lambada", "ptb")}
    settings = {"model_path": "tiny", "loss_type": "t_DCE", "mc_timesteps": 2, "length": SUITE_LENGTH, "batch_size": 3,
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


def test_a_column_with_an_absurd_finite_loss_reports_an_infinite_ppl():
    """Mean losses of millions of nats per block (a diverged or corrupt model): PPL inf, no OverflowError."""
    col = {"batch_losses": [1e6, 2e6], "batch_vars": [1.0, 2.0], "loss_type": "lambda_DCE", "mc_timesteps": 2,
           "num_sequences": 8}
    summary = column_summary(col, SUITE_LENGTH)
    assert summary["mean_loss"] == 1.5e6 and summary["ppl"] == math.inf and summary["ppl_stderr"] == math.inf
