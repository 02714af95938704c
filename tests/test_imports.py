"""The package's import graph: layers point one way and no module cycle returns.

Every `import` in every module counts, function-level (lazy) ones included: a lazy
import hides a cycle from Python, not from a reader.
"""

import ast
from pathlib import Path

import jaxsft

ROOT = Path(jaxsft.__file__).parent
# Cycles allowed, each with its reason. The template registry: `templates.get_template`
# builds a Hugging Face template by name (Grain workers rebuild templates from names), and
# `hf_template` subclasses the registry's `Template`.
ALLOWED_CYCLES = {frozenset({"jaxsft.data.templates", "jaxsft.data.hf_template"})}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name and t != "jaxsft"}
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or not."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [g for g in groups if len(g) > 1]


def test_no_import_cycles_but_the_justified_ones():
    cycles = [sorted(g) for g in strongly_connected(import_graph()) if frozenset(g) not in ALLOWED_CYCLES]
    assert not cycles, f"import cycles: {cycles}"


def test_layers_point_one_way():
    """data/ and model/ never import train/, infer/, eval/ or the CLI, nor each other."""
    above = ("jaxsft.train", "jaxsft.infer", "jaxsft.eval", "jaxsft.cli")
    wrong = {}
    for module, targets in import_graph().items():
        forbidden = above + (
            ("jaxsft.model",)
            if module.startswith("jaxsft.data")
            else ("jaxsft.data",)
            if module.startswith("jaxsft.model")
            else ()
        )
        if module.startswith(("jaxsft.data", "jaxsft.model")):
            bad = sorted(t for t in targets if t.startswith(forbidden))
            if bad:
                wrong[module] = bad
    assert not wrong, f"imports against the layering: {wrong}"


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [{"a", "b", "c"}]
