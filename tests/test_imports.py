"""The package's import graph: no cycles (function-level imports included), no private names across
modules, and a core free of diffusers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "diffquant"
# the core: formats, math, observers, quantized modules, recipes, the trajectory and the methods
CORE = ("qtypes", "primitives", "observers", "timestep", "denoiser", "modes", "recipe", "nn", "trajectory", "methods")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for every import of a diffquant module in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "diffquant"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            if base.split(".")[0] != "diffquant":
                continue
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{base}.{n}" in modules]  # `from pkg import module`
            if subs:
                out += [(f"{base}.{n}", [], node.lineno) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest:
                out.append((base, rest, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {m for m, _, _ in _imports(name, path, modules) if m in modules and m != name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or ``None`` (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if not state.get(m):
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if not state.get(n):
            found = visit(n)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    graph = _graph()
    graph["diffquant.qtypes"] = {*graph["diffquant.qtypes"], "diffquant.quantize"}  # quantize reaches qtypes
    assert _cycle(graph) is not None


def test_no_private_name_is_imported_from_another_module():
    modules = _modules()
    bad = [
        f"{path.relative_to(SRC)}:{line} imports {n} from {m}"
        for name, path in modules.items()
        for m, names, line in _imports(name, path, modules)
        for n in names
        if n.startswith("_") and m != name
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("core", CORE)
def test_the_core_never_imports_diffusers(core):
    files = [PACKAGE / f"{core}.py"] if (PACKAGE / f"{core}.py").is_file() else list((PACKAGE / core).rglob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(m.split(".")[0] == "diffusers" for m in mods), f"{path.relative_to(SRC)} imports diffusers"
