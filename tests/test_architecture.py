"""The layout of pomt_cli: every module imports, the imports form no cycle, layers point down.

The import graph is read with ``ast`` from the sources, so it sees every import: at
module level, inside functions and under ``TYPE_CHECKING``. ``from pomt_cli.x import y``
is an edge to ``pomt_cli.x.y`` where that is a module (``from pomt_cli import digits``),
else to ``pomt_cli.x``.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from conftest import triton_major

import pomt_cli

PACKAGE = Path(pomt_cli.__file__).parent

#: The layers, lowest first; a module may import its own layer and the layers below.
#: ``options`` parses option values that the library shares (dtypes, token grids);
#: ``names`` and ``defaults`` hold what ``--help`` shows, in the standard library alone, for
#: every layer above to import.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("pomt_cli", "pomt_cli.errors", "pomt_cli.versions", "pomt_cli.names", "pomt_cli.defaults",
              "pomt_cli.pruning")),
    ("formats", ("pomt_cli.formats",)),
    ("models", ("pomt_cli.models", "pomt_cli.digits", "pomt_cli.options")),
    ("library", ("pomt_cli.selection", "pomt_cli.accuracy", "pomt_cli.measure", "pomt_cli.devices",
                 "pomt_cli.bench", "pomt_cli.export", "pomt_cli.plots", "pomt_cli.report")),
    ("pipelines", ("pomt_cli.pipelines",)),
    ("cli", ("pomt_cli.cli", "pomt_cli.console", "pomt_cli.__main__", "pomt_cli.script_args")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The pomt_cli modules that module ``name`` (its ``source``) imports, wherever the import sits."""
    package = name if is_package else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(source)):
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
    return edges - {name}


def import_graph() -> dict[str, set[str]]:
    """Every module of pomt_cli -> the pomt_cli modules it imports."""
    known = modules()
    return {name: imports_of(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", set(known))
            for name, path in known.items()}


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
            # The package itself owns only its __init__: a new top-level module needs a layer.
            owns_below = owner != "pomt_cli"
            if (module == owner or owns_below and module.startswith(owner + ".")) and len(owner) > best:
                best, rank = len(owner), index
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS in {__file__}"
    return rank


def test_a_module_outside_every_layer_has_none():
    assert LAYERS[layer_of("pomt_cli")][0] == "core"
    assert LAYERS[layer_of("pomt_cli.pruning.tome")][0] == "core"
    with pytest.raises(AssertionError, match="belongs to no layer"):
        layer_of("pomt_cli.newmodule")


def documented_layers(text: str) -> list[tuple[str, set[str]]]:
    """The layers of docs/ARCHITECTURE.md's table, top first: (name, its modules), each
    module named at the top level of its cell (``cli/`` -> ``pomt_cli.cli``, ``errors.py`` ->
    ``pomt_cli.errors``; the files in parentheses are parts of the module before them)."""
    layers = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != 3 or cells[0] in ("layer", "---"):
            continue
        cell = cells[1]
        while "(" in cell:
            cell = re.sub(r"\([^()]*\)", "", cell)
        names = {"pomt_cli." + n.rstrip("/").removesuffix(".py") for n in re.findall(r"`([^`]+)`", cell)}
        layers.append((cells[0].removesuffix(" (top)"), names))
    return layers


def test_the_layers_of_architecture_md_are_the_layers_checked_here():
    text = (PACKAGE.parents[1] / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    expected = [(name, set(owners) - {"pomt_cli"}) for name, owners in reversed(LAYERS)]
    assert documented_layers(text) == expected
    broken = text.replace("| `models.py`, `digits.py`, `options.py` |", "| `models.py`, `digits.py` |")
    assert documented_layers(broken) != expected


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_function_level_and_module_imports():
    graph = import_graph()
    assert "pomt_cli.digits" in graph["pomt_cli.accuracy.data"]  # from pomt_cli import digits
    assert "pomt_cli.formats.report" in graph["pomt_cli.plots"]  # under TYPE_CHECKING
    source = "def f():\n    from .cli import app\n    import pomt_cli.errors\n"
    known = {"pomt_cli.cli", "pomt_cli.cli.app", "pomt_cli.errors", "pomt_cli.report"}
    assert imports_of("pomt_cli.report", source, False, known) == {"pomt_cli.cli.app", "pomt_cli.errors"}


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_imports(name):
    major = triton_major()
    kernels = ("pomt_cli.pruning.triton_received", "pomt_cli.pruning.triton_prune")
    if name in kernels and major is not None and major < 3:
        # The Triton kernels refuse to import without Triton 3, and pomt.py then turns them off
        # (tests/test_versions.py): on torch 2.1's Triton 2 that refusal is the product working.
        with pytest.raises(ImportError, match="is too old for the kernel: it needs Triton 3"):
            importlib.import_module(name)
        return
    importlib.import_module(name)


def test_the_imports_form_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    graph = import_graph()
    upward = [f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for source, targets in sorted(graph.items()) for target in sorted(targets)
              if layer_of(target) > layer_of(source)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_cli_is_the_top_layer_and_the_demo_calls_pipelines():
    graph = import_graph()
    cli = {m for m in graph if LAYERS[layer_of(m)][0] == "cli"}
    importers = {s for s, targets in graph.items() for t in targets if t in cli and s not in cli}
    assert not importers, f"the library imports the CLI: {sorted(importers)}"
    assert cli >= {"pomt_cli.cli", "pomt_cli.cli.app", "pomt_cli.cli.demo"}
    assert "pomt_cli.pipelines" in graph["pomt_cli.cli.demo"]
    assert not {t for t in graph["pomt_cli.pipelines"] if t.startswith("pomt_cli.cli")}
    # The demo pipeline calls the others: only the package, which re-exports it, imports it.
    demo_importers = {s for s, targets in graph.items() if "pomt_cli.pipelines.demonstration" in targets}
    assert demo_importers == {"pomt_cli.pipelines"}, sorted(demo_importers)
