"""No import cycle among the proxy's own modules (issue 25): read statically from every ``import`` in
proxy/ (at module level, in functions and under ``TYPE_CHECKING`` alike), so a cycle that only a lazy
import hides today fails here too."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness import REPO

PACKAGE = REPO / "proxy"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The proxy modules ``path`` imports (``from proxy import memory`` names proxy.memory)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    # a submodule's import of its own package (``proxy`` from ``from proxy import x``) is not a cycle
    return {m for m in out if m in known and m != name and not name.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name, set(files)) for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_proxy_modules() -> None:
    edges = graph()
    assert {"proxy.manager", "proxy.config", "proxy.needs", "proxy.worker.server"} <= set(edges)
    assert "proxy.config" in edges["proxy.manager"]  # the graph sees imports at all
    found = cycles(edges)
    shown = ["; ".join(f"{m} imports {sorted(edges[m] & set(c))}" for m in c) for c in found]
    assert not found, f"import cycles: {shown}"
