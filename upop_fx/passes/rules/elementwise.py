"""Elementwise ops, activations, normalisation, softmax and reductions.

Broadcasting ops couple the labels of their labelled operands (a residual add unions two streams); an unlabelled
*parameter* operand that spans a channel axis (a bias add, a LayerNorm weight, a layer scale) becomes an
``out`` use. ``Block.zero`` tracks whether a removed channel stays exactly zero (``gelu(0) = 0`` but
``sigmoid(0) = 0.5``; ``x·sigmoid(1.702x)`` is zero again), so that a group whose removal would not be exact
is refused at its consumer.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ...ir.groups import Block, TableUse
from ._util import arg, rank, val
from .registry import rule

aten = torch.ops.aten

#: f(0) == 0: a zero channel stays zero.
ZERO_PRESERVING = [
    aten.relu, aten.gelu, aten.silu, aten.tanh, aten.neg, aten.erf, aten.abs, aten.sin, aten.hardtanh,
    aten.leaky_relu, aten.elu, aten.mish, aten.dropout, aten.feature_dropout, aten.alpha_dropout,
    aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy, aten.type_as,
    aten.lift_fresh_copy, aten.sqrt, aten.relu6, aten.hardswish, aten.sign, aten.square,
]  # fmt: skip
#: f(0) != 0 in general.
NOT_ZERO_PRESERVING = [aten.sigmoid, aten.exp, aten.cos, aten.softplus, aten.log, aten.rsqrt, aten.reciprocal]


def _aligned(block: Block, offset: int) -> Block:
    return Block(tuple(a + offset for a in block.axes), block.labels, block.outer, block.zero)


@rule(*ZERO_PRESERVING, *NOT_ZERO_PRESERVING)
def unary(ctx: Any, node: Node) -> Block | None:
    b = ctx.block(node.args[0])
    if b is None:
        return None
    if isinstance(val(node), torch.Tensor) and tuple(val(node).shape) != tuple(val(node.args[0]).shape):
        ctx.refuse_block(b, "an elementwise op changed the shape")
        return None
    zero = b.zero and node.target.overloadpacket not in NOT_ZERO_PRESERVING
    return Block(b.axes, b.labels, b.outer, zero)


@rule(aten.clamp)
def clamp(ctx: Any, node: Node) -> Block | None:
    """``clamp(x, min, max)`` with scalar bounds acts per channel; a zero channel stays zero where the bounds
    admit 0 (GPT-OSS clamps its gate and up projections to ``±limit``)."""
    b = ctx.block(node.args[0])
    if b is None:
        return None
    lo, hi = arg(node, 1, "min", None), arg(node, 2, "max", None)
    if any(isinstance(x, Node) for x in (lo, hi)):
        ctx.refuse_block(b, "clamp with tensor bounds")
        return None
    zero = b.zero and (lo is None or lo <= 0) and (hi is None or hi >= 0)
    return Block(b.axes, b.labels, b.outer, zero)


_BINARY = [
    aten.add, aten.sub, aten.mul, aten.div, aten.where, aten.masked_fill, aten.maximum, aten.minimum,
    aten.pow, aten.rsub, aten.add_, aten.sub_, aten.mul_, aten.div_, aten.masked_fill_,
    operator.add, operator.mul, operator.sub, operator.truediv,
]  # fmt: skip


@rule(*_BINARY)
def broadcast(ctx: Any, node: Node) -> Block | None:
    out = val(node)
    if not isinstance(out, torch.Tensor):
        return None
    R = out.dim()
    operands = [a for a in node.args if isinstance(a, Node) and isinstance(val(a), torch.Tensor)]
    labelled = [(a, _aligned(ctx.block(a), R - rank(a))) for a in operands if ctx.block(a) is not None]
    if not labelled:
        return None
    ref = max((b for _, b in labelled), key=lambda b: len(b.axes))
    for a, b in labelled:
        spread = _spread(a, b, ref, R)
        if spread is None:
            for _, bb in labelled:
                ctx.refuse_block(bb, "operands carry channels on different axes")
            return None
        ctx.union(ref.labels, spread)
    broadcast_other = mixed = False
    for a in operands:
        if ctx.block(a) is not None:
            continue
        off = R - rank(a)
        sizes = [int(val(a).shape[ax - off]) if ax - off >= 0 else 1 for ax in ref.axes]
        full = [i for i, s in enumerate(sizes) if s != 1]
        if not full:
            broadcast_other = True
            continue
        if not ctx.is_param(a) and _is_mul(node) and len(full) == 1 and ref.outer[full[0]] == 1:
            # a computed table times channels (RoPE's cos/sin): exact when sliced to the kept entries
            i = full[0]
            rows = np.moveaxis(ref.labels, i, -1).reshape(-1, ref.labels.shape[i])
            ctx.tables.append(TableUse(node.name, node.args.index(a), ref.axes[i] - off, rows.copy()))
            continue
        if ctx.is_param(a) and _per_head_weight(ctx, a, ref, full, off):
            continue
        if not ctx.is_param(a) or len(full) != 1 or ref.outer[full[0]] != 1:
            ctx.refuse_block(ref, f"operand {a.name} of unknown channels spans a channel axis")
            mixed = True
            continue
        i = full[0]
        lab = np.moveaxis(ref.labels, i, -1).reshape(-1, ref.labels.shape[i])
        if ctx.whole_rows(lab):  # its entries run within whole heads (a per-head norm's weight): never cut
            continue
        if lab.shape[0] > 1:  # one parameter entry shared by every position of the other labelled axes
            ctx.union(lab, lab[0:1])
        ctx.use(a, ref.axes[i] - off, lab[0], "out")
    if mixed:  # the result mixes these channels with unknown ones: it carries no channel layout on
        return None  # (a relative-position bias added to the scores must not pass for channels further on)
    zero = _zero_after(node, [b for _, b in labelled], broadcast_other)
    return Block(ref.axes, ref.labels, ref.outer, zero)


def _per_head_weight(ctx: Any, param: Node, ref: Block, full: list[int], off: int) -> bool:
    """A parameter ``[heads, head_dim]`` over channels whose heads are whole classes (a per-head norm's own
    weights, Cohere's q/k LayerNorm): it is cut with its heads, a use of its head axis. False where it is not
    that."""
    if full != [0, 1] or len(ref.axes) != 2 or ref.outer != (1, 1) or not ctx.whole_rows(ref.labels):
        return False
    ctx.use(param, ref.axes[0] - off, ref.labels[:, 0], "out")
    return True


def _spread(operand: Node, b: Block, ref: Block, R: int) -> np.ndarray | None:
    """``b``'s labels spread over ``ref``'s labelled axes: the same where they share an axis, broadcast where
    ``operand`` has size 1 on one of ``ref``'s axes (a per-head statistic times its head's dims); None where
    they carry channels on different axes."""
    if not set(b.axes) <= set(ref.axes):
        return None
    off = R - rank(operand)
    shape = []
    for i, ax in enumerate(ref.axes):
        if ax in b.axes:
            j = b.axes.index(ax)
            if b.labels.shape[j] != ref.labels.shape[i] or b.outer[j] != ref.outer[i]:
                return None
            shape.append(ref.labels.shape[i])
        elif ax - off >= 0 and int(val(operand).shape[ax - off]) != 1:
            return None
        else:
            shape.append(1)
    return np.broadcast_to(b.labels.reshape(shape), ref.labels.shape)


def _is_mul(node: Node) -> bool:
    target = getattr(node.target, "overloadpacket", node.target)
    return target in (aten.mul, operator.mul)


def _zero_after(node: Node, labelled: list[Block], broadcast_other: bool) -> bool:
    """Is a removed channel still exactly zero after this op?"""
    target = getattr(node.target, "overloadpacket", node.target)
    target = _INPLACE.get(target, target)
    first = node.args[0]
    first_zero = isinstance(first, Node) and labelled and first.meta.get("upop_dims") is not None
    scalars = [a for a in node.args[1:] if isinstance(a, (int, float))]
    if target in (aten.mul, operator.mul):
        return any(b.zero for b in labelled)
    if target in (aten.div, operator.truediv):  # x / d keeps a zero channel zero unless d carries it (0/0)
        divisor = node.args[1] if len(node.args) > 1 else None
        divided_by_channels = isinstance(divisor, Node) and divisor.meta.get("upop_dims") is not None
        return bool(first_zero) and labelled[0].zero and not divided_by_channels
    if target in (aten.add, aten.sub, operator.add, operator.sub):
        return all(b.zero for b in labelled) and not broadcast_other and all(s == 0 for s in scalars)
    if target is aten.masked_fill:
        return bool(first_zero) and labelled[0].zero and all(s == 0 for s in scalars)
    if target is aten.pow:  # x ** p with p > 0 keeps zeros; c ** x does not (c ** 0 = 1)
        return bool(first_zero) and all(b.zero for b in labelled) and all(s > 0 for s in scalars) and len(labelled) == 1
    return False


_INPLACE = {aten.add_: aten.add, aten.sub_: aten.sub, aten.mul_: aten.mul, aten.div_: aten.div, aten.masked_fill_: aten.masked_fill}


@rule(aten.layer_norm, aten.native_layer_norm, aten.rms_norm, aten.group_norm, aten.batch_norm)
def norm(ctx: Any, node: Node) -> Block | None:
    b = ctx.block(node.args[0])
    if b is None:
        return None
    last = rank(node.args[0]) - 1
    if node.target.overloadpacket in (aten.layer_norm, aten.native_layer_norm, aten.rms_norm):
        normed = tuple(range(last + 1 - len(node.args[1]), last + 1))
        reduced = tuple(a for a in b.axes if a in normed)
        one_head = _single_head(node.args[0], b, reduced)
        if reduced and (len(reduced) < len(b.axes) or one_head):  # a norm per head: whole heads can go
            why = "normalises a head's dims together (a per-head norm)"
            if one_head:
                ctx.couple_slices(b, reduced, why)
            elif _per_slice(ctx, b, reduced, list(normed), True, why) is None:
                return None
            bias = arg(node, 3, "bias") if node.target.overloadpacket != aten.rms_norm else None
            out = Block(b.axes, b.labels, b.outer, b.zero and bias is None)  # its weight spans whole heads: not cut
            return [out, None, None] if isinstance(val(node), (tuple, list)) else out
    ctx.refuse_block(b, "normalisation statistics change when channels are removed")
    weights = [a for a in node.args[1:] if ctx.is_param(a) and rank(a) == 1]
    if last in b.axes and b.labels.ndim == 1:
        for w in weights:
            if int(val(w).shape[0]) == b.labels.shape[0]:
                ctx.use(w, 0, b.labels, "out")
    out = Block(b.axes, b.labels, b.outer, False)
    return [out, None, None] if isinstance(val(node), (tuple, list)) else out


@rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def softmax(ctx: Any, node: Node) -> Block | None:
    b = ctx.block(node.args[0])
    dim = node.args[1] % rank(node.args[0])
    if dim in b.axes:
        ctx.refuse_block(b, "softmax over channels")
        return None
    return Block(b.axes, b.labels, b.outer, False)


@rule(aten.mean, aten.sum, aten.amax, aten.amin)
def reduction(ctx: Any, node: Node) -> Block | None:
    b = ctx.block(node.args[0])
    r = rank(node.args[0])
    dims = arg(node, 1, "dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(r))
    dims = [d % r for d in ([dims] if isinstance(dims, int) else dims)]
    keep = bool(arg(node, 2, "keepdim", False))
    reduced = tuple(a for a in b.axes if a in dims)
    if reduced and not isinstance(val(node), (tuple, list)):
        return _per_slice(ctx, b, reduced, dims, keep, "reduces a head's dims together (a per-head norm)")
    if reduced or isinstance(val(node), (tuple, list)):
        ctx.refuse_block(b, "reduction over channels")
        return None
    axes = b.axes if keep else tuple(a - sum(d < a for d in dims) for a in b.axes)
    return Block(axes, b.labels, b.outer, b.zero)


@rule(aten.max, aten.min)
def max_min(ctx: Any, node: Node) -> Block | list[Block | None] | None:
    """``max``/``min``: of two tensors, elementwise (as ``maximum``); along a dim, ``(values, indices)`` — over
    tokens or a pooling window (Hiera's pooled queries: ``view(..., stride, T/stride, d).max(dim=3)``) both keep
    the channels (a zero channel's maximum is zero; its indices are no channel values); over channels, refused."""
    if len(node.args) > 1 and isinstance(node.args[1], Node):
        return broadcast(ctx, node)
    b = ctx.block(node.args[0])
    r = rank(node.args[0])
    if len(node.args) < 2 or not isinstance(val(node), (tuple, list)) or node.args[1] % r in b.axes:
        ctx.refuse_block(b, "reduction over channels")
        return None
    dim = node.args[1] % r
    axes = b.axes if arg(node, 2, "keepdim", False) else tuple(a - (dim < a) for a in b.axes)
    return [Block(axes, b.labels, b.outer, b.zero), Block(axes, b.labels, b.outer, False)]


def _per_slice(ctx: Any, b: Block, reduced: tuple[int, ...], dims: list[int], keepdim: bool,
               reason: str) -> Block | None:
    """A reduction (or a norm's statistics) over the channels of ``reduced`` axes while other labelled axes stay
    (a mean over each head's dims): a slice goes whole or not at all — a whole zero slice reduces to zero and
    leaves the other slices' statistics as they were — so each slice becomes one class. Without another labelled
    axis (a norm over the hidden width) the channels are refused, unless the tensor is one attention head
    (:func:`_single_head`: its dims become one class). Returns the per-slice block (the reduced axes dropped from
    the labels; ``dims``: every axis reduced, labelled or not), or None where refused or where it is one head (its
    statistic is then one value per token, carrying no channel)."""
    rest = [i for i, a in enumerate(b.axes) if a not in reduced]
    if not rest and _single_head(ctx.node.args[0], b, reduced):  # one head's dims: one slice, one class
        ctx.couple_slices(b, reduced, reason)
        return None
    if not rest or any(b.outer[b.axes.index(a)] != 1 for a in reduced):
        ctx.refuse_block(b, "reduction over channels")
        return None
    heads = ctx.couple_slices(b, reduced, reason)
    kept = [b.axes[i] for i in rest]
    axes = tuple(kept) if keepdim else tuple(a - sum(d < a for d in dims) for a in kept)
    return Block(axes, heads, tuple(b.outer[i] for i in rest), b.zero)


def _single_head(x: Any, b: Block, reduced: tuple[int, ...]) -> bool:
    """``x`` is one attention head (``(..., 1, d)`` or ``(..., 1, T, d)``: a literal size-1 axis before the tokens or
    the dims, as one key/value head is before it is broadcast over the query heads) whose dims are all reduced."""
    v = val(x)
    if len(reduced) != 1 or b.axes != reduced or reduced[0] != v.dim() - 1 or v.dim() < 3 or b.outer != (1,):
        return False
    return any(isinstance(v.shape[a], int) and v.shape[a] == 1 for a in (v.dim() - 2, v.dim() - 3))


__all__: list[str] = []


#: per-channel spatial resampling (channels on axis 1): each output channel is computed from its own input
#: channel only, and a zero channel stays zero (an average, an interpolation or a maximum of zeros).
SPATIAL = [
    aten.upsample_bilinear2d, aten.upsample_nearest2d, aten.upsample_bicubic2d, aten.upsample_nearest1d,
    aten.upsample_linear1d, aten.avg_pool1d, aten.avg_pool2d, aten.max_pool1d, aten.max_pool2d,
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.pixel_shuffle,
]  # fmt: skip


@rule(*SPATIAL)
def spatial(ctx: Any, node: Node) -> Block | None:
    b = ctx.block(node.args[0])
    if b is None:
        return None
    if node.target.overloadpacket == aten.pixel_shuffle or b.axes != (1,) or b.outer != (1,):
        ctx.refuse_block(b, "spatial resampling over channels mixed with other dims")
        return None
    return Block(b.axes, b.labels, b.outer, b.zero)
