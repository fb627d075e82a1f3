"""An attention scale the model's class computes from the head size, kept exact by folding it into q and k.

Many attention layers compute their softmax temperature from the head size at run time: SDPA's default scale
``1/sqrt(q.size(-1))``, ``scores / math.sqrt(self.attention_head_size)``. When the cut narrows the heads from
``d`` to ``d'`` dims, the graph keeps the original temperature (surgery pins it), but the model's class, with its
size attribute patched, would compute ``1/sqrt(d')``. :func:`fold_scales` makes both agree on the class's
formula: it multiplies the kept q and k rows of their projections (weights and biases) by ``(d'/d)^(1/4)`` each,
so ``q·kᵀ`` scales by ``sqrt(d'/d)``, and gives the graph the scale the class computes — the scores, and so
every output, are unchanged (checked on the example inputs; nothing is folded where the check fails). A scale the
class holds in an attribute (``self.scaling = head_dim ** -0.5`` set once) is left alone: the class does not
recompute it.

Example:
    >>> import torch, upop_fx
    >>> from transformers import BlipTextConfig
    >>> from transformers.models.blip.modeling_blip_text import BlipTextModel
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> text = BlipTextModel(BlipTextConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32), add_pooling_layer=False).eval()
    >>> ids = torch.randint(1, 100, (2, 8))
    >>> result = upop_fx.compress(text, {"input_ids": ids}, ratio=0.5, method="magnitude", retrain_steps=0)
    >>> result.module.encoder.layer[0].attention.self.attention_head_size < 16
    True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ..capture.program import get_capture, run_module
from ..compare import relative_error
from ..ir.groups import DimGroup, GroupAnalysis
from ..passes.base import get_tensor, set_tensor

__all__ = ["fold_scales", "node_owner", "held_floats", "near", "root_of"]

log = logging.getLogger(__name__)

#: the largest relative change of the graph's outputs that a fold may make (it is exact up to rounding)
FOLD_RTOL = 1e-5
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def node_owner(node: Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module whose forward made ``node``; ``("", "")`` for none."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in reversed(list(stack.values())):
        if isinstance(path, str) and not path.startswith("_"):
            return path, (cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))).rsplit(".", 1)[-1]
    return "", ""


def near(x: float, y: float) -> bool:
    """``x`` equals ``y`` up to a relative ``1e-6`` of ``y``: a float literal recorded from a computed value."""
    return abs(x - y) <= 1e-6 * abs(y)


def root_of(x: float, size: int) -> bool:
    """``x`` is ``sqrt(size)`` or ``1/sqrt(size)`` (an attention scale computed from a head size)."""
    return size > 0 and any(near(x, c) for c in (math.sqrt(size), 1 / math.sqrt(size)))


def held_floats(model: torch.nn.Module, path: str) -> set[float]:
    """The float attributes of the module at ``path`` and of every module above it."""
    parts = path.split(".") if path else []
    held: set[float] = set()
    for i in range(len(parts) + 1):
        m = model.get_submodule(".".join(parts[:i])) if i else model
        held |= {v for v in vars(m).values() if isinstance(v, float)}
    return held


def _head_dims(g: DimGroup, gone: dict[int, bool]) -> tuple[int, int] | None:
    """``(d, d')``: the head size of ``g`` before the cut and after, where every kept head keeps ``d'``; None
    where the kept heads differ in size or nothing is kept. ``gone``: class id -> removed."""
    kept = [c for c, cls in enumerate(g.classes.tolist()) if not gone[int(cls)]]
    if not kept or not g.head_dim:
        return None
    per_head: dict[int, list[int]] = {}
    for c in kept:
        per_head.setdefault(c // g.head_dim, []).append(c)
    sizes = {g.kept_positions(cs) for cs in per_head.values()}
    return (int(g.head_positions), sizes.pop()) if len(sizes) == 1 else None


def _literal_sites(small: torch.fx.GraphModule, dense_nodes: dict[str, Node], path: str, d: int, held: set[float]
                   ) -> list[tuple[Node, int | str, float]]:
    """The float arguments ``sqrt(d)`` or ``1/sqrt(d)`` of the nodes of the module at ``path`` that no attribute
    holds: ``(node, argument index or name, value)``."""
    out = []
    for n in small.graph.nodes:
        o = dense_nodes.get(n.name)
        if n.op != "call_function" or o is None or node_owner(o)[0] != path:
            continue
        for key, x in [*enumerate(n.args), *n.kwargs.items()]:
            if isinstance(x, float) and root_of(x, d) and not any(near(x, h) for h in held):
                out.append((n, key, x))
    return out


def _set_arg(n: Node, key: int | str, value: Any) -> None:
    if isinstance(key, int):
        n.args = (*n.args[:key], value, *n.args[key + 1:])
    else:
        n.kwargs = {**n.kwargs, key: value}


def _scale_rows(small: torch.fx.GraphModule, analysis: GroupAnalysis, g: DimGroup, removed: np.ndarray,
                factor: float) -> None:
    """Multiply the kept rows that produce ``g`` (weights and biases, in ``small``'s sliced tensors) by ``factor``
    (each row once, however many uses or tied names reach it)."""
    rows: dict[tuple[int, int], tuple[str, set[int]]] = {}
    for name, axis, chan in g.producers:
        t = get_tensor(small, name)
        if t.dim() <= axis:
            continue
        keep = np.ones(len(chan), dtype=bool)  # which dense entries along the axis the cut keeps
        for u in analysis.uses:
            if u.name == name and u.axis == axis:
                keep[u.where] &= ~removed[u.labels]
        if int(keep.sum()) != t.shape[axis]:
            raise ValueError(f"{name}: {int(keep.sum())} kept entries along axis {axis}, the tensor has {t.shape[axis]}")
        mine = rows.setdefault((id(t), axis), (name, set()))[1]
        mine.update((np.cumsum(keep) - 1)[(chan >= 0) & keep].tolist())
    for (_, axis), (name, where) in rows.items():
        t = get_tensor(small, name)
        scale = torch.ones(t.shape[axis], dtype=t.dtype, device=t.device)
        scale[torch.as_tensor(sorted(where), dtype=torch.long, device=t.device)] = factor
        shape = [1] * t.dim()
        shape[axis] = -1
        set_tensor(small, name, (t.detach() * scale.view(shape)).contiguous(), t)


def fold_scales(model: torch.nn.Module, dense: torch.fx.GraphModule, small: torch.fx.GraphModule,
                analysis: GroupAnalysis, removed: np.ndarray) -> Callable[[], None] | None:
    """Fold every attention scale of ``small`` (the cut of ``dense``) that ``model``'s class would recompute from
    the narrowed head size into the q/k rows, in place (see the module docstring). Returns what undoes the fold
    (a literal that only equals ``1/sqrt(d)``, written by hand in the class, is not recomputed: the rebuild then
    fails with the fold and is tried without it), or None where nothing was folded; on a check failure nothing is
    changed and the failure is logged."""
    dense_nodes = {n.name: n for n in dense.graph.nodes}
    small_nodes = {n.name: n for n in small.graph.nodes}
    plans: list[tuple[DimGroup, float, list[tuple[Node, int | str, Any]]]] = []
    classes, first = np.unique(analysis.label_class, return_index=True)
    gone = dict(zip(classes.tolist(), removed[first].tolist()))  # a class is removed with any of its labels
    for g in analysis.prunable:
        if g.kind != "qk" or g.site is None or g.site >= len(analysis.sites):
            continue
        sizes = _head_dims(g, gone)
        site = analysis.sites[g.site]
        o, n = dense_nodes.get(site.node), small_nodes.get(site.node)
        if sizes is None or sizes[0] == sizes[1] or o is None or n is None:
            continue
        d, d_new = sizes
        path = node_owner(o)[0]
        edits: list[tuple[Node, int | str, Any]] = []
        if o.target == _SDPA and (o.args[6] if len(o.args) > 6 else o.kwargs.get("scale")) is None:
            edits.append((n, 6 if len(n.args) > 6 else "scale", None))  # the default again: 1/sqrt(d')
        else:
            for node, key, x in _literal_sites(small, dense_nodes, path, d, held_floats(model, path)):
                edits.append((node, key, math.sqrt(d_new) if near(x, math.sqrt(d)) else 1 / math.sqrt(d_new)))
        if edits:
            plans.append((g, (d_new / d) ** 0.25, edits))
    if not plans:
        return None
    info = get_capture(small)
    with torch.no_grad():
        before = run_module(small, info.args, info.kwargs)
    saved = {name: get_tensor(small, name) for g, _, _ in plans for name, _, _ in g.producers}
    old_args = {e[0].name: (e[0].args, e[0].kwargs) for _, _, edits in plans for e in edits}
    for g, factor, edits in plans:
        _scale_rows(small, analysis, g, removed, factor)
        for node, key, value in edits:
            _set_arg(node, key, value)
    small.recompile()
    with torch.no_grad():
        err = relative_error(run_module(small, info.args, info.kwargs), before)
    def undo() -> None:
        for name, t in saved.items():
            set_tensor(small, name, t, get_tensor(small, name))
        for node in small.graph.nodes:
            if node.name in old_args:
                node.args, node.kwargs = old_args[node.name]
        small.recompile()

    if not err <= FOLD_RTOL:
        undo()
        log.info("attention scales not folded: the graph would change by %.3g", err)
        return None
    paths = sorted({node_owner(dense_nodes[analysis.sites[g.site].node])[0] for g, _, _ in plans})
    log.info("attention scales folded into q/k at %d sites (the class computes them from the narrowed head size)",
             len(paths))
    return undo
