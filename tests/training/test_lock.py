"""The run folder's lock (radd_fast/training/lock.py): one holder, a second refused naming the folder and
the holder's pid, nothing left behind by a holder that ends or is killed (SIGKILL), the check that
creates nothing, and train() refusing a folder another process trains in before it writes anything."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from radd_fast.training import lock as lock_module
from radd_fast.training import train
from radd_fast.training.lock import LOCK_NAME, RunFolderInUse, check_run_folder_free, run_folder_lock
from tests.support.paths import REPO
from tests.support.runs import tiny_config

HOLD = """
import sys, time
from radd_fast.training.lock import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path / "run"``'s lock (until the test kills it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def _refusal(run, pid) -> str:
    return (f"run folder {run} is in use by another training process (pid {pid}), which holds {run / LOCK_NAME}: "
            f"wait for it to end, or train into another folder")


def test_a_second_holder_is_refused_naming_the_folder_and_the_pid(tmp_path, holder):
    run = tmp_path / "run"
    with pytest.raises(RunFolderInUse) as e:
        with run_folder_lock(run):
            pass
    assert str(e.value) == _refusal(run, holder.pid)
    with pytest.raises(RunFolderInUse) as e:
        check_run_folder_free(run)
    assert str(e.value) == _refusal(run, holder.pid)


def test_one_process_cannot_hold_a_folder_twice(tmp_path):
    """The lock belongs to the open file, not the process: a second train() in the same process is refused too."""
    with run_folder_lock(tmp_path):
        with pytest.raises(RunFolderInUse, match=f"pid {os.getpid()}"):
            with run_folder_lock(tmp_path):
                pass


def test_a_killed_holder_leaves_no_lock(tmp_path, holder):
    """SIGKILL: the OS releases the lock; the file (with the dead pid) stays until the next run ends."""
    run = tmp_path / "run"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run / LOCK_NAME).read_text() == f"{holder.pid}\n"
    check_run_folder_free(run)
    with run_folder_lock(run):
        assert (run / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert not (run / LOCK_NAME).exists()


def test_a_run_that_ends_removes_the_lock_file_even_on_an_error(tmp_path):
    with pytest.raises(ValueError):
        with run_folder_lock(tmp_path / "run"):
            raise ValueError("the run failed")
    assert os.listdir(tmp_path / "run") == []
    with run_folder_lock(tmp_path / "run"):  # free again
        pass


def test_the_check_creates_nothing(tmp_path):
    check_run_folder_free(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()


def test_ranks_above_zero_take_no_lock(tmp_path):
    with run_folder_lock(tmp_path, enabled=False):
        assert not (tmp_path / LOCK_NAME).exists()
        with run_folder_lock(tmp_path):  # rank 0 would hold it
            pass


def test_train_refuses_a_folder_another_process_trains_in_and_writes_nothing(tmp_path, holder):
    run = tmp_path / "run"
    with pytest.raises(RunFolderInUse, match=f"pid {holder.pid}"):
        train(tiny_config(tmp_path), run)
    assert sorted(os.listdir(run)) == [LOCK_NAME]  # no logs, no .hydra, no checkpoint


def test_a_lock_file_removed_by_its_ending_holder_is_not_locked_twice(tmp_path, monkeypatch):
    """The file is removed (by a holder that ends) between this process's open and its flock: the
    removed file is locked but not kept; the one at the path is opened and locked instead."""
    run = tmp_path / "run"
    run.mkdir()
    real_open, opened = os.open, []

    def open_then_lose_the_race(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        opened.append(os.fstat(fd).st_ino)
        if len(opened) == 1:
            os.unlink(path)  # the ending holder's unlink, right after our open
        return fd

    monkeypatch.setattr(lock_module.os, "open", open_then_lose_the_race)
    with run_folder_lock(run):
        assert len(opened) == 2 and os.stat(run / LOCK_NAME).st_ino == opened[1]
        assert (run / LOCK_NAME).read_text() == f"{os.getpid()}\n"
