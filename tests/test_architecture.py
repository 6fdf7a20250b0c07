"""The layering the design promises, checked on the source: no import cycle (function-level
imports included), the core imports neither the zoo nor the CLI nor a report renderer, library
code does not print, and no function in onnxq/ is longer than 100 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "onnxq"
# The terminal, the zoo and the report renderer: the core never imports them. (onnxq.plots draws
# the sweep's and the solver's own charts, artifacts of those commands, and may be imported.)
OUTSIDE_CORE = ("onnxq.cli", "onnxq.__main__", "onnxq.zoo", "onnxq.report")
MAX_FUNCTION_LINES = 100


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The onnxq modules ``name`` imports, anywhere in the file (``from pkg import mod`` is an
    import of ``pkg.mod`` when that is a module)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                full = f"{base}.{a.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = {*sources, "onnxq.zoo"}  # the zoo installs as onnxq.zoo from models/
    return {name: _imports(name, path, modules) for name, path in sources.items()}


def _is_ancestor(pkg: str, mod: str) -> bool:
    return mod.startswith(pkg + ".")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan). A package importing
    its own submodules while they import the package's other submodules is not a cycle: edges
    from a module to its own ancestor package are dropped (Python runs the package first)."""
    edges = {m: {d for d in deps if not _is_ancestor(d, m) and d in graph} for m, deps in graph.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _outside_core(module: str) -> bool:
    return any(module == o or module.startswith(o + ".") for o in OUTSIDE_CORE)


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_core_imports_no_cli_zoo_or_renderer():
    graph = _graph()
    bad = {m: sorted(d for d in deps if _outside_core(d)) for m, deps in graph.items() if not _outside_core(m)}
    assert {m: d for m, d in bad.items() if d} == {}


def test_library_code_does_not_print():
    """Library code logs; the CLI owns the terminal."""
    printing = []
    for name, path in _sources().items():
        if _outside_core(name):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{name}:{node.lineno}")
    assert printing == []


def test_no_function_over_100_lines():
    """Orchestration that grows past a screen is missing a step (argument-parser builders aside)."""
    long = []
    for name, path in _sources().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.endswith("_parser"):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_the_checker_finds_a_cycle():
    """The cycle test can fail: a two-module loop is found."""
    assert _cycles({"onnxq.a": {"onnxq.b"}, "onnxq.b": {"onnxq.a"}, "onnxq.c": set()}) == [["onnxq.a", "onnxq.b"]]
