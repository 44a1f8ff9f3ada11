"""eval.py as a user runs it (a subprocess): a seeded evaluation end to end, its printed line and JSON,
and a NaN checkpoint failing in one error line with no traceback; a full disk (tests/support/faults.py)
under --work_dir or --cache_dir is one error line naming the file, after the PPL, and leaves no file."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from radd_fast.checkpoint import file_sha256
from tests.support.checkpoints import flip_bytes
from tests.support.eval_inputs import cli_args, write_eval_checkpoint
from tests.support.faults import full_disk_env
from tests.support.models import EVAL_LENGTH, eval_model
from tests.support.paths import REPO

ROOT = REPO


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_eval_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_cli_end_to_end(checkpoint, tmp_path):
    cmd = [sys.executable, str(ROOT / "eval.py"), *cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2",
                                                             "--seed", "5")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [s for s in proc.stdout.splitlines() if s.startswith("Evaluation PPL: ")]
    assert line, proc.stdout
    result = json.loads((tmp_path / "out" / "eval_ppl_text_lambda_DCE.json").read_text())
    assert float(line[0].split(": ")[1]) == pytest.approx(result["ppl"])
    assert result["ppl"] == pytest.approx(math.exp(sum(result["batch_losses"]) / len(result["batch_losses"]) / EVAL_LENGTH))
    s = result["settings"]
    assert (s["loss_type"], s["monte_carlo_timesteps"], s["length"], s["seed"], s["backend"], s["tokenizer"]) == \
        ("lambda_DCE", 2, EVAL_LENGTH, 5, "reference", "bytes")
    assert (s["split"], s["mc_batching"], s["batch_size"]) == ("test", False, 4)
    assert result["num_batches"] == len(result["batch_losses"]) > 0
    n_blocks = len((checkpoint / "text.txt").read_bytes()) // EVAL_LENGTH  # one document + EOS, cut into blocks
    assert f"split test, {n_blocks} blocks of {EVAL_LENGTH} tokens; evaluating {n_blocks} blocks in " in proc.stdout
    assert result["num_sequences"] == n_blocks and result["ppl_stderr"] > 0

@pytest.mark.parametrize("extra, tail", [
    ([], " (--max_batches N stops after N batches)"),
    (["--max_batches", "2"], ""),
])
def test_cli_says_how_much_it_will_evaluate_before_it_starts(checkpoint, tmp_path, extra, tail):
    """Before the first batch: the blocks, the batches and the Monte Carlo draws (a whole training file can
    take long), and how to bound it when it is not bounded; --max_batches 2 evaluates 2 batches."""
    cmd = [sys.executable, str(ROOT / "eval.py"), *cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2",
                                                             *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    n_blocks = len((checkpoint / "text.txt").read_bytes()) // EVAL_LENGTH
    used = 2 if extra else -(-n_blocks // 4)
    first = proc.stdout.splitlines()[0]
    assert first == (f"{checkpoint / 'text.txt'}: split test, {n_blocks} blocks of {EVAL_LENGTH} tokens; evaluating "
                     f"{min(n_blocks, 4 * used)} blocks in {used} batches of 4 per rank on 1 rank(s), 2 Monte Carlo "
                     f"draws each{tail}")
    result = json.loads((tmp_path / "out" / "eval_ppl_text_lambda_DCE.json").read_text())
    assert result["num_batches"] == used


def test_cli_max_batches_must_be_a_count(checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *cli_args(checkpoint, tmp_path, "--max_batches",
                                                                           "0")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, ["error: --max_batches must be >= 1, got 0"])


def test_cli_nan_weights_fail_in_one_line(checkpoint, tmp_path):
    """As a user meets it (a subprocess): a NaN checkpoint gives no 'Evaluation PPL: nan' but one error
    line, exit code 2, no traceback."""
    bad = eval_model()
    with torch.no_grad():
        bad.blocks[0].attn_qkv.weight.fill_(float("nan"))
    bad.save_pretrained(tmp_path / "nan_model")
    args = cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2")
    args[args.index("--model_path") + 1] = str(tmp_path / "nan_model")
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err_lines = proc.stderr.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: the loss of batch 0 is nan"), proc.stderr
    assert "not finite" in err_lines[0] and "Traceback" not in proc.stderr and "Evaluation PPL" not in proc.stdout


def _eval_with_model(checkpoint, tmp_path, model_dir) -> subprocess.CompletedProcess:
    args = cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2")
    args[args.index("--model_path") + 1] = str(model_dir)
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)


def test_cli_an_absurd_finite_loss_prints_an_infinite_ppl(checkpoint, tmp_path):
    """A head scaled by 1e5: a finite loss of millions of nats per block, far past exp's range.
    The PPL is inf, printed and in the report; no OverflowError traceback."""
    huge = eval_model()
    with torch.no_grad():
        huge.output_layer.linear.weight.mul_(1e5)
        huge.output_layer.linear.bias.mul_(1e5)
    huge.save_pretrained(tmp_path / "huge_model")
    proc = _eval_with_model(checkpoint, tmp_path, tmp_path / "huge_model")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "Evaluation PPL: inf" in proc.stdout.splitlines()
    result = json.loads((tmp_path / "out" / "eval_ppl_text_lambda_DCE.json").read_text())
    assert result["ppl"] == math.inf and math.isfinite(result["mean_loss"])


def test_cli_weights_that_differ_from_their_sidecar_fail_in_one_line(checkpoint, tmp_path):
    """64 inverted bytes inside model.safetensors, which has a .sha256 sidecar: one error line naming the
    file, exit 2, nothing evaluated."""
    folder = tmp_path / "model"
    eval_model().save_pretrained(folder)
    weights = folder / "model.safetensors"
    (folder / "model.safetensors.sha256").write_text(f"{file_sha256(weights)}  model.safetensors\n")
    flip_bytes(weights)
    proc = _eval_with_model(checkpoint, tmp_path, folder)
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2, [f"error: {weights}: its SHA-256 does not match model.safetensors.sha256 (truncated or corrupted)"])
    assert "Evaluation PPL" not in proc.stdout


# ---- a full disk: the results are printed first, then one error line naming the file ----------------------
def _eval_on_a_full_disk(checkpoint, tmp_path, folder) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **full_disk_env(tmp_path, folder)}
    return subprocess.run([sys.executable, str(ROOT / "eval.py"),
                           *cli_args(checkpoint, tmp_path, "--monte_carlo_timesteps", "2")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)


def test_cli_a_full_work_dir_prints_the_ppl_then_one_error_line_and_leaves_no_file(checkpoint, tmp_path):
    proc = _eval_on_a_full_disk(checkpoint, tmp_path, tmp_path / "out")
    report = tmp_path / "out" / "eval_ppl_text_lambda_DCE.json"
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2, [f"error: no space left on device while writing {report}: the results are printed above; free some "
            f"space (or pass another --work_dir) to keep them in a file"])
    assert [s for s in proc.stdout.splitlines() if s.startswith("Evaluation PPL: ")], proc.stdout
    assert "results written" not in proc.stdout
    assert list((tmp_path / "out").iterdir()) == []  # no empty report, no temporary


def test_cli_a_full_cache_dir_is_one_error_line_naming_the_cache_file(checkpoint, tmp_path):
    proc = _eval_on_a_full_disk(checkpoint, tmp_path, tmp_path / "cache")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"error: no space left on device while writing {tmp_path / 'cache'}/text-test-"), line
    assert line.endswith(".uint16.bin: nothing is cached yet; free some space, or point data.cache_dir (train.py) "
                         "/ --cache_dir (eval.py) at a folder with room"), line
    assert "Evaluation PPL" not in proc.stdout and list((tmp_path / "cache").iterdir()) == []
