"""Import hygiene of the package: no import cycle between fedhello modules.

An AST scan (nothing is imported) collects every import of a fedhello module, at module level
and inside functions alike, so a cycle cannot hide in a function body. Imports of third-party
modules are not edges: importing an optional heavy dependency (triton, the compiled extension)
where it is used is legitimate. Imports under ``if TYPE_CHECKING:`` count too: they never run, but
two modules that name each other's types are still one tangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedhello"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, at any depth (functions, ``if TYPE_CHECKING:``)."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the fedhello modules it imports (a ``from pkg import name`` counts as ``pkg.name``
    when that is a module, else as ``pkg``)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _edges_within(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]


def test_no_import_cycle_between_fedhello_modules() -> None:
    graph = import_graph(_modules())
    found = cycles(graph)
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(
        f"  {c}: " + "; ".join(_edges_within(c, graph)) for c in found)


def test_the_scan_sees_imports_inside_functions(tmp_path) -> None:
    pkg = tmp_path / "fedhello"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fedhello.sub import b\nimport torch\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    import triton\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fedhello import a\n")
    modules = {".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): p
               for p in sorted(pkg.rglob("*.py"))}
    graph = import_graph(modules)
    assert graph["fedhello.a"] == {"fedhello.sub.b"}
    assert graph["fedhello.sub.b"] == {"fedhello.a"}
    assert graph["fedhello.c"] == {"fedhello.a"}
    assert cycles(graph) == [["fedhello.a", "fedhello.sub.b"]]
