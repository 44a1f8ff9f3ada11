"""Runs reproduce across processes (issue 12, section 3) and the one RNG design kept (issue 17).

The cause of the irreproducibility was the backward of the embedding lookup
(``embedding[ids]`` is an ``index_put_`` with accumulate: on CPU torch adds with atomics
across threads once the gradient has >= 32768 elements); the fix is torch's deterministic
mode during CPU training (loop.deterministic_algorithms). ``per_sequence`` (``index_add_``
before, atomic on CUDA) became a fixed-order segment sum. The design kept for randomness:
every generator is reseeded before each use (loop.seed_for), and no generator state is
saved or restored.

The user-level test trains the tiny preset with ``python train.py`` in separate processes
with torch's default thread count, on real prose nobody here wrote: the ``LICENSE.txt`` that
ships with the interpreter (the history of Python and the PSF license), or, where a
distribution strips it, the docstrings of standard-library modules.
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
import torch

from radd_fast import RADD, LogLinearNoise, ModelConfig, RADDConfig
from radd_fast.data import ByteTokenizer, ResumableLoader, load_blocks
from radd_fast.distributed import DistEnv
from radd_fast.losses.common import per_sequence
from radd_fast.training import loop as loop_module
from radd_fast.training.step import TrainStep
from tests.train_helpers import assert_same_checkpoints, load_meta, metric_records, run_files, write_text

ROOT = Path(__file__).resolve().parents[1]
DOCSTRING_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "pathlib",
                     "subprocess", "threading", "unittest", "zipfile", "tarfile", "heapq", "bisect", "textwrap")


def real_prose() -> str:
    """The interpreter's LICENSE.txt, or the docstrings of standard-library modules where it is absent."""
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_file.exists():
        return license_file.read_text(encoding="utf-8")
    return "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in DOCSTRING_MODULES)


# ---- per_sequence: a fixed-order segment sum ---------------------------------------------------------------
def sequential_sums(values: torch.Tensor, seq: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The oracle: each sequence's rows added one by one, in row order, from 0."""
    out = []
    for b in range(batch_size):
        acc = values.new_zeros(())
        for v in values[seq == b]:
            acc = acc + v
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_sequence_is_the_sequential_sum_bit_for_bit(dtype):
    torch.manual_seed(1)
    B = 7
    seq = torch.randint(0, B, (300,)).sort().values
    seq = seq[(seq != 2) & (seq != 6)]  # sequences without masked rows, one of them the last
    values = (torch.randn(seq.numel(), dtype=dtype) * 100).requires_grad_(True)
    out = per_sequence(values, seq, B)
    assert out.dtype == dtype and out.shape == (B,)
    assert torch.equal(out, sequential_sums(values.detach(), seq, B)) and out[2] == 0 and out[6] == 0
    grad_out = torch.randn(B, dtype=dtype)
    (grad,) = torch.autograd.grad(out, values, grad_out)
    assert torch.equal(grad, grad_out[seq])  # each row gets its sequence's gradient


def test_per_sequence_leaves_out_padding_rows_past_the_last_sequence():
    seq = torch.tensor([0, 0, 1, 3, 3])  # B = 3: the rows of "sequence 3" are padding
    values = torch.tensor([1.0, 2.0, 4.0, float("nan"), 8.0], requires_grad=True)
    out = per_sequence(values, seq, 3)
    assert torch.equal(out, torch.tensor([3.0, 4.0, 0.0]))
    (grad,) = torch.autograd.grad(out, values, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(grad, torch.tensor([1.0, 1.0, 2.0, 0.0, 0.0]))


def test_per_sequence_does_not_depend_on_the_thread_count():
    torch.manual_seed(2)
    seq = torch.randint(0, 64, (200_000,)).sort().values
    values = torch.randn(seq.numel())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = per_sequence(values, seq, 64)
        torch.set_num_threads(max(2, threads))
        many = per_sequence(values, seq, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_per_sequence_of_no_rows_and_under_torch_compile():
    assert torch.equal(per_sequence(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3), torch.zeros(3))
    seq = torch.tensor([0, 0, 2, 2, 2])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    compiled = torch.compile(per_sequence, backend="aot_eager", fullgraph=True)  # fullgraph: no sync, no break
    assert torch.equal(compiled(values, seq, 4), torch.tensor([3.0, 0.0, 12.0, 0.0]))


# ---- randomness: every generator reseeded before use -------------------------------------------------------
def test_seed_for_depends_on_every_part_of_its_key():
    def draw(*key):
        loop_module.seed_for(*key)
        return torch.rand(4)

    assert torch.equal(draw(1, 5, 0), draw(1, 5, 0))
    keys = [(1, 5, 0), (2, 5, 0), (1, 6, 0), (1, 5, 1), (1, 5, 0, "eval")]
    draws = [draw(*k) for k in keys]
    assert all(not torch.equal(draws[i], draws[j]) for i in range(len(keys)) for j in range(i))


def test_a_step_draws_the_same_whatever_the_generator_held_before(tmp_path):
    """The reseeding is the whole mechanism: with it removed (or skipped for a micro-batch) the
    loss of a step depends on what was drawn before, and a resumed run would differ."""
    model = RADD(RADDConfig(tokens=256, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=16,
                                                          dropout=0.1))).train()
    blocks = load_blocks(str(write_text(tmp_path)), "train", ByteTokenizer(), 16, cache_dir=tmp_path / "cache")
    batches = ResumableLoader(blocks, 4, seed=0, accum=2).next_step()
    stepper = TrainStep(model, LogLinearNoise(), "lambda_DCE")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for prior in (0, 12345):
        torch.manual_seed(prior)
        torch.rand(prior % 97)  # leave the generator somewhere else
        loop_module._accumulate(stepper, batches, scaler, 7, 3, DistEnv())
        stepper.update(optimizer, list(model.parameters()), lr=0.0, max_norm=0.0, step=8)
        losses += stepper.read().losses
    assert losses[0] == losses[1]


def test_cpu_training_runs_under_deterministic_algorithms_and_restores_the_mode():
    assert not torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    with loop_module.deterministic_algorithms(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory == fill
    with loop_module.deterministic_algorithms(torch.device("cuda")):  # only a device object: no GPU needed
        assert not torch.are_deterministic_algorithms_enabled()


# ---- the user's view: separate train.py processes ----------------------------------------------------------
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
