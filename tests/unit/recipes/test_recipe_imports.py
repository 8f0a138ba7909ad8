"""The recipe modules import each other in one direction only.

A circle hidden behind function-level imports (the runner imported the report, the report imported
the runner's presets) still ties the modules together, so the graph counts every import statement,
wherever it sits. The subprocess test then imports each module first in a fresh interpreter, which is
what breaks when a circle is moved to module level.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_opd

PACKAGE_ROOT = Path(megatron_opd.__file__).parent.parent
RECIPES = sorted(p for p in (PACKAGE_ROOT / "megatron_opd" / "recipes").glob("*.py") if p.name != "__init__.py")
MODULES = [f"megatron_opd.recipes.{p.stem}" for p in RECIPES]


def _imports_of(path: Path) -> set[str]:
    """Recipe modules that ``path`` imports anywhere (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"  # open nodes are exactly those on ``path``
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_recipe_modules_import_each_other_without_a_cycle():
    graph = {f"megatron_opd.recipes.{p.stem}": _imports_of(p) - {f"megatron_opd.recipes.{p.stem}"} for p in RECIPES}
    assert graph["megatron_opd.recipes.study_report"], "the graph sees no imports: the parser is broken"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("first", MODULES)
def test_each_recipe_module_imports_first_in_a_fresh_interpreter(first):
    others = [m for m in MODULES if m != first]
    code = "import importlib\n" + "\n".join(f"importlib.import_module({m!r})" for m in [first, *others])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
