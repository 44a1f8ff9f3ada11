"""torchrun sample.py: the samples split over ranks (gloo on CPU), one --out file in sample order, and
the same samples one process makes with the same seed; a run folder whose meta checkpoint fails its
checksum, sampled from its newest intact snapshot with one warning line."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.checkpoints import flip_bytes, write_run_folder
from tests.support.models import random_head_model
from tests.support.paths import REPO

ROOT = REPO


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    random_head_model(tokens=256, length=12).save_pretrained(folder)
    return str(folder)


def _args(ckpt: str, out: Path) -> list[str]:
    return ["sample.py", "--model_path", ckpt, "--tokenizer", "bytes", "--batch_size", "7", "--wave_size", "2",
            "--rows_in_flight", "2", "--steps", "5", "--seed", "11", "--device", "cpu", "--no_progress",
            "--out", str(out)]


def test_two_ranks_make_the_samples_of_one_process(ckpt, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    single = subprocess.run([sys.executable, *_args(ckpt, one)], cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    ranks = subprocess.run([*launcher, *_args(ckpt, two)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    a = [json.loads(line) for line in one.read_text().splitlines()]
    b = [json.loads(line) for line in two.read_text().splitlines()]
    assert [r["index"] for r in b] == list(range(7))
    assert [r["ids"] for r in a] == [r["ids"] for r in b]
    assert "on 2 ranks" in ranks.stdout and ranks.stdout.count("E-NFE") == 1  # rank 0 alone prints the summary


def test_a_corrupt_run_checkpoint_samples_from_the_newest_intact_snapshot(tmp_path):
    """64 inverted bytes in the meta checkpoint of a run folder (training wrote its .sha256): sample.py
    says so in one warning line and samples the newest intact snapshot, exactly as from a folder that
    holds those weights alone. A folder with no intact checkpoint: one error line, exit 2."""
    model = random_head_model(tokens=256, length=12)
    write_run_folder(tmp_path / "run", model)  # snapshots 2 and 4, meta 6
    write_run_folder(tmp_path / "step4", model, snapshot_steps=(), meta_step=4)
    meta, newest = tmp_path / "run/checkpoints-meta/checkpoint.pth", tmp_path / "run/checkpoints/checkpoint_4.pth"
    flip_bytes(meta)
    runs = {}
    for name in ("run", "step4"):
        args = _args(str(tmp_path / name), tmp_path / f"{name}.jsonl")
        runs[name] = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                                    timeout=300)
    assert runs["step4"].returncode == 0 and runs["step4"].stderr == "", runs["step4"].stderr
    assert runs["run"].returncode == 0, runs["run"].stderr
    assert runs["run"].stderr.splitlines() == [
        f"{meta}: its SHA-256 does not match checkpoint.pth.sha256 (truncated or corrupted); "
        f"loading {newest} (step 4) instead"]
    assert (tmp_path / "run.jsonl").read_text() == (tmp_path / "step4.jsonl").read_text()

    flip_bytes(tmp_path / "step4/checkpoints-meta/checkpoint.pth")
    bad = subprocess.run([sys.executable, *_args(str(tmp_path / "step4"), tmp_path / "bad.jsonl")], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert (bad.returncode, bad.stderr.splitlines()) == (2, [
        f"error: {tmp_path / 'step4/checkpoints-meta/checkpoint.pth'}: its SHA-256 does not match "
        f"checkpoint.pth.sha256 (truncated or corrupted) (--model_path)"])
