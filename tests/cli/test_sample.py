"""sample.py as a user runs it: torchrun splits the samples over ranks (gloo on CPU) into one --out file
in sample order, the same samples one process makes with the same seed; Ctrl-C keeps every finished
sample in whole lines; a full disk is one error line and whole lines; a run folder whose meta
checkpoint fails its checksum, sampled from its newest intact snapshot with one warning line."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.checkpoints import flip_bytes, write_run_folder
from tests.support.faults import full_disk_env
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


def _torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port())]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("samples, split", [(6, "3 + 3"), (7, "3 + 4")])
def test_two_ranks_make_the_samples_of_one_process(ckpt, tmp_path, samples, split):
    """Rank r makes samples [r N / 2, (r + 1) N / 2), sample i keyed by (--seed, i): the summary reports
    each rank's count, the file holds the one-process samples in order (made with other rows in flight),
    and the ranks' part files are gone."""
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    count = ["--batch_size", str(samples)]
    single = subprocess.run([sys.executable, *_args(ckpt, one), *count, "--rows_in_flight", "4"], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ranks = subprocess.run([*_torchrun(2), *_args(ckpt, two), *count], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    a, b = _records(one), _records(two)
    assert [r["index"] for r in b] == list(range(samples))
    assert [r["ids"] for r in a] == [r["ids"] for r in b]
    summary = [line for line in ranks.stdout.splitlines() if "E-NFE" in line]
    assert len(summary) == 1 and summary[0].startswith(f"loop fast on 2 ranks ({split} samples) | ")  # rank 0 alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]


def test_a_decoder_run_is_labelled_approximate_and_two_ranks_make_its_samples(ckpt, tmp_path):
    """--decoder confidence: every record and the summary say ``approximate (confidence tau=0.6)``; sample i
    keyed by (--seed, i) and its evaluations, so two ranks write the one-process samples; a bad knob is one
    error line, exit 2."""
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    flags = ["--decoder", "confidence", "--decoder_para", "0.6", "--prefix", "ab"]
    single = subprocess.run([sys.executable, *_args(ckpt, one), *flags, "--rows_in_flight", "3"], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ranks = subprocess.run([*_torchrun(2), *_args(ckpt, two), *flags], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    a, b = _records(one), _records(two)
    assert [r["ids"] for r in a] == [r["ids"] for r in b] and len(a) == 7
    assert all("approximate (confidence tau=0.6)" in r["sampler"] and r["ids"][:2] == list(b"ab") for r in a)
    assert "approximate (confidence tau=0.6)" in single.stdout.splitlines()[-1]
    bad = subprocess.run([sys.executable, *_args(ckpt, tmp_path / "bad.jsonl"), "--decoder", "entropy_bound",
                          "--decoder_para", "-2"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "error: entropy_bound needs decoder_para gamma >= 0 (nats of summed entropy per evaluation), got -2.0 "
        "(--decoder_para)"]
    assert not (tmp_path / "bad.jsonl").exists()


def test_ctrl_c_keeps_every_finished_sample_in_whole_lines(ckpt, tmp_path):
    """SIGINT to a real sample.py in the middle of a long run: exit 130, one line saying what was kept,
    and the file holds samples 0 .. n-1, each a whole JSONL line."""
    out = tmp_path / "s.jsonl"
    cmd = [sys.executable, "sample.py", "--model_path", ckpt, "--tokenizer", "bytes", "--batch_size", "100000",
           "--rows_in_flight", "4", "--steps", "5", "--seed", "1", "--device", "cpu", "--no_progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while (not out.exists() or out.stat().st_size < 2000) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    text = out.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    n = len(records)
    assert proc.returncode == 130 and text.endswith("\n") and n >= 1
    assert [r["index"] for r in records] == list(range(n))
    assert err.splitlines() == [f"interrupted: {n} samples in {out}, whole lines"]


def test_a_full_disk_is_one_error_line_and_whole_lines(ckpt, tmp_path):
    """The disk under --out fills up in the middle of a line: one line naming the file and what is kept,
    exit 2, and the file is cut back to the samples written before, whole lines."""
    folder = tmp_path / "disk"
    folder.mkdir()
    out = folder / "s.jsonl"
    env = {**_env(), **full_disk_env(tmp_path, folder, free=1000)}
    result = subprocess.run([sys.executable, *_args(ckpt, out), "--batch_size", "40"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    text = out.read_text()
    n = len(text.splitlines())
    assert result.returncode == 2 and 0 < len(text) <= 1000 and text.endswith("\n")
    assert [r["index"] for r in _records(out)] == list(range(n))
    assert result.stderr.splitlines() == [
        f"error: no space left on device while writing {out}: the {n} samples written before are kept, whole "
        "lines; free some space (or pass another --out) and run again"]


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
