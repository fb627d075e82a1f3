"""Splitting, selecting, slicing and concatenating: how packed QKV is taken apart.

Along an unlabelled axis these ops pass the labels through; along a labelled axis they cut the labels array the
same way they cut the tensor (``split(3·C)`` of GPT-2's ``c_attn``, ``unbind(0)`` of timm's ``(3, B, H, T, d)``,
``select`` of ``nn.MultiheadAttention``'s unflattened ``in_proj``). Surgery recomputes split sizes, indices
and slice bounds from the labels that survive.

A constant pad along a labelled axis (a head dim padded to a kernel's size before attention) adds positions that
are no channel: they get fresh labels that follow their row (:meth:`~upop_fx.passes.trace.LabelTracer.pad_labels`:
a removed head takes its padding along), so the pad widths never change.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ...ir.groups import Block
from ._util import arg, rank, val
from .registry import rewrite, rule

aten = torch.ops.aten


def _cut(b: Block, axis: int, sizes: list[int]) -> list[Block]:
    i = b.axes.index(axis)
    if b.outer[i] != 1:
        raise ValueError
    bounds = np.cumsum([0, *sizes])
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        lab = np.take(b.labels, np.arange(lo, hi), axis=i)
        out.append(Block(b.axes, lab, b.outer, b.zero))
    return out


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split)
def split(ctx: Any, node: Node) -> list[Block | None] | None:
    b = ctx.block(node.args[0])
    r = rank(node.args[0])
    outs = val(node)
    unbind = node.target.overloadpacket is aten.unbind
    dim = arg(node, 1, "dim", 0) if unbind else arg(node, 2, "dim", 0)
    dim %= r
    if dim not in b.axes:
        if unbind:
            return [Block(tuple(a - (a > dim) for a in b.axes), b.labels, b.outer, b.zero) for _ in outs]
        return [b for _ in outs]
    sizes = [1 if unbind else int(o.shape[dim]) for o in outs]
    try:
        parts = _cut(b, dim, sizes)
    except ValueError:
        ctx.refuse_block(b, "split of an axis that mixes channels with other dims")
        return None
    if not unbind:
        return parts
    i = b.axes.index(dim)
    axes = tuple(a - (a > dim) for a in b.axes if a != dim)
    if not axes:  # one tensor per channel: removing one would change how many unbind returns
        ctx.refuse_block(b, "unbind of the channel axis (one tensor per single channel)")
        return None
    outer = tuple(o for j, o in enumerate(b.outer) if j != i)
    return [Block(axes, np.take(p.labels, 0, axis=i), outer, b.zero) for p in parts]


@rule(aten.select)
def select(ctx: Any, node: Node) -> Block | None:
    b = ctx.block(node.args[0])
    r = rank(node.args[0])
    dim, index = node.args[1] % r, node.args[2]
    if dim not in b.axes:
        return Block(tuple(a - (a > dim) for a in b.axes), b.labels, b.outer, b.zero)
    i = b.axes.index(dim)
    if b.outer[i] != 1 or not isinstance(index, int):
        ctx.refuse_block(b, "select on an axis that mixes channels with other dims")
        return None
    axes = tuple(a - (a > dim) for a in b.axes if a != dim)
    if not axes:
        ctx.refuse_block(b, "select of a single channel")
        return None
    outer = tuple(o for j, o in enumerate(b.outer) if j != i)
    return Block(axes, np.take(b.labels, index % b.labels.shape[i], axis=i), outer, b.zero)


@rule(aten.slice)
def slice_(ctx: Any, node: Node) -> Block | None:
    b = ctx.block(node.args[0])
    r = rank(node.args[0])
    dim = arg(node, 1, "dim", 0) % r
    if dim not in b.axes:
        return b
    i = b.axes.index(dim)
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    if b.outer[i] != 1 or not all(isinstance(x, (int, type(None))) for x in (start, end, step)):
        ctx.refuse_block(b, "slice of an axis that mixes channels with other dims")
        return None
    idx = np.arange(b.labels.shape[i])[slice(start, end, step)]
    return Block(b.axes, np.take(b.labels, idx, axis=i), b.outer, b.zero)


@rule(aten.pad, aten.constant_pad_nd)
def pad(ctx: Any, node: Node) -> Block | None:
    """``F.pad``: along an unlabelled axis (tokens) the labels pass through; a constant pad of a labelled axis adds
    padded positions (:meth:`~upop_fx.passes.trace.LabelTracer.pad_labels`; of any value: they go only with their
    whole row, and whatever meets them with it). Where tokens are padded, a removed channel stays zero if the value
    is 0 or the mode copies values (reflect, replicate, circular). Refused on a channel axis: another
    mode (it copies channels into the padding), a negative width (a crop), a width computed in the graph."""
    b = ctx.block(node.args[0])
    r = rank(node.args[0])
    widths = list(node.args[1])
    constant_nd = node.target.overloadpacket is aten.constant_pad_nd
    mode = "constant" if constant_nd else arg(node, 2, "mode", "constant")
    value = arg(node, 2, "value", 0) if constant_nd else arg(node, 3, "value", None)
    out = b
    for k in range(len(widths) // 2):
        axis, before, after = r - 1 - k, widths[2 * k], widths[2 * k + 1]
        if before == 0 and after == 0:
            continue
        if axis not in b.axes:  # tokens padded with a non-zero value: a removed channel is that value there
            out = Block(out.axes, out.labels, out.outer, out.zero and (mode != "constant" or not value))
            continue
        if not (isinstance(before, int) and isinstance(after, int)) or before < 0 or after < 0:
            why = "a pad of a channel axis by a computed or negative width"
        elif mode != "constant":
            why = f"a {mode} pad of a channel axis (it copies channels into the padding)"
        elif b.outer[b.axes.index(axis)] != 1:
            why = "a pad of an axis that mixes channels with other dims"
        else:
            out = ctx.pad_labels(out, axis, before, after)
            continue
        ctx.refuse_block(b, why)
        return None
    return out


@rule(aten.index, seeding=True)
def index(ctx: Any, node: Node) -> Block | None:
    """``x[idx]`` with index tensors only on axes before the channels (rows gathered by token or by expert):
    the channel axes move by the change of rank. A labelled tensor used as an index, or an index on a channel
    axis, is refused. A parameter gathered on its leading axes only (an expert's bias, ``bias[expert_ids]``)
    labels its last axis as a table lookup does: the gathered rows' entries are channels of the parameter."""
    b = ctx.block(node.args[0])
    indices = list(node.args[1])
    for t in indices:
        if ctx.block(t) is not None:
            ctx.refuse_block(ctx.block(t), "channels used as indices")
    used = [i for i, t in enumerate(indices) if t is not None]
    if b is None:
        src = node.args[0]
        if not ctx.is_param(src) or not used or used != list(range(len(used))) or len(used) >= rank(src):
            return None
        size = int(val(src).shape[-1])
        labels = ctx.new_labels((size,))
        ctx.use(src, rank(src) - 1, labels, "out")
        return Block((rank(node) - 1,), labels)
    contiguous = used == list(range(used[0], used[-1] + 1)) if used else False
    if not used or not contiguous or max(used) >= min(b.axes):
        ctx.refuse_block(b, "an index on a channel axis, or on axes apart")
        return None
    shift = rank(node) - rank(node.args[0])
    return Block(tuple(a + shift for a in b.axes), b.labels, b.outer, b.zero)


@rule(aten.stack)
def stack(ctx: Any, node: Node) -> Block | None:
    """Stacking blocks with the same channel layout labels the new axis too: position ``k`` of it carries
    operand ``k``'s channels (GPT-J's ``stack((-x[..., 1::2], x[..., ::2]), -1)`` before a flatten)."""
    tensors = node.args[0]
    r = rank(node)
    dim = arg(node, 1, "dim", 0) % r
    blocks = [ctx.block(t) for t in tensors]
    labelled = [b for b in blocks if b is not None]
    ref = labelled[0]
    if len(labelled) != len(blocks) or any(
        b.axes != ref.axes or b.labels.shape != ref.labels.shape or b.outer != ref.outer for b in labelled
    ):
        for b in labelled:
            ctx.refuse_block(b, "stacked operands carry different channel layouts")
        return None
    axes = [a + (a >= dim) for a in ref.axes]
    i = sum(a < dim for a in axes)
    new_axes = tuple(axes[:i] + [dim] + axes[i:])
    outer = tuple(list(ref.outer[:i]) + [1] + list(ref.outer[i:]))
    return Block(new_axes, np.stack([b.labels for b in labelled], axis=i), outer, all(b.zero for b in labelled))


@rule(aten.cat, aten.concat, aten.concatenate)
def cat(ctx: Any, node: Node) -> Block | None:
    tensors = node.args[0]
    r = rank(node)
    dim = arg(node, 1, "dim", 0) % r
    blocks = [ctx.block(t) for t in tensors]
    labelled = [b for b in blocks if b is not None]
    if any(b.axes != labelled[0].axes for b in labelled):
        spread = _spread(blocks, tensors, dim)
        if spread is None:
            for b in labelled:
                ctx.refuse_block(b, "concatenated operands carry channels on different axes")
            return None
        blocks = spread
        labelled = [b for b in blocks if b is not None]
    ref = labelled[0]
    if any(b is None for b in blocks):
        ctx.refuse_block(ref, "concatenation with an operand of unknown channels")
        if dim in ref.axes:
            return None
        blocks = labelled
    if dim in ref.axes:
        i = ref.axes.index(dim)
        if any(o != 1 for b in labelled for o in b.outer):
            ctx.refuse_block(ref, "concatenation along a mixed axis")
            return None
        return Block(ref.axes, np.concatenate([b.labels for b in labelled], axis=i), ref.outer, all(b.zero for b in labelled))
    for b in labelled[1:]:
        if b.labels.shape != ref.labels.shape:
            ctx.refuse_block(b, "concatenated operands carry different channels")
            return None
        ctx.union(ref.labels, b.labels)
    return Block(ref.axes, ref.labels, ref.outer, all(b.zero for b in labelled))


def _spread(blocks: list[Block | None], tensors: list[Any], dim: int) -> list[Block | None] | None:
    """Operands labelled on different axes, all on the concatenated one: an operand whose channels do not depend
    on an axis another operand labels (DeepSeek's rotary key part, one per token, expanded over the heads beside
    the per-head part) carries the same labels at every position of it — they are spread along it, so that the
    operands line up. None where an operand misses the concatenated axis or an axis mixes in an outer factor."""
    labelled = [b for b in blocks if b is not None]
    axes = tuple(sorted({a for b in labelled for a in b.axes}))
    if any(dim not in b.axes or any(o != 1 for o in b.outer) for b in labelled):
        return None
    out: list[Block | None] = []
    for b, t in zip(blocks, tensors):
        if b is None or b.axes == axes:
            out.append(b)
            continue
        shape = val(t).shape
        labels = b.labels
        for i, a in enumerate(axes):
            if a not in b.axes:
                size = shape[a]
                if not isinstance(size, int):
                    return None
                labels = np.repeat(np.expand_dims(labels, i), size, axis=i)
        out.append(Block(axes, labels, (1,) * len(axes), b.zero))
    return out


# ------------------------------------------------------------------ rewrites
@rewrite(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split)
def rewrite_split(ctx: Any, node: Node) -> None:
    old = ctx.old_block(node.args[0])
    r = rank(node.args[0])
    dim = arg(node, 2, "dim", 0) % r
    if old is None or dim not in old.axes:
        return
    i = old.axes.index(dim)
    sizes = [int(b.labels.shape[i]) for b in ctx.new_block(node)]
    if node.target == aten.chunk.default and len(set(sizes)) == 1 and len(sizes) == node.args[1]:
        return  # equal pieces (a fused gate_up cut alike in both halves): the chunk stays as the model wrote it
    node.target = aten.split_with_sizes.default
    node.args, node.kwargs = (node.args[0], sizes, dim), {}


@rewrite(aten.select)
def rewrite_select(ctx: Any, node: Node) -> None:
    old = ctx.old_block(node.args[0])
    dim = node.args[1] % rank(node.args[0])
    if old is None or dim not in old.axes:
        return
    i = old.axes.index(dim)
    kept = ctx.kept_positions(node.args[0], i)
    index = node.args[2] % old.labels.shape[i]
    if index not in kept:
        raise ValueError(f"node {node.name}: the selected slice {index} was removed entirely")
    node.args = (node.args[0], dim, kept.index(index))


@rewrite(aten.slice)
def rewrite_slice(ctx: Any, node: Node) -> None:
    old = ctx.old_block(node.args[0])
    dim = arg(node, 1, "dim", 0) % rank(node.args[0])
    if old is None or dim not in old.axes:
        return
    i = old.axes.index(dim)
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    n = old.labels.shape[i]
    lo, hi, step = slice(start, end, step).indices(n)
    kept = ctx.kept_positions(node.args[0], i)
    if step == 1:
        new_lo = sum(1 for k in kept if k < lo)
        new_hi = sum(1 for k in kept if k < hi)
        node.args, node.kwargs = (node.args[0], dim, new_lo, new_hi, 1), {}
        return
    # a strided slice (GPT-J's x[..., ::2]) stays one if the kept positions it selects are still evenly spaced
    where = {k: j for j, k in enumerate(kept)}
    picked = [where[k] for k in range(lo, hi, step) if k in where]
    if not picked:  # every channel it selected is gone (a rotary part pruned away entirely)
        node.args, node.kwargs = (node.args[0], dim, 0, 0, 1), {}
        return
    if any(b - a != step for a, b in zip(picked, picked[1:])):
        raise ValueError(f"node {node.name}: the strided slice would not select evenly spaced kept channels")
    node.args, node.kwargs = (node.args[0], dim, picked[0], picked[-1] + 1, step), {}


__all__: list[str] = []
