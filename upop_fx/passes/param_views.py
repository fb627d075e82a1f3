"""Parameter views: tensors computed from one parameter by ops that only move its elements.

``nn.MultiheadAttention`` chunks its packed ``in_proj_weight``/``in_proj_bias`` into q, k and v slices before its
three ``linear`` calls; ``x @ W.T`` transposes a weight (``aten.numpy_T``/``t``) before ``matmul``; fused
projections slice one weight per role. To the label tracer such a weight is a *view*: each of its axes is one axis
of the parameter (``param_axis``) at known positions (``positions``), or an axis the parameter does not have.
A rule then records its use of the view as a use of the parameter itself, at those positions
(:class:`~upop_fx.ir.groups.ParamUse` ``positions``), and surgery — which slices the parameter — rewrites the literal
arguments of the view ops so that they select the kept part (a ``chunk`` becomes a ``split_with_sizes`` of the
kept sizes, a ``slice`` gets the kept start and end).

Followed: ``t``, ``numpy_T``, ``transpose``, ``swapaxes``, ``permute``, ``unsqueeze``, ``squeeze``, ``slice``,
``narrow``, ``select``, ``chunk``, ``split``, ``split_with_sizes`` (with ``getitem``), ``expand`` and the ops that
copy or cast (``contiguous``, ``clone``, ``alias``, ``detach``, ``to``, ``_to_copy``). Anything else (a reshape,
arithmetic) ends the view: the tensor is a computed weight, which rules refuse.

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.passes.param_views import resolve
    >>> mha = torch.nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True).eval()
    >>> class Cross(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mha = mha
    ...     def forward(self, x, m):
    ...         return self.mha(x, m, m, need_weights=False)[0]
    >>> cap = upop_fx.capture(Cross(), (torch.randn(2, 3, 16), torch.randn(2, 5, 8)))
    >>> bias_k = [n for n in cap.gm.graph.nodes if n.op == "call_function" and n.name == "getitem_1"][0]
    >>> view = resolve(bias_k, {})
    >>> view.param.target, view.axes[0].param_axis, view.axes[0].positions[[0, -1]].tolist()
    ('mha.in_proj_bias', 0, [16, 31])
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ..errors import SurgeryError

__all__ = ["ViewAxis", "ParamView", "resolve", "rewrite_views"]

aten = torch.ops.aten

_SAME = {
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default, aten.to.dtype,
    aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.lift_fresh_copy.default,
}  # fmt: skip
_SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}


@dataclass(frozen=True)
class ViewAxis:
    """One axis of a view: the parameter axis it runs along (None: an axis the parameter does not have, or a
    broadcast) and, per entry, its index along that parameter axis."""

    param_axis: int | None
    positions: np.ndarray | None


@dataclass(frozen=True)
class ParamView:
    param: Node  #: the ``get_attr`` node of the parameter
    axes: tuple[ViewAxis, ...]

    def locate(self, axis: int) -> tuple[int, np.ndarray] | None:
        """``(param_axis, positions)`` of the view's ``axis``; None when it is not one parameter axis."""
        a = self.axes[axis]
        if a.param_axis is None or a.positions is None:
            return None
        return a.param_axis, a.positions


def _shape(n: Node) -> tuple[int, ...]:
    return tuple(int(d) for d in n.meta["val"].shape)


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def resolve(node: Any, cache: dict[str, Any]) -> ParamView | list[ParamView] | None:
    """The view ``node`` is of one parameter, or None. ``cache`` (by node name) spares re-walking shared chains."""
    if not isinstance(node, Node):
        return None
    if node.name in cache:
        return cache[node.name]
    cache[node.name] = None  # guards against cycles; overwritten below
    out: Any = None
    if node.op == "get_attr":
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape):
            out = ParamView(node, tuple(ViewAxis(i, np.arange(int(s))) for i, s in enumerate(val.shape)))
    elif node.op == "call_function" and node.args:
        if node.target is operator.getitem:
            parts = resolve(node.args[0], cache)
            out = parts[node.args[1]] if isinstance(parts, list) else None
        else:
            parent = resolve(node.args[0], cache)
            if isinstance(parent, ParamView):
                try:
                    out = _follow(node, parent)
                except (TypeError, ValueError, IndexError, KeyError):
                    out = None
    cache[node.name] = out
    return out


def _follow(node: Node, p: ParamView) -> ParamView | list[ParamView] | None:
    t, axes, rank = node.target, list(p.axes), len(p.axes)
    args = list(node.args) + [None] * 6

    def view(new: Sequence[ViewAxis]) -> ParamView:
        return ParamView(p.param, tuple(new))

    if t in _SAME or (t == aten.dropout.default and args[2] is False):  # inference dropout is the identity
        return view(axes)
    if t in (aten.t.default, aten.numpy_T.default):
        return view(axes[::-1])
    if t in (aten.transpose.int, aten.swapaxes.default):
        i, j = _norm(args[1], rank), _norm(args[2], rank)
        axes[i], axes[j] = axes[j], axes[i]
        return view(axes)
    if t == aten.permute.default:
        return view([axes[_norm(d, rank)] for d in args[1]])
    if t == aten.unsqueeze.default:
        d = _norm(args[1], rank + 1)
        return view(axes[:d] + [ViewAxis(None, None)] + axes[d:])
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        shape = _shape(node.args[0])
        dims = [args[1]] if t == aten.squeeze.dim else (args[1] if t == aten.squeeze.dims else range(rank))
        drop = {_norm(d, rank) for d in dims if shape[_norm(d, rank)] == 1}
        return view([a for i, a in enumerate(axes) if i not in drop])
    if t in (aten.slice.Tensor, aten.narrow.default):
        d = _norm(args[1] if args[1] is not None else 0, rank)
        size = _shape(node.args[0])[d]
        if t == aten.narrow.default:
            start = _norm(args[2], size)
            sl = slice(start, start + args[3])
        else:
            sl = slice(args[2], args[3], args[4] if args[4] is not None else 1)
        idx = np.arange(size)[sl]
        a = axes[d]
        axes[d] = ViewAxis(a.param_axis, a.positions[idx] if a.positions is not None else None)
        return view(axes)
    if t == aten.select.int:
        d = _norm(args[1], rank)
        return view(axes[:d] + axes[d + 1:])
    if t in _SPLITS:
        d = _norm(args[2] if args[2] is not None else 0, rank)
        size = _shape(node.args[0])[d]
        bounds = _split_bounds(t, args[1], size)
        outs = []
        for a, b in bounds:
            part = list(axes)
            ax = axes[d]
            part[d] = ViewAxis(ax.param_axis, ax.positions[a:b] if ax.positions is not None else None)
            outs.append(view(part))
        return outs
    if t == aten.expand.default:
        sizes = list(args[1])
        lead = len(sizes) - rank
        shape = _shape(node.args[0])
        new = [ViewAxis(None, None)] * lead
        for i, a in enumerate(axes):
            s = sizes[lead + i]
            new.append(a if s in (-1, shape[i]) else ViewAxis(None, None))
        return view(new)
    return None


def _split_bounds(target: Any, how: Any, size: int) -> list[tuple[int, int]]:
    if target == aten.chunk.default:
        step = -(-size // int(how))
        cuts = list(range(0, size, step)) + [size]
    elif target == aten.split.Tensor:
        cuts = list(range(0, size, int(how))) + [size]
    else:
        cuts = [0, *np.cumsum([int(s) for s in how]).tolist()]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


# ----------------------------------------------------------------------------------------------- surgery
def rewrite_views(gm: torch.fx.GraphModule, kept: dict[tuple[str, int], np.ndarray]) -> list[str]:
    """After surgery sliced parameters (``kept[(name, axis)]``: which entries of the old axis stay), rewrite the
    literal arguments of every view op over a sliced parameter so that it selects the kept entries. Needs the
    captured ``meta["val"]`` on the nodes. Returns the rewritten nodes; raises
    :class:`~upop_fx.errors.SurgeryError` for a view that cannot follow the cut."""
    views: dict[str, Any] = {}
    for node in gm.graph.nodes:  # every view as captured, before any literal below changes
        resolve(node, views)
    rewritten = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LITERAL_OPS or not isinstance(node.args[0], Node):
            continue
        src = views.get(node.args[0].name)
        if not isinstance(src, ParamView):
            continue
        m = [_kept_along(src, i, kept) for i in range(len(src.axes))]
        if any(k is not None for k in m) and _rewrite(node, m):
            rewritten.append(node.name)
    return rewritten


#: view ops with literals that select entries (start/end, an index, split sizes, expanded sizes)
_LITERAL_OPS = {aten.slice.Tensor, aten.narrow.default, aten.select.int, aten.expand.default, *_SPLITS}


def _kept_along(view: ParamView, i: int, kept: dict[tuple[str, int], np.ndarray]) -> np.ndarray | None:
    """Which entries of the view's axis ``i`` stay (None: the axis is not a sliced parameter axis)."""
    a = view.axes[i]
    k = kept.get((str(view.param.target), a.param_axis)) if a.param_axis is not None else None
    return None if k is None or a.positions is None else k[a.positions]


def _rewrite(node: Node, m: list[np.ndarray | None]) -> bool:
    """Rewrite ``node``'s literals in place, given which entries of each of its input's axes stay (``m``);
    False when the axis it selects along is not sliced."""
    t, rank = node.target, len(m)
    args = list(node.args)

    def need(cond: bool, why: str) -> None:
        if not cond:
            raise SurgeryError(f"node {node.name} ({t}): {why}")

    if t in (aten.slice.Tensor, aten.narrow.default):
        d = _norm(args[1] if len(args) > 1 and args[1] is not None else 0, rank)
        k = m[d]
        if k is None:
            return False
        if t == aten.narrow.default:
            start = _norm(args[2], len(k))
            stop, step = start + args[3], 1
        else:
            start, stop, step = slice(args[2] if len(args) > 2 else None, args[3] if len(args) > 3 else None,
                                      args[4] if len(args) > 4 else 1).indices(len(k))
        need(step == 1, "a strided slice of a pruned parameter axis")
        new_start, new_len = int(k[:start].sum()), int(k[start:stop].sum())
        if t == aten.narrow.default:
            args[2], args[3] = new_start, new_len
        else:
            args[2:4] = [new_start, new_start + new_len]
    elif t == aten.select.int:
        d = _norm(args[1], rank)
        if m[d] is None:
            return False
        idx = _norm(args[2], len(m[d]))
        need(bool(m[d][idx]), "selects an entry of a parameter that the cut removes")
        args[2] = int(m[d][:idx].sum())
    elif t in _SPLITS:
        d = _norm(args[2] if len(args) > 2 and args[2] is not None else 0, rank)
        k = m[d]
        if k is None:
            return False
        sizes = [int(k[a:b].sum()) for a, b in _split_bounds(t, args[1], len(k))]
        need(all(s > 0 for s in sizes), "a split part of a parameter loses every entry")
        node.target, node.kwargs = aten.split_with_sizes.default, {}
        args = [args[0], sizes, d]
    else:  # expand: the sizes of the sliced axes
        sizes = list(args[1])
        lead = len(sizes) - rank
        for i, k in enumerate(m):
            if k is not None and sizes[lead + i] != -1:
                sizes[lead + i] = int(k.sum())
        args[1] = sizes
    node.args = tuple(args)
    return True
