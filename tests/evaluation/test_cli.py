"""The evaluation CLI in process (radd_fast/evaluation/cli.py, the ``main`` behind eval.py): seeded
runs on both backends, two CPU ranks against one, and every bad argument refused in one
``error: ...`` line, before the model is loaded where it can be; the zero-shot suite's own flags too.
A tiny byte-level model and a local text keep it offline (eval.py as a subprocess: tests/cli/test_eval.py).
"""
from __future__ import annotations

import json

import pytest

from radd_fast.evaluation import cli
from tests.support.eval_inputs import cli_args, suite_argv, write_eval_checkpoint, write_suite_corpus


@pytest.fixture
def fast_fallbacks(monkeypatch):
    """The fast backend with its PyTorch fallbacks (the Triton interpreter is far too slow here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")

@pytest.fixture(scope="module")
def eval_cli():
    """The CLI module behind eval.py (in-process: no interpreter start per call)."""
    return cli



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_eval_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_suite_corpus(tmp_path_factory.mktemp("suite"))


def test_cli_unwritable_work_dir_is_refused_before_evaluating(checkpoint, tmp_path, eval_cli, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    args = cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2")
    args[args.index("--work_dir") + 1] = str(tmp_path / "a_file" / "out")
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    assert eval_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write results to --work_dir {tmp_path / 'a_file' / 'out'}"), err

def test_cli_in_process_seeded_and_backends(checkpoint, tmp_path, eval_cli, fast_fallbacks, capsys):
    args = cli_args(checkpoint, tmp_path, "--loss_type", "t_DCE", "--max_batches", "2", "--monte_carlo_timesteps", "1")
    assert eval_cli.main(args) == 0
    first = json.loads((tmp_path / "out" / "eval_ppl_text_t_DCE.json").read_text())
    assert eval_cli.main(args + ["--backend", "fast"]) == 0
    fast = json.loads((tmp_path / "out" / "eval_ppl_text_t_DCE.json").read_text())
    assert fast["settings"]["backend"] == "fast" and first["settings"]["backend"] == "reference"
    assert fast["batch_losses"] == pytest.approx(first["batch_losses"], rel=1e-5)  # one draw per forward, same seed
    assert "Evaluation PPL:" in capsys.readouterr().out

@pytest.mark.parametrize("extra, message", [
    (["--valid_dataset", "no_such_corpus"], "unknown dataset 'no_such_corpus'"),
    (["--length", "64"], "larger than the model's length 32"),
    (["--loss_type", "bogus"], "unknown loss type 'bogus'"),
    (["--loss_type", "ar_random", "--monte_carlo_timesteps", "3"], "monte_carlo_timesteps 1"),
    (["--model_path", "/no/such/folder"], "no such checkpoint folder"),
    (["--engine", "fast"], "use --backend reference|fast for the kernels and --mc_batching"),
    (["--batch_size", "5", "--ngpus", "2"], "--batch_size 5 (the global batch) is not divisible by --ngpus 2"),
])
def test_cli_errors(checkpoint, tmp_path, eval_cli, capsys, extra, message):
    assert eval_cli.main(cli_args(checkpoint, tmp_path) + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err

def test_cli_text_shorter_than_one_block(checkpoint, tmp_path, eval_cli, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert eval_cli.main(cli_args(checkpoint, tmp_path) + ["--valid_dataset", str(short)]) == 2
    assert "fewer than one block" in capsys.readouterr().err

def test_cli_two_cpu_ranks_match_one(checkpoint, tmp_path, eval_cli):
    """--ngpus 2 on CPU (gloo): the exact ar_forward loss must not depend on the number of ranks."""
    args = cli_args(checkpoint, tmp_path, "--loss_type", "ar_forward", "--length", "4")
    assert eval_cli.main(args + ["--batch_size", "4", "--max_batches", "2"]) == 0
    one = json.loads((tmp_path / "out" / "eval_ppl_text_ar_forward.json").read_text())
    # --batch_size is the GLOBAL batch: 8 over 2 ranks is 4 per rank, the same batches as above
    assert eval_cli.main(args + ["--batch_size", "8", "--max_batches", "1", "--ngpus", "2"]) == 0
    two = json.loads((tmp_path / "out" / "eval_ppl_text_ar_forward.json").read_text())
    assert two["settings"]["world_size"] == 2 and two["num_batches"] == 2 and one["num_batches"] == 2
    assert two["batch_losses"] == pytest.approx(one["batch_losses"], rel=1e-6)
    assert two["num_sequences"] == one["num_sequences"] == 8

@pytest.mark.parametrize("extra,needle", [(["--device", "foo"], "unknown device 'foo'"),
                                          (["--device", "cuda:7"], "--device"),
                                          (["--max_batches", "0"], "--max_batches must be >= 1"),
                                          (["--token_budget", "-1"], "--token_budget must be >= 1"),
                                          (["--cuda_graphs"], "--cuda_graphs: cuda_graphs=True needs --static_rows"),
                                          (["--cuda_graphs", "--static_rows", "--device", "cpu"],
                                           "--cuda_graphs: cuda_graphs=True needs a CUDA device")])
def test_cli_bad_counts_and_devices_are_one_line_before_the_model(checkpoint, tmp_path, eval_cli, capsys,
                                                                  monkeypatch, extra, needle):
    args = cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2", *extra)
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    assert eval_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


# -- the zero-shot suite's flags ---------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--datasets", "lambada,nope"], "unknown corpus 'nope'"),
    (["--dataset_files", "ptb"], "expects NAME=PATH"),
    (["--ngpus", "2"], "runs on one device"),
])
def test_zero_shot_errors(corpus, tmp_path, capsys, extra, message):
    assert cli.main(suite_argv(corpus, tmp_path / "w") + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
