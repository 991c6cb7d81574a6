"""The package's folders are its layers: every import runs from a higher layer to a lower one (or within one
subpackage), no module imports itself back through a circle, and no subpackage's __init__.py imports anything.

Every import counts, including those inside functions and under TYPE_CHECKING: a deferred import is still a
dependency, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "vaecli"
# Lowest first; a module may import from its own subpackage and from those before it.
LAYERS = ("common", "data", "models", "runs", "training", "inference", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def vaecli_imports(path: Path) -> set[str]:
    """The vaecli modules `path` imports, anywhere in it, resolved to module names (not the names imported)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names if alias.name.startswith("vaecli"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vaecli"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE_DIR.parent / (candidate.replace(".", "/") + ".py")).exists()
                imported.add(candidate if is_module else node.module)
    return imported


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): vaecli_imports(path) for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The index of the module's subpackage in LAYERS; None for the package root (vaecli, vaecli.__main__)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import from a module to one in a higher layer, as 'importer -> imported'."""
    found = []
    for module, imports in graph.items():
        own = layer_of(module)
        if own is None:
            continue
        for imported in imports:
            theirs = layer_of(imported)
            if theirs is None or theirs > own:
                found.append(f"{module} -> {imported}")
    return sorted(found)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports among the modules (as a path that returns to its start), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return [*stack[stack.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_every_subpackage_is_a_known_layer():
    subpackages = {path.parent.name for path in PACKAGE_DIR.glob("*/__init__.py")}
    assert subpackages == set(LAYERS)
    loose_modules = {path.name for path in PACKAGE_DIR.glob("*.py")}
    assert loose_modules == {"__init__.py", "__main__.py"}


def test_no_import_from_a_lower_layer_to_a_higher_one():
    assert upward_imports(import_graph()) == []


def test_no_circle_of_imports():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("init", sorted(PACKAGE_DIR.glob("*/__init__.py")), ids=lambda path: path.parent.name)
def test_a_subpackage_init_imports_nothing_and_says_what_lives_there(init):
    tree = ast.parse(init.read_text(encoding="utf-8"))
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    docstring = ast.get_docstring(tree)
    assert docstring and "May import:" in docstring and len(docstring.splitlines()) <= 4


def test_the_checks_catch_an_upward_import_and_a_circle():
    graph = {"vaecli.models.vae": {"vaecli.training.loop"}, "vaecli.training.loop": {"vaecli.models.vae"}}
    assert upward_imports(graph) == ["vaecli.models.vae -> vaecli.training.loop"]
    assert find_cycle(graph) == ["vaecli.models.vae", "vaecli.training.loop", "vaecli.models.vae"]
    assert find_cycle({"vaecli.common.a": {"vaecli.common.b"}, "vaecli.common.b": set()}) is None
