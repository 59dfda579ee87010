"""The floors of iamrec: modules only import downwards.

The import graph is read from the source with `ast` (nothing is imported): every ``import iamrec...`` and
``from iamrec... import ...`` statement counts, wherever it stands (module top, inside a function, under
``if TYPE_CHECKING:``). An edge goes to the module the statement names, or to the submodule when
``from package import name`` names one. ``python tests/test_layout.py`` prints the cycles.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# The command-line layer and the floor above it (whole tables and sittings run the CLIs and resolve configs
# with their parsers): only these may import `iamrec.cli`.
CLI_MODULES = {"iamrec.cli", "iamrec.__main__", "iamrec.reproduce", "iamrec.session"}
TOP_FLOOR = "iamrec.tables"


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """{module: the iamrec modules it imports}, for every module under ``src/iamrec``."""
    files = {module_name(p, src): p for p in sorted((src / "iamrec").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets.add(base)
                targets.update(
                    f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files
                )
        graph[name] = {t for t in targets if t in files and t != name and t.split(".")[0] == "iamrec"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One closed path through `component` (for the message): a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & members)
        back = [n for n in nxt if n == start]
        if back and len(path) > 1:
            return [*path, start]
        fresh = [n for n in nxt if n not in seen]
        if not fresh:
            return [*path, start]
        path.append(fresh[0])
        seen.add(fresh[0])


def test_library_does_not_import_the_cli():
    graph = import_graph()
    above = {m for m in graph if m in CLI_MODULES or m == TOP_FLOOR or m.startswith(TOP_FLOOR + ".")}
    offenders = sorted(m for m, targets in graph.items() if "iamrec.cli" in targets and m not in above)
    assert not offenders, f"library modules import iamrec.cli (the CLI sits on top): {offenders}"


def test_import_graph_has_no_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles among iamrec modules:\n" + "\n".join(
        " -> ".join(cycle_path(graph, c)) for c in found
    )


def test_the_graph_sees_function_level_imports(tmp_path):
    """The check would catch a circle closed by an import inside a function."""
    pkg = tmp_path / "iamrec"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from iamrec.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from iamrec import a\n    return a\n")
    graph = import_graph(tmp_path)
    assert graph["iamrec.a"] == {"iamrec.b"} and graph["iamrec.b"] == {"iamrec.a", "iamrec"}
    assert cycles(graph) == [["iamrec.a", "iamrec.b"]]


if __name__ == "__main__":
    graph = import_graph()
    found = cycles(graph)
    for component in found:
        print(" -> ".join(cycle_path(graph, component)))
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(found)} cycle(s)")
    sys.exit(1 if found else 0)
