"""The package's imports run downward only: no cycle, no upward import, no import hidden inside a function.

Layers, bottom to top (a module may import its own layer or lower ones, never a higher one):

    errors → groups, compare, structures, cost → capture, report, ort, datasets, kernels, timing
    → passes → search → rebuild, restrict → pipeline, export, artifacts, pretrained, latency → api, bench
    → the package root → cli, demo
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "upop_fx"
PACKAGE = "upop_fx"

LAYERS = [
    ["errors"],
    ["groups", "compare", "structures", "cost"],
    ["capture", "report", "ort", "datasets", "kernels", "timing"],
    ["passes"],
    ["search"],
    ["rebuild", "restrict"],
    ["pipeline", "export", "artifacts", "pretrained", "latency"],
    ["api", "bench"],
    [""],  # upop_fx/__init__.py: the public facade
    ["cli", "demo"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PACKAGE, *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The package modules an ``import from`` names (a submodule when the imported name is one)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith(PACKAGE):
        return []
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.append(sub if sub in MODULES else target)
    return found


def _imports() -> tuple[nx.DiGraph, list[str]]:
    graph = nx.DiGraph()
    hidden = []
    for module, path in MODULES.items():
        graph.add_node(module)
        tree = ast.parse(path.read_text(), str(path))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(PACKAGE)]
            else:
                continue
            for t in targets:
                if t != module:
                    graph.add_edge(module, t)
                    if id(node) not in top:
                        hidden.append(f"{module} imports {t} inside a function or block (line {node.lineno})")
    return graph, hidden


def _layer(module: str) -> int:
    rel = module[len(PACKAGE) + 1 :] if module != PACKAGE else ""
    head = rel.split(".")[0]
    if head not in RANK:
        pytest.fail(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return RANK[head]


GRAPH, HIDDEN = _imports()


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])


def test_imports_only_go_down():
    upward = [f"{a} -> {b}" for a, b in GRAPH.edges if _layer(b) > _layer(a)]
    assert not upward, "upward imports: " + ", ".join(upward)


def test_no_package_import_inside_a_function():
    assert not HIDDEN, "\n".join(HIDDEN)


def test_the_walk_sees_the_imports():
    """The checks above must be able to fail: the walk finds known edges."""
    assert GRAPH.has_edge("upop_fx.passes.surgery", "upop_fx.passes.split_slots")
    assert GRAPH.has_edge("upop_fx.pipeline", "upop_fx.search.strategy")
    assert GRAPH.has_edge("upop_fx.passes.rules.attention", "upop_fx.passes.rules.registry")
    assert _layer("upop_fx.search.upop") > _layer("upop_fx.passes.insert_masks")
