"""No two of the project's modules import each other, directly or around a longer circle.

The graph is built from the source, not from what happens to be imported at run time, so an import
hidden inside a function still counts: hiding it only moves the circle to the first call. Imports
under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("codec", "meshd", "meshtui")


def project_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` under ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The project modules ``module`` imports anywhere in its file, each with the line of its first import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = _type_checking_only(tree)
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from pkg import name`` imports the submodule pkg.name when there is one, else pkg itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target in modules and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, int]]:
    """Module -> the modules it imports (with the line), over the project's own modules."""
    modules = project_modules(root, packages)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One circle of imports as ``[a, b, ..., a]``, or None when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path], root: Path = ROOT) -> str:
    """``a (a.py:12) -> b (b.py:40) -> a``: where each import of the circle is written."""
    hops = [f"{a} ({modules[a].relative_to(root)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join([*hops, cycle[-1]])


def test_no_module_of_the_project_imports_itself_around_a_circle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + describe(cycle, graph, project_modules())


def test_a_function_level_import_that_closes_a_circle_is_found(tmp_path):
    """The checker itself: a circle hidden in a function is reported, a TYPE_CHECKING one is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "app.py").write_text("from .sub import screen\n")
    (pkg / "sub" / "screen.py").write_text("from typing import TYPE_CHECKING\n"
                                           "if TYPE_CHECKING:\n    from ..app import App\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert find_cycle(graph) is None
    (pkg / "cli.py").write_text("def main():\n    from pkg.sub.screen import run\n")
    (pkg / "sub" / "screen.py").write_text("def run():\n    from .. import cli\n")
    cycle = find_cycle(graph := import_graph(tmp_path, ("pkg",)))
    assert cycle == ["pkg.sub.screen", "pkg.cli", "pkg.sub.screen"]
    text = describe(cycle, graph, project_modules(tmp_path, ("pkg",)), tmp_path)
    assert text == "pkg.sub.screen (pkg/sub/screen.py:2) -> pkg.cli (pkg/cli.py:2) -> pkg.sub.screen"
