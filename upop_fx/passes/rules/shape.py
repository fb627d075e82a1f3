"""Shape ops: reshape-like views, permutations and expands.

A reshape is analysed on sizes alone (``node.meta["val"]``): the input axes are written as a row of factors —
unlabelled (batch, tokens, an outer dim) or labelled (channel dims, in the order of the labels array) — and the
output axes consume that row left to right, splitting a factor where an output axis needs part of it. An output
axis may hold unlabelled factors outside labelled ones (``(B, H·d) → (B·H, d)`` keeps ``B`` as an *outer*
factor) but not inside them. This covers ``view(x, [B, T, -1, 64])``, packed QKV ``(B, T, 3, H, d)``,
``unflatten``/``flatten``, ``nn.MultiheadAttention``'s ``(T, B·H, d)`` and head merges. Surgery then rewrites
the literal sizes of every labelled axis explicitly, so no ``-1`` can silently absorb a pruned dim.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import sympy
import torch
from torch.fx import Node

from ...ir.groups import Block
from ._util import rank, shape_exprs, val
from .registry import rewrite, rule

aten = torch.ops.aten

RESHAPES = [
    aten.view, aten.reshape, aten._unsafe_view, aten.unflatten, aten.flatten, aten.squeeze, aten.unsqueeze,
    aten.view_as, aten.reshape_as,
]  # fmt: skip


def _is_int(e: Any) -> bool:
    e = sympy.sympify(e)
    return bool(e.is_integer) or (e.is_Number and e == int(e))


class _NoMatch(Exception):
    pass


def _split_factors(block: Block, in_shape: tuple[Any, ...], out_shape: tuple[Any, ...]) -> list[list[tuple[str, Any]]]:
    """Assign input factors to output axes; returns, per output axis, its factors ``("free"|"lab", size)``."""
    factors: list[list[Any]] = []
    for ax, size in enumerate(in_shape):
        if ax in block.axes:
            i = block.axes.index(ax)
            if block.outer[i] != 1:
                factors.append(["free", sympy.sympify(block.outer[i])])
            if block.labels.shape[i] != 1:
                factors.append(["lab", sympy.Integer(block.labels.shape[i])])
        elif size != 1:
            factors.append(["free", sympy.sympify(size)])
    out: list[list[tuple[str, Any]]] = []
    fi = 0
    for size in out_shape:
        need = sympy.sympify(size)
        parts: list[tuple[str, Any]] = []
        while sympy.simplify(need - 1) != 0:
            if fi >= len(factors):
                raise _NoMatch
            kind, f = factors[fi]
            ratio = sympy.cancel(f / need)
            if sympy.simplify(ratio - 1) == 0:
                parts.append((kind, f))
                fi += 1
                need = sympy.Integer(1)
            elif _is_int(ratio):  # the factor is larger: take `need` of it, keep the rest
                parts.append((kind, need))
                factors[fi][1] = ratio
                need = sympy.Integer(1)
            elif _is_int(sympy.cancel(need / f)):  # the factor is smaller: take all of it
                parts.append((kind, f))
                fi += 1
                need = sympy.cancel(need / f)
            else:
                raise _NoMatch
        out.append(parts)
    if fi != len(factors):
        raise _NoMatch
    return out


def reshape_block(block: Block, in_shape: tuple[Any, ...], out_shape: tuple[Any, ...]) -> Block | None:
    """The block after a reshape, or None when the channels cannot be followed through it."""
    try:
        per_axis = _split_factors(block, in_shape, out_shape)
    except _NoMatch:
        return None
    axes, sizes, outer = [], [], []
    seq: list[tuple[str, int]] = []  # the labelled parts of the output axes, in order: channel dims and repeats
    for ax, parts in enumerate(per_axis):
        kinds = [k for k, _ in parts]
        if "lab" not in kinds:
            continue
        first_lab = kinds.index("lab")
        inner = parts[first_lab:]
        if any(k == "free" and not f.is_Integer for k, f in inner):
            return None  # a symbolic dim (batch, tokens) inside a labelled one: not a channel layout
        o = sympy.Integer(1)
        for _, f in parts[:first_lab]:
            o = o * f
        seq += [(k, int(f)) for k, f in inner]
        axes.append(ax)
        sizes.append(int(np.prod([int(f) for _, f in inner])))
        outer.append(int(o) if o.is_Number else o)
    lab_sizes = [n for k, n in seq if k == "lab"]
    if int(np.prod(lab_sizes)) != block.labels.size:
        return None
    # a constant dim inside a labelled one (repeat_kv's (kv_heads, n_rep) -> heads) repeats each channel
    labels = block.labels.reshape(lab_sizes)
    for i, (k, n) in enumerate(seq):
        if k == "free":
            labels = np.repeat(np.expand_dims(labels, i), n, axis=i)
    return Block(tuple(axes), np.ascontiguousarray(labels).reshape(sizes), tuple(outer), block.zero)


@rule(*RESHAPES)
def reshape(ctx: Any, node: Node) -> Block | None:

    b = ctx.block(node.args[0])
    out = reshape_block(b, shape_exprs(node.args[0]), shape_exprs(node))
    if out is None:
        ctx.refuse_block(b, "a reshape mixes channels with other dims")
    return out


@rule(aten.permute, aten.transpose, aten.t, aten.swapaxes)
def permute(ctx: Any, node: Node) -> Block | None:
    b = ctx.block(node.args[0])
    r = rank(node.args[0])
    perm = _permutation(node, r)
    if perm is None:
        ctx.refuse_block(b, "unrecognised permutation")
        return None
    out_axes = [o for o in range(r) if perm[o] in b.axes]
    order = [b.axes.index(perm[o]) for o in out_axes]
    return Block(tuple(out_axes), b.labels.transpose(order), tuple(b.outer[i] for i in order), b.zero)


def _permutation(node: Node, r: int) -> list[int] | None:
    p = node.target.overloadpacket
    if p is aten.permute:
        return [d % r for d in node.args[1]]
    if p is aten.t:
        return [1, 0] if r == 2 else list(range(r))
    if p in (aten.transpose, aten.swapaxes):
        a, c = node.args[1] % r, node.args[2] % r
        perm = list(range(r))
        perm[a], perm[c] = perm[c], perm[a]
        return perm
    return None


@rule(aten.expand, aten.expand_as)
def expand(ctx: Any, node: Node) -> Block | None:
    """The values come from ``args[0]``; ``expand_as``'s other tensor only lends its shape (a learned token
    broadcast to the batch of a labelled activation carries no channel of it)."""
    b = ctx.block(node.args[0])
    if b is None:
        return None
    off = rank(node) - rank(node.args[0])
    src, out = val(node.args[0]).shape, val(node).shape
    if any(src[a] != out[a + off] for a in b.axes):  # broadcasting a labelled axis of size 1
        ctx.refuse_block(b, "expand of a channel axis")
        return None
    return Block(tuple(a + off for a in b.axes), b.labels, b.outer, b.zero)


@rule(aten.repeat)
def repeat(ctx: Any, node: Node) -> Block | None:
    """``x.repeat(r0, r1, ...)`` tiles: along a labelled axis the copies sit outside the channels (an outer
    factor, DeBERTa's relative keys repeated per batch into ``(B·H, 2k, d)``); new leading axes carry none."""
    b = ctx.block(node.args[0])
    reps = list(node.args[1])
    off = len(reps) - rank(node.args[0])
    outer = list(b.outer)
    for i, a in enumerate(b.axes):
        r = reps[a + off]
        if isinstance(r, Node):  # a size computed in the graph: its recorded (symbolic) value
            r = r.meta.get("val")
        if not isinstance(r, int) and not isinstance(r, torch.SymInt):
            ctx.refuse_block(b, "repeat of a channel axis by an unknown count")
            return None
        if isinstance(r, int) and r == 1:
            continue
        rr = r.node.expr if isinstance(r, torch.SymInt) else r
        outer[i] = rr * outer[i] if outer[i] != 1 else rr
    return Block(tuple(a + off for a in b.axes), b.labels, tuple(outer), b.zero)


# ------------------------------------------------------------------ rewrites
def _new_size(old: Any, old_block: Block, new_block: Block, axis: int, graph_node: Node) -> Any:
    """The literal for ``axis`` after surgery: an int, or an fx node computing ``old // n_old * n_new``."""
    i = old_block.axes.index(axis)
    n_old, n_new = int(old_block.labels.shape[i]), int(new_block.labels.shape[i])
    if n_old == n_new and old != -1:
        return old
    if isinstance(old, Node):  # a symbolic size (an outer batch factor times the channel count)
        g = graph_node.graph
        with g.inserting_before(graph_node):
            q = g.call_function(operator.floordiv, (old, n_old))
            return g.call_function(operator.mul, (q, n_new))
    outer = old_block.outer[i]
    if not isinstance(outer, int):
        if old == -1:  # (B·H, T, d) with -1 for B·H: every other size is explicit, so -1 infers B·H'
            return -1
        raise ValueError(f"node {graph_node.name}: size {old} of a channel axis has a symbolic outer factor")
    return outer * n_new


def rewrite_sizes(ctx: Any, node: Node, sizes: list[Any], first_axis: int) -> list[Any]:
    old_b, new_b = ctx.old_block(node), ctx.new_block(node)
    out = list(sizes)
    for j, s in enumerate(sizes):
        ax = first_axis + j
        if old_b is not None and ax in old_b.axes:
            out[j] = _new_size(s, old_b, new_b, ax, node)
    return out


@rewrite(aten.view, aten.reshape, aten._unsafe_view, aten.expand)
def rewrite_shape_arg(ctx: Any, node: Node) -> None:
    node.args = (node.args[0], rewrite_sizes(ctx, node, list(node.args[1]), 0), *node.args[2:])


@rewrite(aten.unflatten)
def rewrite_unflatten(ctx: Any, node: Node) -> None:
    dim = node.args[1] % rank(node.args[0])
    node.args = (node.args[0], node.args[1], rewrite_sizes(ctx, node, list(node.args[2]), dim), *node.args[3:])


__all__ = ["reshape_block"]
