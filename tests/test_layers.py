"""The package's imports run downward only: no cycle, no upward import, no import hidden inside a function.

Each top-level folder (and each top-level module) is a unit; units form layers, bottom to top:

    errors, logs → options, compare → ir → capture → kernels → passes → training → runtime → search → module
    → report, datasets → calibration → pipeline → artifacts → api → the package root → cli, demo, integrations

A module may import its own unit or a lower layer — never a higher layer, and never another unit of its own
layer. Inside a folder the files are ordered too (:data:`ORDER`, bottom first; the folder's ``__init__`` last):
a file imports only files before it. The checker runs on a copy with a planted violation to show it can fail.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "upop_fx"
PACKAGE = "upop_fx"

LAYERS = [
    ["errors", "logs"],
    ["options", "compare"],
    ["ir"],
    ["capture"],
    ["kernels"],
    ["passes"],
    ["training"],
    ["runtime"],
    ["search"],
    ["module"],
    ["report", "datasets"],
    ["calibration"],
    ["pipeline"],
    ["artifacts"],
    ["api"],
    [""],  # upop_fx/__init__.py: the public facade
    ["cli", "demo", "integrations"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

#: per folder, its files bottom first ("": the folder's __init__, always last)
ORDER = {
    "ir": ["groups", "cost", "entries", "latency_model", ""],
    "capture": ["filled_buffers", "program", ""],
    "kernels": ["_checks", "masked_attention", ""],
    "passes": ["rules", "base", "blocks", "param_views", "trace", "split_slots", "find_groups", "insert_masks",
               "sort_experts", "fuse_attention", "surgery", ""],
    "passes.rules": ["registry", "_util", "attention", "elementwise", "indexing", "shape", "linear", ""],
    "training": ["distributed", "checkpoint", "loop", "reconstruct", "layerwise", ""],
    "runtime": ["sessions", "timing", "decode", "export", "decoder_onnx", "runners", "latency_tables", "speed", ""],
    "search": ["ranking", "strategy", "magnitude", "activation", "upop", ""],
    "module": ["scale_fold", "rotary", "rebuild", "pretrained", "class_limits", ""],
}


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PACKAGE, *parts])] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, known: dict[str, Path]) -> list[str]:
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
        found.append(sub if sub in known else target)
    return found


def imports(root: Path) -> tuple[nx.DiGraph, list[str]]:
    known = modules(root)
    graph = nx.DiGraph()
    hidden = []
    for module, path in known.items():
        graph.add_node(module)
        tree = ast.parse(path.read_text(), str(path))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, path.name == "__init__.py", node, known)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(PACKAGE)]
            else:
                continue
            for t in targets:
                if t != module:
                    graph.add_edge(module, t, line=node.lineno)
                    if id(node) not in top:
                        hidden.append(f"{module} imports {t} inside a function or block (line {node.lineno})")
    return graph, hidden


def _parts(module: str) -> list[str]:
    return module.split(".")[1:] if module != PACKAGE else []


def unit_rank(module: str) -> int:
    parts = _parts(module)
    head = parts[0] if parts else ""
    if head not in RANK:
        raise LookupError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return RANK[head]


def _position(folder: str, name: str, module: str) -> int:
    if folder not in ORDER:
        raise LookupError(f"the folder {folder!r} has no file order: add it to ORDER in {Path(__file__).name}")
    if name not in ORDER[folder]:
        raise LookupError(f"{module} is not in ORDER[{folder!r}] in {Path(__file__).name}")
    return ORDER[folder].index(name)


def violation(a: str, b: str) -> str | None:
    """Why ``a`` may not import ``b`` (None: it may)."""
    pa, pb = _parts(a), _parts(b)
    if not pa or not pb or pa[0] != pb[0]:  # different units: strictly lower layers only
        ra, rb = unit_rank(a), unit_rank(b)
        if rb > ra:
            return f"{a} imports {b}, a higher layer"
        if rb == ra:
            return f"{a} imports {b}, another unit of its own layer"
        return None
    i = 0
    while i < min(len(pa), len(pb)) and pa[i] == pb[i]:
        i += 1
    folder = ".".join(pa[:i])
    na = pa[i] if i < len(pa) else ""
    nb = pb[i] if i < len(pb) else ""
    if len(pa) == 1 and len(pb) == 1:
        return None  # a top-level module and itself
    if _position(folder, nb, b) >= _position(folder, na, a):
        return f"{a} imports {b}, later in ORDER[{folder!r}]"
    return None


def check(root: Path) -> list[str]:
    """Every problem of the package under ``root``: modules in no layer, cycles, upward and hidden imports."""
    graph, hidden = imports(root)
    problems = list(hidden)
    for module in graph.nodes:
        try:
            unit_rank(module)
        except LookupError as exc:
            problems.append(str(exc))
    for a, b in graph.edges:
        try:
            why = violation(a, b)
        except LookupError as exc:
            why = str(exc)
        if why:
            problems.append(f"{why} (line {graph.edges[a, b]['line']})")
    problems += [" -> ".join(c + c[:1]) for c in list(nx.simple_cycles(graph))[:5]]
    return problems


def test_the_package_imports_only_downward():
    problems = check(ROOT)
    assert not problems, "\n".join(problems)


def test_the_walk_sees_the_imports():
    """The walk finds known edges, and the known orderings are what the layers say."""
    graph, _ = imports(ROOT)
    assert graph.has_edge("upop_fx.passes.surgery", "upop_fx.passes.split_slots")
    assert graph.has_edge("upop_fx.pipeline", "upop_fx.search.strategy")
    assert graph.has_edge("upop_fx.passes.rules.attention", "upop_fx.passes.rules.registry")
    assert unit_rank("upop_fx.search.upop") > unit_rank("upop_fx.passes.insert_masks")
    assert violation("upop_fx.passes.surgery", "upop_fx.passes.split_slots") is None


@pytest.mark.parametrize("file, planted, words", [
    ("ir/groups.py", "from ..pipeline import run", "a higher layer"),
    ("runtime/timing.py", "from ..search import ranking", "a higher layer"),
    ("report.py", "from .datasets import bbc_news", "another unit of its own layer"),
    ("passes/base.py", "from .surgery import Surgery", "later in ORDER['passes']"),
    ("passes/rules/registry.py", "from .linear import rule", "later in ORDER['passes.rules']"),
    ("training/distributed.py", "def f():\n    from ..errors import UPopError", "inside a function"),
    ("options.py", "from .options import check_int as _again", None),  # an import of itself is no violation
])  # fmt: skip
def test_a_planted_violation_is_caught(tmp_path, file, planted, words):
    copy = tmp_path / PACKAGE
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / file
    target.write_text(target.read_text() + "\n" + planted + "\n")
    problems = check(copy)
    if words is None:
        assert not problems, problems
    else:
        assert any(words in p for p in problems), problems


def test_a_new_folder_without_an_order_is_caught(tmp_path):
    copy = tmp_path / PACKAGE
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "ir" / "extra.py").write_text("from .groups import DimGroup\n")
    assert any("not in ORDER['ir']" in p for p in check(copy))
