"""The ``cdlm`` package has no import cycles: its module graph, read statically, is acyclic.

Every ``import x`` / ``from x import y`` counts, at module level and inside functions (a lazy import hides a
cycle from the interpreter, not from the design); relative imports are resolved and ``from pkg import name`` is
an edge to ``pkg.name`` when that is a module. Only imports under ``if TYPE_CHECKING:`` are left out, and only
edges between ``cdlm`` modules count (a lazy import of an optional third-party package is fine).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cdlm"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package (a package by its ``__init__.py``)."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth, except inside ``if TYPE_CHECKING:`` (its else counts)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (``from . import x`` inside ``cdlm.a`` -> ``cdlm``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def edges(module: str, path: Path, modules: set[str]) -> set[str]:
    """The ``cdlm`` modules that ``module`` imports by name.

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. The parent
    packages that Python initialises on the way (``cdlm`` for ``import cdlm.a``) are not edges: every module of a
    package would otherwise sit in a cycle with an ``__init__`` that re-exports anything.
    """
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
            continue
        base = resolve(module, is_package, node)
        for alias in node.names:
            targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return (targets & modules) - {module}


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the ``cdlm`` package."""
    files = module_files()
    return {name: edges(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None when it is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "cdlm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cdlm import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cdlm import a\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\n")
    files = module_files(pkg)
    graph = {name: edges(name, path, set(files)) for name, path in files.items()}
    assert graph == {
        "cdlm": set(),
        "cdlm.a": {"cdlm.b"},
        "cdlm.b": set(),
        "cdlm.sub": {"cdlm.sub.c"},
        "cdlm.sub.c": {"cdlm.a"},
    }
    assert find_cycle(graph) is None
    (pkg / "b.py").write_text("import cdlm.sub\n")
    graph["cdlm.b"] = edges("cdlm.b", pkg / "b.py", set(files))
    assert find_cycle(graph) == ["cdlm.a", "cdlm.b", "cdlm.sub", "cdlm.sub.c", "cdlm.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_cdlm_has_no_import_cycles():
    """A cycle means code sits in the wrong module: move what both sides need into a lower one."""
    graph = import_graph()
    assert len(graph) > 20
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
