"""The package's import graph, read from the source with ``ast``: no circles, and the rooms keep apart.

Every ``import`` / ``from ... import`` counts, function-local ones too (a lazy import
hides a circle; it does not remove it). Relative imports are resolved against the
importing module; ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg``. A package's ``__init__`` is the module ``pkg``.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.support.paths import REPO

ROOT = REPO
PACKAGE = "radd_fast"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _base_package(module: str, is_package: bool, level: int) -> str:
    """The package a relative import of ``level`` dots starts from."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    return ".".join(parts[:len(parts) - (level - 1)])


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``module`` imports (anywhere in its body)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _base_package(module, is_package, node.level)
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in modules else source)
    return {m for m in found if m in modules and m != module}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {name: imports_of(name, path, names) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_walker_resolves_relative_and_local_imports(tmp_path):
    """The walker itself: relative levels, ``from . import module``, and function-local imports."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom ..sub import c\n")
    (pkg / "sub" / "c.py").write_text("import pkg.a\n")
    modules = {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.c"}
    assert imports_of("pkg", pkg / "__init__.py", modules) == {"pkg.a"}
    assert imports_of("pkg.a", pkg / "a.py", modules) == {"pkg.sub.b"}
    assert imports_of("pkg.sub.b", pkg / "sub" / "b.py", modules) == {"pkg.a", "pkg.sub.c"}
    assert imports_of("pkg.sub.c", pkg / "sub" / "c.py", modules) == {"pkg.a"}
    graph = {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.a", "pkg.sub.c"},
             "pkg.sub.c": {"pkg.a"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "radd_fast.checkpoint" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between the package's modules: " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_sampling_imports_no_kernel():
    """The sampler reaches the output head through model/head.py, never a kernel module directly."""
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t.startswith(f"{PACKAGE}.kernels"))
                 for m, targets in graph.items() if m.startswith(f"{PACKAGE}.sampling")}
    offenders = {m: t for m, t in offenders.items() if t}
    assert not offenders, f"sampling modules import kernels: {offenders}"
