"""llmshrink's imports form layers: no import cycles, and no module imports one of a higher layer.

Every module under llmshrink/ is read with `ast` (nothing is imported). Its imports of llmshrink modules count
wherever they are, at module level or inside a function (a function-level import is still a dependency; it
only runs later), except under `if TYPE_CHECKING:`, which never runs. Imports by name through importlib
(the registry loading a pass, modules/__init__ collecting the layer files) are not seen.

LAYERS lists the layers, lowest first. A module may import modules of its own layer or a lower one; a layer
marked `sideways=False` forbids imports between its own modules too (a pass imports no other pass: shared
helpers go to a lower layer, and a pass runs another only through the registry, as iterate does). Every
module must be in exactly one layer, so a new module has to be placed here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmshrink"


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]  # exact module names, or "pkg.*" for every module below pkg (not pkg itself)
    sideways: bool = True  # may modules of this layer import each other?


LAYERS = (
    Layer("base", (
        # torch-free building blocks (settings, errors, files), and generic helpers on torch modules
        "llmshrink.errors", "llmshrink.fields", "llmshrink.fileio", "llmshrink.quiet", "llmshrink.version",
        "llmshrink.specs", "llmshrink.corpus", "llmshrink.targeting", "llmshrink.checkpoint_files",
        "llmshrink.lazy_load", "llmshrink.task_data",
        "llmshrink.planning.spec",  # the recipe's target: and search: sections
        "llmshrink.export.spec",  # the recipe's export: section (the export modules take their quant names from it)
        # package __init__s that import nothing of llmshrink
        "llmshrink.eval", "llmshrink.distill", "llmshrink.decompose", "llmshrink.passes",
    )),
    # The compressed layers: copied verbatim as remote code, so they import nothing of llmshrink at all.
    Layer("modules", ("llmshrink.modules", "llmshrink.modules.*")),
    Layer("decompose", ("llmshrink.decompose.*",)),
    Layer("models and checkpoints", (
        "llmshrink.models", "llmshrink.builtin_models", "llmshrink.bnb", "llmshrink.remote_template",
        "llmshrink.encoders",  # which model.task fits a model; sentence-transformers files of a checkpoint
        "llmshrink.checkpoint",
        "llmshrink.checkpoint_load",
        "llmshrink",  # __init__: __version__ and llmshrink.load (checkpoint_load)
    )),
    # Measuring a model and training it: used by the passes, the engine and the CLI; never imports a pass.
    Layer("eval and distill", ("llmshrink.eval.*", "llmshrink.distill.*")),
    Layer("pass support", (
        "llmshrink.context", "llmshrink.importance", "llmshrink.sensitivity", "llmshrink.blocks",
        "llmshrink.families", "llmshrink.prune_units", "llmshrink.refit_output",
        "llmshrink.quant_layers", "llmshrink.passes.base",
    )),
    # Exports of a checkpoint (hf-dense, then gguf, onnx): load it, make it plain, write and verify it in its
    # runtime; read the families' layouts; used by the CLI.
    Layer("export", ("llmshrink.export", "llmshrink.export.*")),
    # The pass configs register themselves with the registry, which imports the configs package (whose
    # __init__ imports each config through importlib) when a pass is first looked up.
    Layer("registry", ("llmshrink.registry", "llmshrink.passes.configs")),
    Layer("stage parsing", ("llmshrink.stages",)),
    Layer("pass configs", ("llmshrink.passes.configs.*",)),
    Layer("parts of one pass", ("llmshrink.passes.quantize_mixed",)),  # quantize's method `mixed`
    Layer("passes", ("llmshrink.passes.*",), sideways=False),
    Layer("recipe", ("llmshrink.recipe",)),
    # The target: planner (issue 18): measures decisions through the passes, chooses; the engine runs its plan.
    Layer("planning", (
        "llmshrink.planning", "llmshrink.planning.solver", "llmshrink.planning.candidates",
        "llmshrink.planning.measure", "llmshrink.planning.planner",
    )),
    # Running a recipe: the engine, the recipe's evaluate: section, the model card it writes.
    Layer("engine", ("llmshrink.engine", "llmshrink.eval.evaluator", "llmshrink.hub")),
    Layer("compare and push", (
        "llmshrink.compare", "llmshrink.compare_protocols", "llmshrink.pareto_plot", "llmshrink.push",
        "llmshrink.sweep",  # a target: recipe at several budgets, then compare
        "llmshrink.plan_recipe",  # llmshrink plan: a target: recipe planned, not compressed
    )),
    Layer("cli", ("llmshrink.cli", "llmshrink.__main__")),
)

# Direct imports that are refused whatever the layers say: (importer pattern, imported pattern, why).
FORBIDDEN = (
    ("llmshrink.eval.*", "llmshrink.passes", "evaluation never depends on a pass"),
    ("llmshrink.eval.*", "llmshrink.passes.*", "evaluation never depends on a pass"),
    ("llmshrink.checkpoint*", "llmshrink.passes", "checkpoints never depend on a pass"),
    ("llmshrink.checkpoint*", "llmshrink.passes.*", "checkpoints never depend on a pass"),
    # A pass changes the model, a checkpoint saves it: what both need (set_module_attrs) lives lower, in targeting.
    ("llmshrink.passes.*", "llmshrink.checkpoint", "a pass never depends on saving checkpoints"),
    ("llmshrink.passes.*", "llmshrink.checkpoint_load", "a pass never depends on loading checkpoints"),
)


# --- reading the imports ---------------------------------------------------------------------------------


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (llmshrink/evals/ is lm-eval data, not a package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if "evals" in parts or "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> dict[str, int]:
    """{imported llmshrink module: first line} of one module's source, module- and function-level alike,
    leaving out what only `if TYPE_CHECKING:` imports. `from pkg import name` counts as pkg.name when that
    is a module, else as pkg."""
    package = module if is_package else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if (target == "llmshrink" or target.startswith("llmshrink.")) and target != module:
            found.setdefault(target, line)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:  # the else branch does run
                    visit_node(other)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base, node.lineno)
        visit(node)

    visit(ast.parse(source))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """{module: {imported llmshrink module: line}} for every module of the package."""
    names = module_names(root)
    known = set(names)
    return {
        name: {target: line for target, line in imports_of(path.read_text(encoding="utf-8"), name,
                                                           path.name == "__init__.py", known).items()
               if target in known}
        for name, path in names.items()
    }


# --- checking them ---------------------------------------------------------------------------------------


def _matches(module: str, pattern: str) -> bool:
    """An exact name, or a prefix ending in "*" ("pkg.*": every module below pkg)."""
    return module.startswith(pattern[:-1]) if pattern.endswith("*") else module == pattern


def layer_of(module: str, layers: tuple[Layer, ...]) -> int | None:
    """Index of the module's layer: an exact name wins, then the longest matching "pkg.*" pattern."""
    best: tuple[int, int] | None = None  # (specificity, layer index)
    for index, layer in enumerate(layers):
        for pattern in layer.modules:
            if pattern == module:
                return index
            if pattern.endswith(".*") and _matches(module, pattern):
                rank = len(pattern)
                if best is None or rank > best[0]:
                    best = (rank, index)
    return None if best is None else best[1]


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) for each group of modules that import each other (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, {})):
            if target not in index:
                strongconnect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, {}):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, dict[str, int]], members: set[str]) -> list[str]:
    """A concrete cycle through the first member, found by a breadth-first search inside the component."""
    start = min(members)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph.get(node, {})):
            if target == start:
                return [*paths[node], start]
            if target in members and target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def layer_problems(graph: dict[str, dict[str, int]], layers: tuple[Layer, ...],
                   forbidden: tuple[tuple[str, str, str], ...] = ()) -> list[str]:
    """One line per module without a layer, per import of a higher layer (or sideways where the layer
    forbids it), and per forbidden import."""
    problems = [f"{module}: in no layer; add it to LAYERS" for module in sorted(graph)
                if layer_of(module, layers) is None]
    for module in sorted(graph):
        mine = layer_of(module, layers)
        for target, line in sorted(graph[module].items()):
            theirs = layer_of(target, layers)
            where = f"{module}:{line} imports {target}"
            if mine is not None and theirs is not None:
                if theirs > mine:
                    problems.append(f"{where}: layer {layers[mine].name!r} imports the higher layer "
                                    f"{layers[theirs].name!r}")
                elif theirs == mine and not layers[mine].sideways:
                    problems.append(f"{where}: both in layer {layers[mine].name!r}, whose modules import no "
                                    "other of it; move what they share to a lower layer")
            for importer, imported, why in forbidden:
                if _matches(module, importer) and _matches(target, imported):
                    problems.append(f"{where}: {why}")
    return problems


# --- the package --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph()


def test_the_package_has_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_module_imports_a_higher_layer(graph):
    problems = layer_problems(graph, LAYERS, FORBIDDEN)
    assert not problems, "\n".join(problems)


def test_every_layer_entry_names_modules_that_exist(graph):
    stale = [pattern for layer in LAYERS for pattern in layer.modules
             if not any(_matches(module, pattern) for module in graph)]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_the_graph_sees_known_imports(graph):
    # A reader that silently found nothing would pass the checks above.
    assert "llmshrink.errors" in graph["llmshrink.targeting"]
    assert "llmshrink.passes.configs" in graph["llmshrink.registry"]  # function-level
    assert "llmshrink.context" not in graph["llmshrink.passes.base"]  # only under TYPE_CHECKING
    assert "llmshrink.bnb" in graph["llmshrink.passes.quantize"]  # from llmshrink import bnb
    assert len(graph) > 80


# --- the checker itself -------------------------------------------------------------------------------


def test_imports_of_counts_function_level_and_relative_imports_but_not_type_checking():
    source = """
from typing import TYPE_CHECKING
import llmshrink.a
from llmshrink import b
from llmshrink.c import helper
from . import d
from .e import thing

if TYPE_CHECKING:
    from llmshrink.hidden import Hidden
else:
    import llmshrink.shown

def later():
    from llmshrink.inner import x
    import json
"""
    known = {"llmshrink.a", "llmshrink.b", "llmshrink.c", "llmshrink.pkg.d", "llmshrink.pkg.e",
             "llmshrink.hidden", "llmshrink.shown", "llmshrink.inner"}
    found = imports_of(source, "llmshrink.pkg.mod", is_package=False, known=known)
    assert set(found) == {"llmshrink.a", "llmshrink.b", "llmshrink.c", "llmshrink.pkg.d", "llmshrink.pkg.e",
                          "llmshrink.shown", "llmshrink.inner"}
    assert found["llmshrink.inner"] == 15  # its line


SYNTHETIC_LAYERS = (
    Layer("low", ("llmshrink.low", "llmshrink.util.*")),
    Layer("plugins", ("llmshrink.plugins.*",), sideways=False),
    Layer("high", ("llmshrink.high",)),
)


def test_checker_reports_a_cycle_an_upward_import_a_sideways_import_and_an_unplaced_module():
    graph = {
        "llmshrink.low": {"llmshrink.high": 3},  # upward, and part of a cycle
        "llmshrink.high": {"llmshrink.plugins.one": 5, "llmshrink.util.x": 6},
        "llmshrink.plugins.one": {"llmshrink.low": 7, "llmshrink.plugins.two": 8},  # sideways
        "llmshrink.plugins.two": {},
        "llmshrink.util.x": {},
        "llmshrink.stray": {"llmshrink.low": 1},
    }
    assert find_cycles(graph) == [["llmshrink.high", "llmshrink.plugins.one", "llmshrink.low", "llmshrink.high"]]
    problems = layer_problems(graph, SYNTHETIC_LAYERS, (("llmshrink.util.*", "llmshrink.high", "no"),))
    assert problems == [
        "llmshrink.stray: in no layer; add it to LAYERS",
        "llmshrink.low:3 imports llmshrink.high: layer 'low' imports the higher layer 'high'",
        "llmshrink.plugins.one:8 imports llmshrink.plugins.two: both in layer 'plugins', whose modules import "
        "no other of it; move what they share to a lower layer",
    ]


def test_checker_accepts_a_layered_graph_and_reports_a_forbidden_import():
    graph = {
        "llmshrink.high": {"llmshrink.plugins.one": 1, "llmshrink.low": 2},
        "llmshrink.plugins.one": {"llmshrink.low": 1, "llmshrink.util.x": 2},
        "llmshrink.util.x": {"llmshrink.low": 1},
        "llmshrink.low": {},
    }
    assert find_cycles(graph) == []
    assert layer_problems(graph, SYNTHETIC_LAYERS) == []
    forbidden = (("llmshrink.plugins.*", "llmshrink.util.*", "plugins use no util"),)
    assert layer_problems(graph, SYNTHETIC_LAYERS, forbidden) == [
        "llmshrink.plugins.one:2 imports llmshrink.util.x: plugins use no util"
    ]


def test_a_self_import_through_a_package_is_no_cycle_but_a_two_module_loop_is():
    assert find_cycles({"llmshrink.a": {"llmshrink.b": 1}, "llmshrink.b": {}}) == []
    assert find_cycles({"llmshrink.a": {"llmshrink.b": 1}, "llmshrink.b": {"llmshrink.a": 1}}) == [
        ["llmshrink.a", "llmshrink.b", "llmshrink.a"]
    ]
