"""benchmarks/gpu_check's CPU dry run end to end, with the published code beside ours (it skips with
the reason when the published checkout or its dependencies are absent: tests/support/published_code.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.paths import REPO
from tests.support.published_code import published_checkout


def test_gpu_check_dry_run_end_to_end(tmp_path):
    """The CPU dry run: copy into the third-party folder, collect the tests, the side-by-side rows
    with the published provider, one micro-benchmark, the summary (kept small: a few steps)."""
    source = published_checkout()
    third, out = tmp_path / "third_party", tmp_path / "out"
    # PYTHON: the interpreter running these tests (a venv's, activated or not); the python and python3 first
    # on PATH here fail, as an interpreter without the packages would
    shims = tmp_path / "shims"
    shims.mkdir()
    for name in ("python", "python3"):
        (shims / name).write_text("#!/bin/sh\necho 'not the interpreter of the tests' >&2\nexit 97\n")
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": sys.executable,
           "RADD_THIRD_PARTY": str(third), "GPU_CHECK_FETCH_WHEELS": "0",
           "GPU_CHECK_TESTS": "tests/benchmarks/test_run.py", "MICRO_ONLY": "rotary",
           "E2E_ARGS": "--sections sampling,eval --steps 8 --eval_mc 2"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check", "--dry-run", "--published", str(source), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (third / "published-radd" / "sampling.py").read_bytes() == (source / "sampling.py").read_bytes()
    assert not (third / "published-radd" / ".git").exists()
    status = (out / "status.txt").read_text().splitlines()
    assert status == ["tests (collected only: dry run): exit 0", "side-by-side tables: exit 0",
                      "micro-benchmarks: exit 0"]
    rows = json.loads((out / "e2e" / "e2e.json").read_text())["rows"]
    assert {(r["section"], r["provider"]) for r in rows} >= {("sampling", "published"), ("sampling", "published no-cache"),
                                                            ("sampling", "fast"), ("eval", "published")}
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in (out / "env.txt").read_text() and "### e2e sampling" in summary
    assert "tests collected" in summary and "### rotary" in summary
    assert "Traceback" not in proc.stdout + proc.stderr
