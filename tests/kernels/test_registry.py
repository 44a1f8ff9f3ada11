"""The table of kernels (radd_fast/kernels/registry.py) is complete and true.

Complete: every module of radd_fast/kernels/ but the shared launcher code, the table and the package
has an entry. True: every name an entry holds exists and is what the entry says (the module and its
public function, its reference, its per-card configuration functions and no others, its test file,
its benchmark, its ahead-of-time family and the Triton kernels that family builds, its model-facing
caller), and docs/KERNELS.md names it.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

import radd_fast
from radd_fast.kernels.registry import KERNELS, NOT_KERNELS, KernelSpec

REPO = Path(radd_fast.__file__).resolve().parents[1]
ENTRIES = list(KERNELS.values())
IDS = list(KERNELS)


@functools.cache
def _aot_build():
    """tools/aot_build.py, imported once from its path (it needs Triton, not a GPU)."""
    spec = importlib.util.spec_from_file_location("aot_build_tool", REPO / "tools" / "aot_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _imported_modules(path: Path) -> set[str]:
    """The dotted names a file imports from (relative imports keep only their tail)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _imports_kernel(path: Path, name: str) -> bool:
    return any(m == f"kernels.{name}" or m.endswith(f".kernels.{name}") for m in _imported_modules(path))


def test_every_kernel_module_has_an_entry_and_every_entry_a_module():
    modules = {p.stem for p in (REPO / "radd_fast" / "kernels").glob("*.py")} - set(NOT_KERNELS)
    assert modules == set(KERNELS), (
        f"modules without an entry in radd_fast/kernels/registry.py: {sorted(modules - set(KERNELS))}; "
        f"entries without a module: {sorted(set(KERNELS) - modules)}")


def test_entries_are_frozen_data_keyed_by_their_names():
    assert all(isinstance(k, KernelSpec) and key == k.name for key, k in KERNELS.items())
    with pytest.raises(AttributeError):
        ENTRIES[0].name = "other"  # frozen dataclass: dataclasses.FrozenInstanceError is an AttributeError


@pytest.mark.parametrize("k", ENTRIES, ids=IDS)
def test_module_function_and_reference_exist(k):
    assert (REPO / k.path).is_file(), k.path
    module = importlib.import_module(k.module)
    fn = k.resolve(k.function)
    assert callable(fn) and getattr(module, k.function) is fn
    assert not k.function.startswith("_"), f"{k.name}: its public function {k.function!r} is private"
    assert inspect.unwrap(fn).__module__ == k.module, f"{k.name}.{k.function} is defined elsewhere"
    assert k.reference.rpartition(".")[2].endswith("_ref"), f"{k.name}: the reference {k.reference!r} is no <op>_ref"
    assert callable(k.resolve(k.reference))


@pytest.mark.parametrize("k", ENTRIES, ids=IDS)
def test_config_functions_are_exactly_the_modules(k):
    module = importlib.import_module(k.module)
    defined = {name for name, obj in vars(module).items()
               if name.endswith("_config_for") and callable(obj) and getattr(obj, "__module__", None) == k.module}
    assert set(k.configs) == defined, (
        f"{k.name}: the table lists configuration functions {sorted(k.configs)}, the module defines {sorted(defined)}")
    for name in k.configs:
        assert list(inspect.signature(getattr(module, name)).parameters)[:2] == ["capability", "smem_limit"], name


@pytest.mark.parametrize("k", ENTRIES, ids=IDS)
def test_test_file_exists(k):
    assert (REPO / k.test_path).is_file(), (
        f"kernel {k.name!r}: its tests belong in {k.test_path} (tests/ mirrors radd_fast/), which does not exist")


@pytest.mark.parametrize("k", ENTRIES, ids=IDS)
def test_benchmark_module_exists_and_runs_by_the_runner(k):
    path = REPO / k.benchmark_path
    assert path.is_file(), f"kernel {k.name!r}: no benchmark {k.benchmark_path}"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), (
        f"{k.benchmark_path} has no run(device, quick), which benchmarks/run.py calls")
    from benchmarks import run as bench_run

    assert k.benchmark in bench_run.MODULES


def test_the_benchmark_runner_lists_the_tables_benchmarks_first():
    from benchmarks import run as bench_run

    kernel_benchmarks = list(dict.fromkeys(k.benchmark for k in ENTRIES))
    assert bench_run.MODULES[:len(kernel_benchmarks)] == kernel_benchmarks
    assert not set(bench_run.OTHER_MODULES) & set(kernel_benchmarks)


def test_aot_families_are_the_tables():
    aot = _aot_build()
    assert list(aot.FAMILIES) == [k.aot_family for k in ENTRIES if k.aot_family]


@pytest.mark.parametrize("k", ENTRIES, ids=IDS)
def test_aot_family_builds_the_modules_triton_kernels(k):
    """A module with Triton kernels has a family, which builds its kernels and only them; a module
    without (the dispatcher) has none."""
    from radd_fast.kernels.utils import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("no Triton")
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module(k.module)
    # @triton.jit gives a JITFunction, or under TRITON_INTERPRET=1 (the CPU suite) an InterpretedFunction
    kernel_types = (triton.runtime.jit.JITFunction, InterpretedFunction)
    jitted = {name for name, obj in vars(module).items() if isinstance(obj, kernel_types)}
    if k.aot_family is None:
        assert not jitted, f"{k.name} defines Triton kernels {sorted(jitted)} but has no aot_family"
        return
    assert jitted, f"{k.name} names the family {k.aot_family!r} but defines no Triton kernel"
    specs = _aot_build().FAMILIES[k.aot_family](90)
    built = {spec.kernel.fn.__name__ for spec in specs}
    assert {spec.kernel.fn.__module__ for spec in specs} == {k.module}
    assert built <= jitted


@pytest.mark.parametrize("k", ENTRIES, ids=IDS)
def test_model_facing_caller_imports_it(k):
    assert k.caller in ("model/ops.py", "model/head.py"), k.caller
    caller = REPO / "radd_fast" / k.caller
    assert caller.is_file()
    if k.through is None:
        assert _imports_kernel(caller, k.name), f"{k.caller} does not import kernels.{k.name}"
    else:
        assert k.through in KERNELS and KERNELS[k.through].caller == k.caller
        assert _imports_kernel(caller, k.through), f"{k.caller} does not import kernels.{k.through}"
        assert _imports_kernel(REPO / KERNELS[k.through].path, k.name), (
            f"{k.through}.py, which {k.name} is reached through, does not import it")


@pytest.mark.parametrize("k", ENTRIES, ids=IDS)
def test_docs_name_every_kernel(k):
    assert f"`{k.name}.py`" in (REPO / "docs" / "KERNELS.md").read_text(encoding="utf-8")
