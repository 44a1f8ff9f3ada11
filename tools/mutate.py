"""Mutation testing of one core module (or all of them) with mutmut 3, and a short report.

A mutant is the module with one small change (``<`` for ``<=``, a constant
off by one, an argument dropped); a good suite fails on it ("killed"). A mutant
no test notices ("survived") is either a blind spot of the suite or an
*equivalent* mutant, one that cannot change behaviour (the reasons are kept in
``tools/mutation_equivalents.txt`` so the report can count them apart).

Each run works in a scratch copy of the repository (``--workdir``), never in the
checkout: mutmut writes its ``mutants/`` tree and its config next to the code,
and the checkout is shared. Only the module's own test files run per mutant
(the ``MODULE_TESTS`` table), under the Triton interpreter, one mutant at a time.

    python tools/mutate.py radd_fast/sampling/strategies.py      # one module
    python tools/mutate.py --all --report benchmarks/results/mutation_2026-12-01.md
    python tools/mutate.py radd_fast/noise.py --recheck tests/test_new.py   # survivors vs new tests
    make mutate MODULE=radd_fast/noise.py

Needs ``pip install mutmut==3.8.1`` (not part of ``make test``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EQUIVALENTS_FILE = REPO / "tools" / "mutation_equivalents.txt"

# module -> the few test files that cover it (each mutant runs only these, and mutmut's own
# per-function coverage narrows them further). Keep each module's set under a minute or so.
MODULE_TESTS: dict[str, list[str]] = {
    "radd_fast/sampling/strategies.py": ["tests/sampling/test_strategies.py", "tests/model/test_head.py",
                                         "tests/sampling/test_published_api.py"],
    "radd_fast/sampling/schedule.py": ["tests/sampling/test_schedule.py", "tests/sampling/test_engine.py",
                                       "tests/sampling/test_published_api.py"],
    "radd_fast/sampling/batching.py": ["tests/sampling/test_batching.py"],
    "radd_fast/sampling/conditioning.py": ["tests/sampling/test_conditioning.py", "tests/sampling/test_engine.py",
                                           "tests/sampling/test_published_api.py"],
    "radd_fast/losses/dce.py": ["tests/losses/test_dce.py"],
    "radd_fast/losses/time_samplers.py": ["tests/losses/test_time_samplers.py", "tests/losses/test_dce.py"],
    "radd_fast/losses/masking.py": ["tests/losses/test_masking.py"],
    "radd_fast/losses/registry.py": ["tests/losses/test_registry.py"],
    "radd_fast/losses/static_rows.py": ["tests/losses/test_static_rows.py", "tests/losses/test_registry.py",
                                        "tests/training/test_step.py"],
    "radd_fast/noise.py": ["tests/test_noise.py"],
    "radd_fast/ema.py": ["tests/test_ema.py"],
    "radd_fast/training/optim.py": ["tests/training/test_optim.py"],
    # the loop: in-process train() calls only (a test that runs train.py as a subprocess never sees a mutant)
    "radd_fast/training/loop.py": ["tests/training/test_loop.py", "tests/training/test_state.py",
                                   "tests/training/test_snapshot.py", "tests/training/test_optim.py",
                                   "tests/training/test_metrics.py"],
    "radd_fast/training/step.py": ["tests/training/test_step.py", "tests/training/test_loop.py",
                                   "tests/test_flops.py"],
    "radd_fast/evaluation/ppl.py": ["tests/evaluation/test_ppl.py", "tests/test_acceleration.py"],
    "radd_fast/checkpoint.py": ["tests/test_checkpoint.py", "tests/test_hub.py"],
    # the compile / CUDA-graph policy and the graphed paths of the sampler (CapturedGraph, CUDA-only,
    # is left out by name: SKIP_NAME_PATTERNS)
    "radd_fast/acceleration.py": ["tests/test_acceleration.py"],
    "radd_fast/sampling/evaluator.py": ["tests/sampling/test_evaluator.py", "tests/test_acceleration.py",
                                        "tests/model/test_model.py", "tests/sampling/test_engine.py"],
    "radd_fast/sampling/cached.py": ["tests/sampling/test_cached.py", "tests/model/test_kv_cache.py",
                                     "tests/test_acceleration.py", "tests/benchmarks/test_bench_cache_quality.py"],
    "radd_fast/sampling/engine.py": ["tests/sampling/test_engine.py", "tests/sampling/test_config.py"],
    "radd_fast/sampling/decoders.py": ["tests/sampling/test_decoders.py"],
    "radd_fast/sampling/adaptive.py": ["tests/sampling/test_adaptive.py", "tests/sampling/test_decoders.py"],
    "radd_fast/sampling/published_api.py": ["tests/sampling/test_published_api.py", "tests/sampling/test_engine.py"],
    "radd_fast/kernels/sampling_update.py": ["tests/kernels/test_sampling_update.py",
                                             "tests/kernels/test_card_configs.py"],
    "radd_fast/kernels/linear_log_softmax.py": ["tests/kernels/test_linear_log_softmax.py",
                                                "tests/kernels/test_card_configs.py"],
    "radd_fast/kernels/attention.py": ["tests/kernels/test_attention.py", "tests/kernels/test_flash_attention.py",
                                       "tests/model/test_ops.py"],
    "radd_fast/kernels/flash_attention.py": ["tests/kernels/test_flash_attention.py",
                                             "tests/kernels/test_card_configs.py"],
    "radd_fast/kernels/layer_norm.py": ["tests/kernels/test_layer_norm.py"],
    "radd_fast/kernels/rotary.py": ["tests/kernels/test_rotary.py"],
    "radd_fast/kernels/token_stats.py": ["tests/kernels/test_token_stats.py", "tests/kernels/test_card_configs.py",
                                         "tests/model/test_head.py"],
}
# Per-module pytest -k filters: leave out slow end-to-end tests that reach the module but are not
# what guards it (the sampling engine runs schedule.py and strategies.py in every test).
MODULE_FILTERS: dict[str, str] = {
    "radd_fast/sampling/strategies.py": "not engine and not published_api_samplers",
    "radd_fast/sampling/schedule.py": "not engine and not published_api_samplers",
    "radd_fast/sampling/batching.py": "not engine and not published_api_samplers",
    "radd_fast/sampling/conditioning.py": "not engine and not published_api_samplers",
    "radd_fast/training/optim.py": "not resume and not ddp and not train_py and not other_losses",
    # train.py as a subprocess: the scratch copy holds no train.py, and a child process never sees a mutant
    "radd_fast/training/loop.py": "not train_py",
    # (test_acceleration.py: the static-row loss from emulated graphs; its compile tests trace trampolines)
    "radd_fast/evaluation/ppl.py": ("not cli and not expectation and not ar_forward_equals"
                                    " and not static_row_evaluation_compiled and not compiled_cached"),
    # the real torch.compile of the step (7-8 s a mutant, and through mutmut's trampolines):
    # tests/training/test_step.py checks the compile decision with the policy's compile recorded
    "radd_fast/training/step.py": "not compiled_step and not compiles_to_one_graph",
    # the compiled sampler (aot_eager through mutmut's trampolines) and most interpreter kernel cases
    # (the bit-for-bit one stays: only the kernel path uses the head's noise key)
    "radd_fast/sampling/evaluator.py": "not compiled",
    "radd_fast/sampling/cached.py": "not compiled and not quality_benchmark and not (kernel and not bit_for_bit)",
    # torch.compile cannot trace mutmut's trampolines (the compile tests fail on every mutant, so
    # they would mask the rest; the kernels' test files take the custom-op path eagerly
    # instead); torch.library.opcheck checks the op registrations, which are not mutated, at 2-3 s a
    # mutant; the committed AOT build's records are not copied to the scratch folder
    # (head_config_for / tile_config_for are lru_cache-decorated, so mutmut skips them anyway).
    **{m: "not torch_compile and not opcheck and not aot_build and not estimates_bound" for m in (
        "radd_fast/kernels/layer_norm.py", "radd_fast/kernels/rotary.py",
        "radd_fast/kernels/sampling_update.py", "radd_fast/kernels/linear_log_softmax.py",
        "radd_fast/kernels/attention.py", "radd_fast/kernels/flash_attention.py",
        "radd_fast/kernels/token_stats.py")},
}
# The modules `--all` (and `make mutate`) runs, in order: every mapped one (about 4 hours on 2 cores;
# one module takes 1-35 minutes, so a change is usually checked with MODULE=... alone).
CORE_MODULES = list(MODULE_TESTS)
# Per-module lines left unmutated (mutmut's do_not_mutate_patterns: an expression that starts on a
# matching line is skipped with everything inside it). The kernel launches' argument lists
# (`_x_kernel[grid](ptr, ..., stride, ..., BLOCK=..., num_warps=...)`) are the kernels' own contract:
# under the interpreter every kernel test runs through them, and num_warps / num_stages are ignored
# there, so their ~60% of a kernel module's mutants would cost most of the run for no information.
KERNEL_LAUNCH = r"_kernel\["
MODULE_SKIP_PATTERNS: dict[str, list[str]] = {
    m: [KERNEL_LAUNCH] for m in ("radd_fast/kernels/layer_norm.py", "radd_fast/kernels/rotary.py",
                                 "radd_fast/kernels/sampling_update.py", "radd_fast/kernels/linear_log_softmax.py",
                                 "radd_fast/kernels/flash_attention.py", "radd_fast/kernels/token_stats.py")
}
# Functions whose mutants are not worth running: Triton kernels (mutmut's trampoline cannot wrap a
# @triton.jit function), torch.library registrations and CUDA-only code. Matched against mutant names.
# The CUDA graph itself (acceleration.CapturedGraph: streams, capture, replay) runs only on a GPU, where
# tests/test_acceleration.py's GPU tests compare it with eager; on the CPU no test can reach it.
SKIP_NAME_PATTERNS = [r"_kernel__mutmut_", r"__fake__mutmut_", r"CapturedGraph"]

PYTEST_ARGS = ["-p", "no:cacheprovider", "--benchmark-disable", "-q", "-x", "-p", "no:randomly"]
COPIED = ["radd_fast", "tests", "pyproject.toml", "conftest.py"]


@dataclass
class Equivalent:
    """A mutant known not to change behaviour: its name, the mutated line (to notice staleness), why."""

    name: str
    line: str
    reason: str


@dataclass
class ModuleResult:
    module: str
    killed: list[str] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)  # not known-equivalent
    equivalent: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    other: list[tuple[str, str]] = field(default_factory=list)  # (name, status): timeout, no tests, ...
    diffs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def score(self) -> float:
        """Caught / non-equivalent mutants. A timeout or a crash counts as caught (the mutant broke
        the run); "no tests" and anything else mutmut reports counts as not caught."""
        crashed = sum(1 for _, s in self.other if s in ("timeout", "segfault"))
        caught = len(self.killed) + crashed
        total = len(self.killed) + len(self.survived) + len(self.other)
        return caught / total if total else 1.0


def load_equivalents(path: Path = EQUIVALENTS_FILE) -> dict[str, Equivalent]:
    """The committed list, one block per mutant (``#`` lines are comments)::

        radd_fast.noise.x_get_noise__mutmut_3
            line: if cfg.type == "XXloglinearXX":
            why: NoiseConfig rejects every other type, so ...
    """
    if not path.exists():
        return {}
    out: dict[str, Equivalent] = {}
    name = line = None
    for raw in path.read_text().splitlines():
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if not raw[0].isspace():
            name, line = text, None
        elif text.startswith("line:"):
            line = text[len("line:"):].strip()
            if not line:
                raise SystemExit(f"error: {path}: {name}: an empty 'line:' never matches a mutant")
        elif text.startswith("why:") and name is not None and line is not None:
            out[name] = Equivalent(name, line, text[len("why:"):].strip())
        else:
            raise SystemExit(f"error: {path}: cannot read {raw!r} (expected a mutant name, 'line:' or 'why:')")
    return out


def pytest_args(module: str) -> list[str]:
    extra = ["-k", MODULE_FILTERS[module]] if module in MODULE_FILTERS else []
    return PYTEST_ARGS + extra


def prepare_workdir(module: str, workdir: Path) -> Path:
    """A scratch copy of the repository holding a mutmut config for ``module`` alone."""
    if module not in MODULE_TESTS:
        raise SystemExit(f"error: no test mapping for {module}; add it to MODULE_TESTS in tools/mutate.py "
                         f"(known: {', '.join(MODULE_TESTS)})")
    dest = workdir_of(module, workdir)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    tests = [t for t in MODULE_TESTS[module] if (REPO / t).exists()]
    (dest / "setup.cfg").write_text(mutmut_config(module, tests))
    return dest


def mutmut_config(module: str, tests: list[str]) -> str:
    """The ``setup.cfg`` mutmut reads: ``module`` mutated, each mutant against ``tests`` (filtered)."""
    return "\n".join([
        "[mutmut]",
        "source_paths = radd_fast",
        f"only_mutate = {module}",
        "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in tests),
        "pytest_add_cli_args =\n" + "".join(f"    {a}\n" for a in pytest_args(module)),
        # torch is not fork-safe once the suite has run in a process: fork workers from a clean server.
        "process_isolation = forkserver",
        "use_git_change_detection = false",
        *(["do_not_mutate_patterns =\n" + "".join(f"    {p}\n" for p in MODULE_SKIP_PATTERNS[module])]
          if module in MODULE_SKIP_PATTERNS else []),
        "timeout_multiplier = 10.0",  # the CPUs are shared: a slow test is not a hung mutant
        "",
    ])


def recheck(module: str, workdir: Path, tests: list[str], max_children: int) -> None:
    """Run the last run's survivors (and the mutants no test reached or mutmut called suspicious) again,
    against ``tests`` only.

    For after writing tests: every other verdict stands, and the survivors already passed every
    test of the full run, so the new test files are all they need to meet. The tests are copied
    in from the checkout (the whole tests/ tree: support code, conftest files); the mapping of tests to
    functions is collected afresh for them (dropping mutmut-stats.json also keeps mutmut from
    resetting the old verdicts over the changed test selection).
    """
    dest = workdir_of(module, workdir)
    if not (dest / "mutants").exists():
        raise SystemExit(f"error: no run of {module} in {dest} to recheck; run it first")
    missing = [t for t in tests if not (REPO / t).exists()]
    if missing:
        raise SystemExit(f"error: --recheck: no such test file {', '.join(missing)}")
    for base in (dest, dest / "mutants"):
        shutil.copytree(REPO / "tests", base / "tests", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    config = mutmut_config(module, tests)
    for base in (dest, dest / "mutants"):
        (base / "setup.cfg").write_text(config)
    (dest / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    statuses = parse_results(mutmut(["results", "--all", "true"], dest).stdout)
    names = [n for n, s in statuses.items() if s in ("survived", "no tests", "suspicious")]
    print(f"rechecking {len(names)} mutants of {module} against {', '.join(tests)}", file=sys.stderr, flush=True)
    start = time.monotonic()
    if names:
        mutmut(["run", "--max-children", str(max_children), *names], dest, log=dest / "mutmut-recheck.log")
    _add_seconds(dest, time.monotonic() - start)


def _add_seconds(dest: Path, seconds: float) -> None:
    """Keep the module's run time (full run plus rechecks) next to its results."""
    path = dest / "run-seconds"
    path.write_text(str(float(path.read_text()) + seconds if path.exists() else seconds))


def mutmut(args: list[str], cwd: Path, log: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m mutmut ARGS`` in ``cwd``, niced, one thread: stdout captured, or sent to ``log``."""
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = ["nice", "-n", "10", sys.executable, "-m", "mutmut", *args]
    if log is None:
        return subprocess.run(command, cwd=cwd, env=env, text=True, capture_output=True)
    with open(log, "w") as out:  # mutmut's progress spinner: kept out of the terminal
        return subprocess.run(command, cwd=cwd, env=env, text=True, stdout=out, stderr=subprocess.STDOUT)


# Run inside the work directory: every diff in one process (``mutmut show`` per mutant pays
# mutmut's start-up each time).
_DIFFS_SCRIPT = (
    "import json, sys\n"
    "from mutmut.mutation.diff_apply import get_diff_for_mutant\n"
    "print(json.dumps({n: get_diff_for_mutant(n) for n in sys.argv[1:]}))\n"
)


def mutant_diffs(names: list[str], cwd: Path) -> dict[str, str]:
    """{mutant name: unified diff against the original function}."""
    if not names:
        return {}
    out = subprocess.run([sys.executable, "-c", _DIFFS_SCRIPT, *names], cwd=cwd, text=True, capture_output=True)
    if out.returncode != 0:
        raise SystemExit(f"error: could not read the mutants' diffs in {cwd}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def parse_results(text: str) -> dict[str, str]:
    """``mutmut results --all true`` lines ``    name: status`` -> {name: status}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s+(\S+__mutmut_\d+): (.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _first_line(diff: str, sign: str) -> str:
    """The first line of a mutant's diff that starts with ``sign`` ('-' removed, '+' added), stripped."""
    for line in diff.splitlines():
        if line.startswith(sign) and not line.startswith(sign * 3):
            return line[1:].strip()
    return ""


def removed_line(diff: str) -> str:
    """The first removed line of a mutant's diff (the original code), stripped."""
    return _first_line(diff, "-")


def _without_device(line: str) -> str:
    """``line`` with any ``device=...`` argument dropped and the spacing of the call normalised."""
    line = re.sub(r"device=[^,()]*(\([^()]*\))?[^,()]*,?", "", line)
    line = re.sub(r"[\s,]+\)", ")", re.sub(r"\s+", " ", line))
    return re.sub(r"\(\s+", "(", line).strip()


def _one_device_to_none(old: str, new: str) -> bool:
    """``new`` is ``old`` with one of its several ``<expr>.device`` arguments replaced by None."""
    return any(old[:m.start()] + "None" + old[m.end():] == new for m in re.finditer(r"[\w.\[\]]+\.device\b", old))


# Classes of mutants that cannot change what the CPU suite computes, recognised from the diff:
# (test on (original line, mutated line), reason). Everything else needs a named entry.
EQUIVALENCE_RULES = [
    (lambda old, new: "device" in old and (_without_device(old) == _without_device(new) or new == "device = None"
                                           or re.sub(r"[\w.\[\]]+\.device\b", "None", old) == new
                                           or re.sub(r"[\w.\[\]]+\.device,\s*", "", old) == new
                                           or re.sub(r"\bdevice\b", "None", old) == new
                                           or _one_device_to_none(old, new)),
     "device argument dropped or None: on the CPU suite every tensor already lives on the default device "
     "(a GPU run of the suite kills it)"),
    (lambda old, new: old != new and old.replace('"-inf"', '"-INF"').replace('"inf"', '"INF"') == new,
     'float("INF") == float("inf"): float() parses infinities case-insensitively'),
    (lambda old, new: old != new and old.replace('"nan"', '"NAN"') == new,
     'float("NAN") is float("nan"): float() parses NaN case-insensitively'),
]


def rule_reason(diff: str) -> str | None:
    old, new = removed_line(diff), changed_line(diff)
    for test, reason in EQUIVALENCE_RULES:
        if test(old, new):
            return reason
    return None


def changed_line(diff: str) -> str:
    """The first added line of a mutant's diff (what the equivalents list pins), stripped."""
    return _first_line(diff, "+")


def workdir_of(module: str, workdir: Path) -> Path:
    return workdir / module.replace("/", "_").removesuffix(".py")


def run_module(module: str, workdir: Path, equivalents: dict[str, Equivalent], max_children: int,
               rerun: bool = True) -> ModuleResult:
    """Mutate ``module`` in a fresh scratch copy (or, ``rerun=False``, re-read the last run there)."""
    start = time.monotonic()
    dest = prepare_workdir(module, workdir) if rerun else workdir_of(module, workdir)
    log = dest / "mutmut-run.log"
    returncode = 0
    if rerun:
        print(f"mutating {module} in {dest} (log: {log})", file=sys.stderr, flush=True)
        returncode = mutmut(["run", "--max-children", str(max_children)], dest, log=log).returncode
        _add_seconds(dest, time.monotonic() - start)
    result = ModuleResult(module)
    statuses = parse_results(mutmut(["results", "--all", "true"], dest).stdout)
    if not statuses:
        raise SystemExit(f"error: no mutmut results for {module} in {dest} (exit {returncode}); see {log}")
    statuses = {n: s for n, s in statuses.items() if not any(re.search(p, n) for p in SKIP_NAME_PATTERNS)}
    diffs = mutant_diffs([n for n, s in statuses.items() if s != "killed"], dest)
    for name, status in sorted(statuses.items(), key=lambda kv: mutant_sort_key(kv[0])):
        if status == "killed":
            result.killed.append(name)
            continue
        diff = diffs[name]
        result.diffs[name] = diff
        known = equivalents.get(name)
        by_rule = rule_reason(diff) if status == "survived" else None
        if status == "survived" and known is not None and known.line == changed_line(diff):
            result.equivalent.append((name, known.reason))
        elif by_rule is not None:
            result.equivalent.append((name, by_rule))
        elif status == "survived":
            result.survived.append(name)
        else:
            result.other.append((name, status))
    result.seconds = time.monotonic() - start
    if (dest / "run-seconds").exists():  # the runs' own durations (full run + rechecks)
        result.seconds = float((dest / "run-seconds").read_text())
    elif not rerun and log.exists():  # an older run: from writing its config to its last log line
        result.seconds = log.stat().st_mtime - (dest / "setup.cfg").stat().st_mtime
    return result


def mutant_sort_key(name: str) -> tuple[str, int]:
    base, _, number = name.rpartition("__mutmut_")
    return base, int(number) if number.isdigit() else 0


def report(results: list[ModuleResult], date: str) -> str:
    """Markdown: a score table, then per module the survivors (with diffs) and the equivalents."""
    lines = [f"# Mutation testing, {date}", "",
             "mutmut 3, one module at a time, each mutant against the module's test files in "
             "`tools/mutate.py` (`MODULE_TESTS`). Score = caught / non-equivalent mutants (caught: killed, "
             "or a timeout / crash), equivalent mutants left out (reasons below and in `tools/mutation_equivalents.txt`).", "",
             "| module | mutants | killed | survived | equivalent | other | score | time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        total = len(r.killed) + len(r.survived) + len(r.equivalent) + len(r.other)
        lines.append(f"| `{r.module}` | {total} | {len(r.killed)} | {len(r.survived)} | {len(r.equivalent)} | "
                     f"{len(r.other)} | {100 * r.score:.1f}% | {r.seconds / 60:.1f} min |")
    for r in results:
        lines += ["", f"## `{r.module}`", ""]
        if r.survived:
            lines.append("Survived (blind spots, or equivalents not yet listed):")
            lines.append("")
            for name in r.survived:
                lines += [f"- `{name}`: `{changed_line(r.diffs[name])}`"]
        if r.other:
            lines.append("")
            lines.append("Other outcomes: " + ", ".join(f"`{n}` ({s})" for n, s in r.other))
        if r.equivalent:
            lines += ["", "Equivalent:", ""]
            lines += [f"- `{name}`: {reason}" for name, reason in r.equivalent]
        if not (r.survived or r.other or r.equivalent):
            lines.append("Every mutant killed.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="module paths, e.g. radd_fast/noise.py")
    parser.add_argument("--all", action="store_true", help=f"every mapped module ({len(CORE_MODULES)}), one after another")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "radd-mutate")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutants (default 1: shared CPUs)")
    parser.add_argument("--report", type=Path, help="write the markdown report here (default: print it)")
    parser.add_argument("--diffs", action="store_true", help="print each survivor's full diff")
    parser.add_argument("--no-run", action="store_true", help="re-read the last run in --workdir (report only)")
    parser.add_argument("--recheck", nargs="+", metavar="TEST_FILE",
                        help="after writing tests: run the last run's survivors again against these test files "
                             "only, then report")
    args = parser.parse_args(argv)
    modules = (CORE_MODULES if args.all else []) + args.modules
    if not modules:
        parser.error("name a module or pass --all")
    if importlib.util.find_spec("mutmut") is None:
        raise SystemExit("error: mutmut is not installed: pip install mutmut==3.8.1 (or the [mutate] extra)")
    equivalents = load_equivalents()
    for module in modules if args.recheck else []:
        recheck(module, args.workdir, args.recheck, args.max_children)
    rerun = not (args.no_run or args.recheck)
    results = [run_module(m, args.workdir, equivalents, args.max_children, rerun=rerun) for m in modules]
    text = report(results, time.strftime("%Y-%m-%d"))
    if args.report:
        args.report.write_text(text)
    print(text)
    if args.diffs:
        for r in results:
            for name in r.survived:
                print(r.diffs[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
