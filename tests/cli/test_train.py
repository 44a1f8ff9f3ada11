"""``python train.py`` (the Hydra entry point) in separate processes: a run, a resume, and runs that
reproduce bit for bit, straight or SIGKILLed and resumed.

The cause of the irreproducibility was the backward of the embedding lookup (``embedding[ids]`` is an
``index_put_`` with accumulate: on CPU torch adds with atomics across threads once the gradient has
>= 32768 elements); the fix is torch's deterministic mode during CPU training
(loop.deterministic_algorithms). ``per_sequence`` (``index_add_`` before, atomic on CUDA) became a
fixed-order segment sum. The design kept for randomness: every generator is reseeded before each use
(loop.seed_for), and no generator state is saved or restored.

The reproducibility test trains the tiny preset with torch's default thread count, on real prose
nobody here wrote: the ``LICENSE.txt`` that ships with the interpreter (the history of Python and the
PSF license), or, where a distribution strips it, the docstrings of standard-library modules.
"""
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

import radd_fast
from tests.support.faults import full_disk_env
from tests.support.paths import REPO
from tests.support.runs import (
    assert_same_checkpoints,
    load_meta,
    metric_records,
    run_files,
)

ROOT = REPO
DOCSTRING_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "pathlib",
                     "subprocess", "threading", "unittest", "zipfile", "tarfile", "heapq", "bisect", "textwrap")


def real_prose() -> str:
    """The interpreter's LICENSE.txt, or the docstrings of standard-library modules where it is absent."""
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_file.exists():
        return license_file.read_text(encoding="utf-8")
    return "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in DOCSTRING_MODULES)


# ---- the Hydra entry point: a run and its resume -------------------------------------------------------------
def test_train_py_runs_and_resumes(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello radd " * 400)
    common = ["model=tiny", "tokenizer=bytes", "tokens=256", f"data.train={text}", f"data.valid={text}",
              f"data.cache_dir={tmp_path / 'cache'}", "model.length=32", "training.batch_size=2", "training.accum=1",
              "training.log_freq=1", "training.eval_freq=2", "eval.batch_size=2", "training.snapshot_sampling=false",
              "training.progress=false", "training.snapshot_freq=2"]
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for extra in (["training.n_iters=2", f"hydra.run.dir={run}"], [f"load_dir={run}", "training.n_iters=3"]):
        out = subprocess.run([sys.executable, "train.py", *common, *extra], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert load_meta(run)["step"] == 3
    assert (run / ".hydra" / "config.yaml").exists() and (run / "checkpoints" / "checkpoint_2.pth").exists()
    assert list((run / "resumes").iterdir())  # the resume call's own .hydra, not over the run's
    radd_fast.load_model(run)


# ---- the user's view: separate train.py processes reproduce bit for bit --------------------------------------
N_ITERS = 30


def train_command(text: Path, cache: Path, extra: list[str]) -> list[str]:
    """The tiny preset with 64-byte blocks: every train.py call of this test reads the same config."""
    return [sys.executable, "train.py", "model=tiny", "tokenizer=bytes", "tokens=256", f"data.train={text}",
            f"data.valid={text}", f"data.cache_dir={cache}", "model.length=64", "training.batch_size=16",
            "training.accum=1", f"training.n_iters={N_ITERS}", "training.log_freq=1", "training.eval_freq=5",
            "eval.batch_size=16", "training.snapshot_freq=10", "training.snapshot_freq_for_preemption=5",
            "training.snapshot_sampling=false", "training.progress=false", "eval.perplexity=false",
            "optim.lr=1e-3", "optim.warmup=10", "training.ema=0.999", "training.seed=7", *extra]


def default_threads_env() -> dict:
    """torch's own default thread count, but at least 2 (one thread would hide the reductions' order)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    if (os.cpu_count() or 1) < 2:
        env["OMP_NUM_THREADS"] = "2"
    return env


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def test_train_py_runs_reproduce_bit_for_bit_straight_and_killed_then_resumed(tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text(real_prose(), encoding="utf-8")
    env = default_threads_env()
    runs = {name: tmp_path / name for name in ("a", "b", "killed")}
    logs = {name: tmp_path / f"{name}.out" for name in runs}

    def start(name: str, extra: list[str]) -> subprocess.Popen:
        with logs[name].open("a") as out:
            return subprocess.Popen(train_command(text, tmp_path / f"cache_{name}", extra), cwd=ROOT, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)

    for name in ("a", "b"):  # one after the other: two processes would fight over the same cores
        assert start(name, [f"hydra.run.dir={runs[name]}"]).wait(timeout=240) == 0, logs[name].read_text()[-3000:]
    victim = start("killed", [f"hydra.run.dir={runs['killed']}"])
    deadline = time.monotonic() + 240
    while logged_steps(runs["killed"]) < 13 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)  # mid-run: past the step-10 resume point, before step 30
    assert victim.wait() == -signal.SIGKILL, logs["killed"].read_text()[-3000:]
    assert 10 <= load_meta(runs["killed"])["step"] < N_ITERS
    resumed = start("killed", [f"load_dir={runs['killed']}"])
    assert resumed.wait(timeout=240) == 0, logs["killed"].read_text()[-3000:]

    reference = metric_records(runs["a"])
    assert [s for s, k, _ in reference if k == "loss"] == list(range(1, N_ITERS + 1))
    for name in ("b", "killed"):
        assert metric_records(runs[name]) == reference, name  # losses, eval losses, grad norms: bit for bit
        assert run_files(runs[name]) == run_files(runs["a"]), name  # the same files, no debris
        assert_same_checkpoints(runs[name], runs["a"])  # weights, EMA, optimizer, data position


# ---- one writer per run folder -------------------------------------------------------------------------------
def small_command(text: Path, tmp: Path, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "model=tiny", "tokenizer=bytes", "tokens=256", f"data.train={text}",
            f"data.valid={text}", f"data.cache_dir={tmp / 'cache'}", "model.length=16", "training.batch_size=2",
            "training.accum=1", "training.eval_freq=0", "training.snapshot_sampling=false", "training.progress=false",
            "training.snapshot_freq=2", "training.snapshot_freq_for_preemption=2", "training.log_freq=1", *extra]


def test_a_second_train_py_on_a_busy_run_folder_is_refused_in_one_line(tmp_path):
    """While one train.py runs in a folder, a second one there (a new run or a resume) is refused in one
    line naming the folder and the first one's pid, before Hydra touches the folder; after the first is
    SIGKILLed, a resume takes the folder, and leaves no lock file when it ends."""
    text = tmp_path / "corpus.txt"
    text.write_text("hello radd " * 400)
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.Popen(small_command(text, tmp_path, ["training.n_iters=1000000", f"hydra.run.dir={run}"]),
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while logged_steps(run) < 1 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None and (run / "train.lock").read_text() == f"{first.pid}\n"
        hydra_files = {p: p.read_bytes() for p in (run / ".hydra").iterdir()}
        refusal = (f"error: run folder {run} is in use by another training process (pid {first.pid}), which holds "
                   f"{run / 'train.lock'}: wait for it to end, or train into another folder")
        for extra in ([f"hydra.run.dir={run}", "training.n_iters=3", "training.seed=5"],
                      [f"load_dir={run}", "training.n_iters=3"]):
            second = subprocess.run(small_command(text, tmp_path, extra), cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=300)
            assert (second.returncode, second.stderr.splitlines()) == (2, [refusal]), second.stderr
        assert {p: p.read_bytes() for p in (run / ".hydra").iterdir()} == hydra_files
        assert not (run / "resumes").exists()
    finally:
        first.kill()
        first.wait()
    done = logged_steps(run)
    resumed = subprocess.run(small_command(text, tmp_path, [f"load_dir={run}", f"training.n_iters={done + 2}"]),
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run / "train.lock").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, done + 3))  # each step once


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_a_load_dir_that_is_not_a_folder_is_one_line_and_leaves_nothing(tmp_path, kind):
    """Hydra would make <load_dir>/resumes/<time> before the run could look: a NotADirectoryError
    traceback for a file, a new folder for a missing one. Refused first, in one line, exit 2."""
    target = tmp_path / "not_a_run.txt"
    if kind == "file":
        target.write_text("a file\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=tiny", f"load_dir={target}"], cwd=tmp_path,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    message = {"file": f"error: load_dir={target} is a file; pass the run folder to resume (the one that holds "
                       f".hydra/config.yaml)",
               "missing": f"error: load_dir={target}: no such folder"}[kind]
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [message])
    assert sorted(os.listdir(tmp_path)) == (["not_a_run.txt"] if kind == "file" else [])


def test_a_full_cache_dir_is_one_error_line_naming_the_cache_file_before_training(tmp_path):
    """data.cache_dir on a full disk (tests/support/faults.py): one line naming the cache file, exit 2, no
    training step, no partial cache file."""
    text = tmp_path / "corpus.txt"
    text.write_text("hello radd " * 400)
    env = dict(os.environ, HF_HUB_OFFLINE="1", **full_disk_env(tmp_path, tmp_path / "cache"))
    proc = subprocess.run(small_command(text, tmp_path, ["training.n_iters=2", f"hydra.run.dir={tmp_path / 'run'}"]),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"error: no space left on device while writing {tmp_path / 'cache'}/corpus-train-"), line
    assert line.endswith(".uint16.bin: nothing is cached yet; free some space, or point data.cache_dir (train.py) "
                         "/ --cache_dir (eval.py) at a folder with room"), line
    assert list((tmp_path / "cache").iterdir()) == [] and not list((tmp_path / "run").rglob("*.pth"))


def test_a_refused_run_leaves_no_folder(tmp_path):
    """Refusals found after Hydra made the run folder leave nothing: a model whose tokens are not its
    tokenizer's ids (sample.py could not decode it), a bad config number in the default runs/<date>/<time>
    folder, a resume that changes the batch (no <load_dir>/resumes/<time>). One line each, exit 2."""
    text = tmp_path / "corpus.txt"
    text.write_text("hello radd " * 400)
    runs = tmp_path / "runs"
    runs.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def refused(extra: list[str], message: str, drop: str = "") -> None:
        cmd = [a for a in small_command(text, tmp_path, extra) if a != drop]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert (proc.returncode, proc.stderr.splitlines()) == (2, [message])

    refused([f"hydra.run.dir={runs / 'new'}"], "error: the model has 50257 tokens but tokenizer 'bytes' decodes only "
            "256 ids: set tokens=256 (sample.py decodes only a model whose tokens are its tokenizer's ids)",
            drop="tokens=256")
    refused(["optim.lr=nan"], "error: optim.lr must be finite, got nan")  # the default folder: runs/<date>/<time>
    assert list(runs.iterdir()) == []
    run = tmp_path / "run"
    done = subprocess.run(small_command(text, tmp_path, ["training.n_iters=1", f"hydra.run.dir={run}"]), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before = sorted(p.name for p in run.iterdir())
    refused([f"load_dir={run}", "training.batch_size=4"], f"error: cannot resume from {run}/checkpoints-meta/"
            "checkpoint.pth: the run changed training.batch_size=2 -> 4 (checkpoint -> now); resume with the "
            "checkpoint's values or start a new run folder")
    assert sorted(p.name for p in run.iterdir()) == before and "resumes" not in before


@pytest.fixture(scope="module")
def full_run_folder(tmp_path_factory) -> dict:
    """train.py with the disk full under one file or folder of the run (.hydra, logs, metrics.jsonl, the
    snapshots), four processes side by side."""
    tmp = tmp_path_factory.mktemp("full_run")
    text = tmp / "corpus.txt"
    text.write_text("hello radd " * 400)
    procs = {}
    for target in (".hydra", "logs", "metrics.jsonl", "checkpoints"):
        run = tmp / f"run_{target}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", **full_disk_env(tmp, run / target))
        procs[target] = (run, subprocess.Popen(small_command(text, tmp, ["training.n_iters=4", f"hydra.run.dir={run}"]),
                                               cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               text=True))
    out = {}
    for target, (run, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        out[target] = (run, proc.returncode, err)
    return out


RUN_AGAIN = "free some space and run again (load_dir=<run folder> resumes a run from its last checkpoint)"


@pytest.mark.parametrize("target, written, advice", [
    (".hydra", ".hydra", "nothing was trained; free some space and run again"),  # Hydra's own writer
    ("logs", "logs", RUN_AGAIN),
    ("metrics.jsonl", "metrics.jsonl", f"its earlier lines are kept whole; {RUN_AGAIN}"),
    ("checkpoints", "checkpoints/checkpoint_2.pth",
     "the checkpoint already there (if any) is unchanged; free some space and resume from it"),
])
def test_a_full_run_folder_stops_training_in_one_line_naming_the_file(full_run_folder, target, written, advice):
    """Hydra's .hydra/ (its traceback before), logs (a logging handler: no 'Logging error' traceback per
    record), metrics.jsonl, a checkpoint."""
    run, code, err = full_run_folder[target]
    assert (code, err.splitlines()) == (2, [f"error: no space left on device while writing {run / written}: {advice}"])
    if (run / target).is_file():
        assert (run / target).read_text() == ""  # nothing fitted: no partial line
    assert not list(run.rglob(".*.tmp*"))
