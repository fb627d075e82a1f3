"""Small helpers shared by the rule modules."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ...ir.groups import Block

__all__ = ["arg", "val", "rank", "numel", "contract", "with_axes", "dim_expr", "shape_exprs", "concrete"]


def arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument ``i``/``name`` of a node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, Node) else None


def rank(n: Any) -> int:
    v = val(n)
    return v.dim() if isinstance(v, torch.Tensor) else 0


def numel(n: Node) -> int:
    out = 1
    for d in val(n).shape:
        out *= concrete(d)
    return out


def dim_expr(d: Any) -> Any:
    """A tensor size as a sympy expression (ints stay ints)."""
    if isinstance(d, torch.SymInt):
        return d.node.expr
    return int(d)


def shape_exprs(node: Any) -> tuple[Any, ...]:
    """The sizes of a node's recorded value (``meta["val"]``) as sympy expressions."""
    return tuple(dim_expr(d) for d in node.meta["val"].shape)


def concrete(d: Any) -> int:
    """The example value of a size (a SymInt's hint)."""
    if isinstance(d, torch.SymInt):
        hint = d.node.hint
        if hint is None:
            hint = torch.fx.experimental.symbolic_shapes.optimization_hint(d)
        return int(hint)
    return int(d)


def with_axes(block: Block, axes: tuple[int, ...]) -> Block:
    return Block(axes, block.labels, block.outer, block.zero)


def contract(ctx: Any, block: Block | None, axis: int, param: Node, param_axis: int, flops: float) -> Block | None:
    """A matmul-like op contracts ``axis`` of its input against ``param_axis`` of a weight.

    The labels on ``axis`` become an ``"in"`` use of the weight (tied across the positions of any other
    labelled axis); channels on a non-contracted axis cannot be followed through the matmul and are refused.
    Returns None: the output's channels are the weight's (the caller seeds them).
    """
    if block is None:
        return None
    if axis not in block.axes:  # the channels sit on an axis the matmul keeps but the output does not label
        ctx.refuse_block(block, "channels on a non-contracted axis of a matmul")
        return None
    i = block.axes.index(axis)
    if block.outer[i] != 1:
        ctx.refuse_block(block, "a contracted axis mixes channels with other dims")
        return None
    if not block.zero:
        ctx.refuse_block(block, "a removed channel would not be exactly zero at this matmul input")
    lab = np.moveaxis(block.labels, i, -1).reshape(-1, block.labels.shape[i])
    if lab.shape[0] > 1:  # the same weight column serves every position of the other labelled axes
        ctx.union(lab, lab[0:1])
    ctx.use(param, param_axis, lab[0], "in", flops)
    if len(block.axes) > 1:
        ctx.refuse_block(block, "channels on a non-contracted axis of a matmul")
    return None
