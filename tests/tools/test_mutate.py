"""tools/mutate.py's own logic: which survivors it calls equivalent, how it scores, and the committed list.

The tool decides what the mutation report counts, so its rules are tested like code: a rule
that matched too much would hide blind spots. No mutmut run here (that is `make mutate`).
"""
from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.support.paths import REPO

ROOT = REPO


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("mutate_tool", ROOT / "tools" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def diff(old: str, new: str) -> str:
    return f"--- a\n+++ b\n@@ -1 +1 @@\n-    {old}\n+    {new}\n"


@pytest.mark.parametrize("old, new", [
    ("x = torch.empty(n, device=x.device)", "x = torch.empty(n, )"),
    ("x = torch.empty(n, device=x.device)", "x = torch.empty(n, device=None)"),
    ("return _new((0, D), x.dtype, x.device), dw, _new((C,), x.dtype, x.device)",
     "return _new((0, D), x.dtype, None), dw, _new((C,), x.dtype, x.device)"),
    ("found = find(run_dir, device)", "found = find(run_dir, None)"),
    ('m = float("inf")', 'm = float("INF")'),
    ('t.fill_(float("nan"))', 't.fill_(float("NAN"))'),
])
def test_rules_recognise_device_and_spelling_mutants(mutate, old, new):
    assert mutate.rule_reason(diff(old, new)) is not None


@pytest.mark.parametrize("old, new", [
    ("x = torch.empty(n, dtype=x.dtype)", "x = torch.empty(n, dtype=None)"),  # a dtype is not a device
    ("return _new((0, D), x.dtype, x.device)", "return _new((0, D), None, x.device)"),
    ('t.fill_(float("nan"))', 't.fill_(float("XXnanXX"))'),
    ("if a >= b:", "if a > b:"),
])
def test_rules_leave_real_changes_alone(mutate, old, new):
    assert mutate.rule_reason(diff(old, new)) is None


def test_score_counts_timeouts_as_caught_and_no_tests_as_not(mutate):
    result = mutate.ModuleResult("m", killed=["a", "b"], survived=["c"], other=[("d", "timeout"), ("e", "no tests")])
    assert result.score == 3 / 5
    assert mutate.ModuleResult("empty").score == 1.0


def test_results_lines_are_parsed(mutate):
    text = "    radd_fast.noise.x_f__mutmut_1: killed\n    radd_fast.noise.x_f__mutmut_2: survived\nother line\n"
    assert mutate.parse_results(text) == {"radd_fast.noise.x_f__mutmut_1": "killed",
                                          "radd_fast.noise.x_f__mutmut_2": "survived"}


def test_the_committed_equivalents_parse_and_name_mapped_modules(mutate):
    entries = mutate.load_equivalents()
    assert len(entries) > 100
    modules = {m.removesuffix(".py").replace("/", ".") for m in mutate.MODULE_TESTS}
    for name, entry in entries.items():
        assert entry.line and entry.reason, name
        assert any(name.startswith(m + ".") for m in modules), f"{name}: not a mapped module"


def test_every_mapped_test_file_exists(mutate):
    for module, tests in mutate.MODULE_TESTS.items():
        assert (ROOT / module).exists(), module
        for test in tests:
            assert (ROOT / test).exists(), f"{module}: {test}"
    assert mutate.CORE_MODULES == list(mutate.MODULE_TESTS)


def test_a_bad_equivalents_file_is_one_clear_error(mutate, tmp_path):
    bad = tmp_path / "eq.txt"
    bad.write_text("radd_fast.noise.x__mutmut_1\n    because: no\n")
    with pytest.raises(SystemExit, match="cannot read"):
        mutate.load_equivalents(bad)
    bad.write_text("radd_fast.noise.x__mutmut_1\n    line:\n    why: no line pinned\n")
    with pytest.raises(SystemExit, match="empty 'line:'"):
        mutate.load_equivalents(bad)
