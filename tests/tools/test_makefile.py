"""The two commands of the README: `make setup` picks the torch build for the machine and is safe to run
again, `make test` runs the suite with the environment's interpreter and its bin/ on PATH. Checked with
`make -n` (what would run), so nothing is installed here."""
import os
import shutil
import subprocess

import pytest

from tests.support.paths import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def dry_run(target: str, path: str, *variables: str) -> str:
    env = dict(os.environ, PATH=path)
    env.pop("MAKEFLAGS", None)
    run = subprocess.run(["make", "-n", "-s", target, *variables], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


def fake_bin(tmp_path, *names: str) -> str:
    """A PATH holding only stand-ins for ``names`` plus the system tools make needs."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in names:
        tool = folder / name
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def test_setup_takes_cpu_wheels_without_a_gpu_driver(tmp_path):
    out = dry_run("setup", fake_bin(tmp_path))
    assert "pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu" in out


def test_setup_takes_cuda_wheels_where_nvidia_smi_answers(tmp_path):
    out = dry_run("setup", fake_bin(tmp_path, "nvidia-smi"))
    assert out.splitlines()[3].endswith("|| .venv/bin/python -m pip install --quiet torch")


def test_setup_is_idempotent_and_takes_a_given_torch(tmp_path):
    out = dry_run("setup", fake_bin(tmp_path), "TORCH=torch==2.13.0", "VENV=/nonexistent/env")
    # each step is guarded: an existing environment is kept, an installed torch is not reinstalled
    assert "test -x /nonexistent/env/bin/python || python3 -m venv /nonexistent/env" in out
    assert '/nonexistent/env/bin/python -c "import torch" 2>/dev/null && echo "torch: already installed"' in out
    assert "pip install --quiet torch==2.13.0" in out
    assert '/nonexistent/env/bin/python -m pip install --quiet -e ".[dev]"' in out


def test_test_runs_the_suite_with_the_environment_first_on_path(tmp_path):
    venv = tmp_path / "env"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    out = dry_run("test", fake_bin(tmp_path), f"VENV={venv}")
    assert out.strip() == (f'PATH="{venv}/bin:$PATH" TRITON_INTERPRET=1 {venv}/bin/python -m pytest tests '
                           "-p no:cacheprovider --benchmark-disable")
