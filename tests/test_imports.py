"""Import structure of ``src/``: no import circle anywhere (module-level or inside functions),
and the science package never imports the book tooling."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("ge_utils", "ge_book")


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its code (``if TYPE_CHECKING``
    blocks aside). ``from pkg import name`` counts as importing ``pkg`` and, when ``name`` is
    a submodule, ``pkg.name``."""
    files = {_module_name(p, src): p for pkg in PACKAGES for p in (src / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        stack: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.If) and _is_type_checking(node):
                stack.extend(node.orelse)
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
            stack.extend(ast.iter_child_nodes(node))
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_lazy_circle(tmp_path):
    pkg = tmp_path / "ge_utils"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from ge_utils.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from ge_utils import a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ge_utils.a import f\n"
    )
    (tmp_path / "ge_book").mkdir()
    graph = import_graph(tmp_path)
    assert graph["ge_utils.c"] == set()
    assert cycles(graph) == [["ge_utils.a", "ge_utils.b"]]


def test_no_import_circle_in_src():
    assert cycles(import_graph()) == []


def test_science_package_never_imports_the_book_tooling():
    graph = import_graph()
    offenders = {
        m: t
        for m, t in graph.items()
        if m.startswith("ge_utils") and any(x.startswith("ge_book") for x in t)
    }
    assert offenders == {}
