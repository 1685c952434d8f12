"""The layout of pomt_cli: every module imports, the imports form no cycle, layers point down.

The import graph is read with ``ast`` from the sources, so it sees every import: at
module level, inside functions and under ``TYPE_CHECKING``. ``from pomt_cli.x import y``
is an edge to ``pomt_cli.x.y`` where that is a module (``from pomt_cli import digits``),
else to ``pomt_cli.x``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import pomt_cli

PACKAGE = Path(pomt_cli.__file__).parent

#: The layers, lowest first; a module may import its own layer and the layers below.
#: ``options`` parses option values that the library still uses (dtypes, token grids):
#: it sits below the library until the CLI rework moves those parsers out of it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("pomt_cli", "pomt_cli.errors", "pomt_cli.pruning")),
    ("formats", ("pomt_cli.formats",)),
    ("models", ("pomt_cli.models", "pomt_cli.digits", "pomt_cli.options")),
    ("library", ("pomt_cli.selection", "pomt_cli.accuracy", "pomt_cli.measure", "pomt_cli.devices",
                 "pomt_cli.bench", "pomt_cli.export", "pomt_cli.plots")),
    ("pipelines", ("pomt_cli.pipelines",)),
    ("cli", ("pomt_cli.cli", "pomt_cli.commands", "pomt_cli.console", "pomt_cli.__main__")),
]

#: Imports that close a cycle today, each with the change that removes it. An entry
#: that no longer occurs fails the test, so the list only shrinks.
KNOWN_CYCLE_EDGES = {
    # `demo` re-parses argv through the Typer app; library pipelines (issue 8, item 2) end it.
    ("pomt_cli.commands.demo", "pomt_cli.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Every module of pomt_cli -> the pomt_cli modules it imports."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in known}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                if not base.startswith("pomt_cli"):
                    continue
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in known else base)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix that owns ``module``."""
    best, rank = -1, None
    for index, (_, owners) in enumerate(LAYERS):
        for owner in owners:
            if (module == owner or module.startswith(owner + ".")) and len(owner) > best:
                best, rank = len(owner), index
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS in {__file__}"
    return rank


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_function_level_and_module_imports():
    graph = import_graph()
    assert "pomt_cli.digits" in graph["pomt_cli.accuracy.data"]  # from pomt_cli import digits
    assert "pomt_cli.cli" in graph["pomt_cli.commands.demo"]  # inside a function
    assert "pomt_cli.formats.report" in graph["pomt_cli.plots"]  # under TYPE_CHECKING


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_the_imports_form_no_cycle():
    graph = import_graph()
    for source, target in KNOWN_CYCLE_EDGES:
        assert target in graph[source], f"{source} no longer imports {target}: remove it from KNOWN_CYCLE_EDGES"
        graph[source] = graph[source] - {target}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    graph = import_graph()
    upward = [f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for source, targets in sorted(graph.items()) for target in sorted(targets)
              if (source, target) not in KNOWN_CYCLE_EDGES and layer_of(target) > layer_of(source)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_cli_is_the_top_layer():
    graph = import_graph()
    cli = {m for m in graph if LAYERS[layer_of(m)][0] == "cli"}
    importers = {s for s, targets in graph.items() for t in targets if t in cli and s not in cli}
    assert not importers, f"the library imports the CLI: {sorted(importers)}"
    assert cli >= {"pomt_cli.cli", "pomt_cli.commands", "pomt_cli.commands.demo"}
