"""EvalConfig (radd_fast/evaluation/config.py): eval.py's flags typed and checked once, the machine's
defaults settled before any model is read, the model's own filled in after loading, and the records
the result files keep."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from radd_fast.evaluation import EvalConfig, EvalError
from radd_fast.evaluation import cli as eval_cli
from radd_fast.evaluation.paper_numbers import GEN_PPL_STEPS, ZERO_SHOT_DATASETS
from tests.support.models import eval_model, suite_model


def from_flags(tmp_path, *flags) -> EvalConfig:
    args = ["--device", "cpu", "--work_dir", str(tmp_path / "out"), *flags]
    return EvalConfig.from_flags(eval_cli.build_parser().parse_args(args))


def test_from_flags_types_the_flags_and_settles_the_defaults(tmp_path):
    cfg = from_flags(tmp_path)
    assert cfg.mode == "ppl"
    assert (cfg.loss_type, cfg.monte_carlo_timesteps, cfg.split) == ("lambda_DCE", 1024, "test")  # ptb: test split
    assert (cfg.device, cfg.backend, cfg.mc_batching) == ("cpu", "reference", False)  # CPU: the published loop
    assert cfg.datasets == ZERO_SHOT_DATASETS and cfg.steps == GEN_PPL_STEPS and cfg.dataset_files == {}
    assert (tmp_path / "out").is_dir()  # created and proved writable before any model work
    exact = from_flags(tmp_path, "--loss_type", "ar_forward", "--valid_dataset", "wikitext2")
    assert (exact.monte_carlo_timesteps, exact.split) == (1, "train")  # one draw for an exact loss; wikitext2: train


def test_the_suite_flags_are_parsed_from_their_formats(tmp_path):
    corpus = tmp_path / "ptb.txt"
    corpus.write_text("text")
    cfg = from_flags(tmp_path, "--suite", "gen_ppl", "--steps", "8, 16,", "--datasets", "ptb,,lambada",
                     "--dataset_files", f"ptb={corpus}")
    assert cfg.mode == "gen_ppl_suite"
    assert cfg.steps == (8, 16) and cfg.datasets == ("ptb", "lambada") and cfg.dataset_files == {"ptb": str(corpus)}


def test_every_flag_is_recorded_in_the_parsers_order_and_form(tmp_path):
    """One dataset's result file records every flag as resolved (not --no_progress, not the removed
    --engine), in the order and the form eval.py takes them."""
    cfg = from_flags(tmp_path, "--steps", "8,16")
    parser_order = [a.dest for a in eval_cli.build_parser()._actions if a.dest not in ("help", "engine", "no_progress")]
    flags = cfg.flags()
    assert list(flags) == parser_order
    assert flags["steps"] == "8,16" and flags["datasets"] == ",".join(ZERO_SHOT_DATASETS)
    assert flags["dataset_files"] == [] and flags["loss_type"] == "lambda_DCE" and flags["device"] == "cpu"


def test_the_suites_settings_are_what_their_resume_compares(tmp_path):
    cfg = from_flags(tmp_path, "--suite", "zero_shot", "--loss_type", "t_DCE", "--length", "8").with_model(eval_model())
    assert cfg.zero_shot_settings() == {
        "model_path": "JingyangOu/radd-lambda-dce", "loss_type": "t_DCE", "mc_timesteps": 1024, "length": 8,
        "batch_size": 16, "seed": 0, "datasets": list(ZERO_SHOT_DATASETS), "dataset_files": {}, "ar_column": None,
        "mc_batching": False, "token_budget": None, "max_batches": None, "tokenizer": "bytes", "split": None,
        "backend": "reference", "dtype": None}
    gen = from_flags(tmp_path, "--suite", "gen_ppl", "--steps", "4,8").with_model(eval_model())
    assert gen.gen_suite_settings() == {
        "model_path": "JingyangOu/radd-lambda-dce", "steps": [4, 8], "num_samples": 1024, "length": 32, "chunk": 256,
        "rows_in_flight": 64, "method": "tweedie", "sampling_dtype": "float64", "seed": 0, "scorer": "gpt2-large",
        "score_batch_size": 8, "tokenizer": "bytes"}


def test_with_model_fills_the_length_the_tokenizer_and_the_suites_own_loss(tmp_path):
    cfg = from_flags(tmp_path, "--suite", "zero_shot")
    assert (cfg.length, cfg.tokenizer, cfg.loss_type) == (None, None, None)  # only the model knows them
    own = cfg.with_model(suite_model("t_DCE"))
    assert (own.length, own.tokenizer, own.loss_type, own.monte_carlo_timesteps) == (32, "bytes", "t_DCE", 1024)
    with pytest.raises(EvalError, match=r"--length 64 is larger than the model's length 32"):
        from_flags(tmp_path, "--length", "64").with_model(eval_model())


@pytest.mark.parametrize("flags, message", [
    (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),
    (["--max_batches", "-1"], "--max_batches must be >= 1, got -1"),
    (["--length", "0"], "--length must be >= 1, got 0"),
    (["--steps", "a,b"], "--steps expects comma-separated whole numbers, got 'a,b'"),
    (["--steps", "8,0"], "--steps needs step counts >= 1, got '8,0'"),
    (["--dataset_files", "ptb"], "--dataset_files expects NAME=PATH, got 'ptb'"),
    (["--dataset_files", "ptb=/no/such/file"], "--dataset_files ptb: no such file /no/such/file"),
    (["--suite", "zero_shot", "--ngpus", "2"], "--suite zero_shot runs on one device: use --ngpus 1"),
    (["--suite", "zero_shot", "--datasets", "nope"], "--datasets: unknown corpus 'nope'"),
    (["--suite", "zero_shot", "--loss_type", "ar_forward", "--monte_carlo_timesteps", "3"], "monte_carlo_timesteps 1"),
    (["--batch_size", "5", "--ngpus", "2"], "--batch_size 5 (the global batch) is not divisible by --ngpus 2"),
    (["--valid_dataset", "no_such_corpus"], "unknown dataset 'no_such_corpus'"),
    (["--engine", "fast"], "--engine is gone"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--cuda_graphs"], "--cuda_graphs: cuda_graphs=True needs --static_rows"),
])
def test_a_bad_value_is_an_eval_error_naming_its_flag_before_the_work_dir(tmp_path, flags, message):
    with pytest.raises(EvalError) as err:
        from_flags(tmp_path, *flags)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything is created


def test_a_samples_file_settles_only_the_device(tmp_path):
    """Scoring samples needs no RADD model: its backend, Monte Carlo batching and the RADD model's
    --cuda_graphs are not read (as before EvalConfig)."""
    cfg = from_flags(tmp_path, "--gen_ppl", "samples.jsonl", "--cuda_graphs")
    assert cfg.mode == "score_samples" and (cfg.device, cfg.backend, cfg.mc_batching) == ("cpu", None, None)
    assert cfg.samples_settings() == {"samples": "samples.jsonl", "eval_model": "gpt2-large", "tokenizer": "gpt2",
                                      "device": "cpu"}


def test_a_copy_is_checked_again(tmp_path):
    cfg = from_flags(tmp_path)
    with pytest.raises(EvalError, match="--token_budget must be >= 1"):
        cfg.replace(token_budget=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1


@pytest.mark.parametrize("flags, mode", [([], "ppl"), (["--suite", "zero_shot"], "zero_shot"),
                                         (["--suite", "gen_ppl"], "gen_ppl_suite"),
                                         (["--suite", "zero_shot", "--gen_ppl", "s.jsonl"], "score_samples")])
def test_the_flags_pick_one_mode(tmp_path, flags, mode):
    assert from_flags(tmp_path, *flags).mode == mode


def test_a_bad_flag_is_one_eval_error_line(capsys):
    with pytest.raises(EvalError, match="unrecognized arguments: --bogus"):
        eval_cli.build_parser().parse_args(["--bogus"])
    assert eval_cli.main(["--bogus"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: unrecognized arguments: --bogus"]
    assert isinstance(eval_cli.build_parser(), argparse.ArgumentParser)
