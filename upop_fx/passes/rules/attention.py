"""``scaled_dot_product_attention``: where q/k and v head dims are found and coupled.

q and k enter as ``(..., H, T, d)`` with their labels on the head and dim axes (axes may stand between the heads
and the tokens: Hiera's ``(B, H, windows, T, d)``); ``q[h, j]`` meets ``k[h, j]`` in
the score ``q·kᵀ``, so the two are unioned. v's labels pass to the output (``out[h, :, j]`` is a mix of
``v[h, :, j]``). The site is recorded for the group analysis, without the head-dim positions a constant pad
added (they follow their heads); surgery pins the scale, which SDPA would otherwise recompute from the reduced head
dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ...ir.groups import DIMS_KEY, AttentionSite, Block
from ._util import arg, concrete, rank, val
from .registry import RULES, key_of, rewrite, rule

aten = torch.ops.aten


def _heads(ctx: Any, x: Any) -> tuple[np.ndarray | None, bool]:
    """(labels as (H, d), well-formed?) for an attention operand."""
    b = ctx.block(x)
    if b is None:
        return None, True
    r = rank(x)
    if any(o != 1 for o in b.outer):
        return None, False
    if len(b.axes) == 2 and b.axes[0] <= r - 3 and b.axes[1] == r - 1:  # (heads, ..., T, d)
        return b.labels, b.zero
    if b.axes == (r - 1,):  # the same labels in every head: one head broadcast (multi-query: one KV head)
        # (the head axis is taken to be SDPA's, ``r - 3``)
        return np.repeat(b.labels[None], concrete(val(x).shape[r - 3]), axis=0), b.zero
    return None, False


def _unpadded(ctx: Any, *heads: np.ndarray | None) -> tuple[np.ndarray | None, ...]:
    """Attention operands' ``(heads, head_dim)`` labels (of the same shape) without the head-dim positions that a
    constant pad added in every one of them (a head dim padded to a kernel's size: no channel of the site, they
    follow their heads)."""
    present = [h for h in heads if h is not None]
    if not present:
        return heads
    padded = np.all([ctx.is_padding(h).all(axis=0) for h in present], axis=0)
    if not padded.any():
        return heads
    return tuple(None if h is None else h[:, ~padded] for h in heads)


#: ops between a head broadcast and the attention that only move values (their rules are re-run on the copies)
_LAYOUT = {key_of(op) for op in (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze,
                                 aten.slice, aten.transpose, aten.permute, aten.clone, aten.alias, aten._to_copy,
                                 aten.cat)}  # fmt: skip


def _broadcast_chain(x: Node, heads: int) -> tuple[list[Node], int] | None:
    """The ``expand`` that broadcasts ``x``'s channels over its ``heads`` query heads (an axis of size 1 made
    ``heads``: repeat_kv of one KV head, latent attention's rotary key ``expand``-ed to every head) and the layout
    ops from it to ``x``, in graph order, with the expand's broadcast axis; None where there is no such chain."""
    found: list[tuple[list[Node], int]] = []

    def walk(n: Node, path: list[Node], depth: int) -> None:
        if depth > 8 or not isinstance(n, Node) or n.op != "call_function" or n.meta.get(DIMS_KEY) is None:
            return
        if n.target == aten.expand.default:
            src, out = val(n.args[0]).shape, val(n).shape
            off = len(out) - len(src)
            axes = [a for a in range(off, len(out)) if concrete(src[a - off]) == 1 and concrete(out[a]) == heads]
            if len(axes) == 1 and isinstance(n.args[1][axes[0]], int):
                found.append(([n, *reversed(path)], axes[0]))
            return
        if key_of(n.target) not in _LAYOUT:
            return
        for a in n.all_input_nodes:
            walk(a, [*path, n], depth + 1)

    walk(x, [], 0)
    if len(found) != 1:
        return None
    nodes, axis = found[0]
    inside = set(nodes)
    if any(set(n.users) - inside for n in nodes[:-1]) or len(x.users) != 1:  # each read by the next alone
        return None
    return nodes, axis


def _is_broadcast(b: Block, x: Node, heads: int, head_axis: int) -> bool:
    """Whether ``x``'s channels are the same in all its ``heads`` heads (one head broadcast over them), for some
    or all of its head dims."""
    r = rank(x)
    if b.axes == (r - 1,):
        return concrete(val(x).shape[head_axis]) == heads
    if len(b.axes) == 2 and b.axes == (head_axis, r - 1) and b.labels.shape[0] == heads:
        return bool((b.labels == b.labels[:1]).all(axis=0).any())
    return False


def copy_broadcast_heads(ctx: Any, x: Any, heads: int) -> None:
    """Give an attention operand ``x`` (a key or value, heads on its third-last axis) whose channels an ``expand``
    broadcast over the ``heads`` query heads fresh labels per head (:meth:`LabelTracer.copy_labels`): the expand's
    new head axis carries them, and the layout ops from it to ``x`` are re-run on them, so that the head axis is
    a labelled axis (surgery rewrites its literal sizes as it does any channel size). Without copies, q dim ``j``
    of every head would meet the one key dim ``j``, coupling the heads: none could go alone. Where the copies do
    not reach ``x`` as one clean ``(heads, dims)`` block, they are the source again (unioned with it)."""
    if not isinstance(x, Node) or heads < 2:
        return
    b, head_axis = ctx.block(x), rank(x) - 3
    if b is None or head_axis < 0 or not _is_broadcast(b, x, heads, head_axis):
        return
    chain = _broadcast_chain(x, heads)
    if chain is None:
        return
    nodes, axis = chain
    expand = nodes[0]
    eb = expand.meta[DIMS_KEY]
    if any(o != 1 for o in eb.outer) or axis in eb.axes or ctx.is_padding(eb.labels).any():
        return  # (a padded head broadcast stays one: its padding follows the source row)
    saved = {n.name: n.meta.get(DIMS_KEY) for n in nodes}
    copies = ctx.copy_labels(expand, eb.labels, heads)
    axes = tuple(sorted((*eb.axes, axis)))
    labels = np.moveaxis(copies, 0, axes.index(axis))
    expand.meta[DIMS_KEY] = Block(axes, labels, zero=eb.zero)
    current = ctx.node
    try:
        for n in nodes[1:]:
            ctx.node = n
            n.meta[DIMS_KEY] = RULES[key_of(n.target)](ctx, n)
    finally:
        ctx.node = current
    nb = ctx.block(x)
    clean = (nb is not None and nb.axes == (head_axis, rank(x) - 1) and all(o == 1 for o in nb.outer)
             and nb.labels.shape[0] == heads and not (nb.labels == nb.labels[:1]).all(axis=0).any())
    if not clean:  # the copies are their source again (what the re-run refused of them is forgotten)
        for label in copies.reshape(-1).tolist():
            ctx.refusals.pop(label, None)
        ctx.union(copies, np.broadcast_to(eb.labels, copies.shape))
        ctx.copies.pop()
        for n in nodes:
            n.meta[DIMS_KEY] = saved[n.name]


def _query_heads(ctx: Any, q: Any) -> int:
    """The number of query heads of an attention's ``q`` (``(..., H, T, d)``)."""
    b = ctx.block(q)
    if b is not None and len(b.axes) == 2 and b.axes[1] == rank(q) - 1:
        return int(b.labels.shape[0])
    return concrete(val(q).shape[-3]) if rank(q) >= 3 else 1


@rule(aten.scaled_dot_product_attention)
def sdpa(ctx: Any, node: Node) -> Block | None:
    q, k, v = node.args[0], node.args[1], node.args[2]
    heads = _query_heads(ctx, q)
    copy_broadcast_heads(ctx, k, heads)
    copy_broadcast_heads(ctx, v, heads)
    (ql, q_ok), (kl, k_ok), (vl, v_ok) = _heads(ctx, q), _heads(ctx, k), _heads(ctx, v)
    if not (q_ok and k_ok and v_ok):
        for x in (q, k, v):
            ctx.refuse_block(ctx.block(x), "attention operand without a clean (heads, head_dim) layout")
        return None
    if (ql is None) != (kl is None) or (ql is not None and ql.shape != kl.shape):
        ctx.refuse(ql, "q and k head layouts differ (grouped-query attention is not analysed)")
        ctx.refuse(kl, "q and k head layouts differ (grouped-query attention is not analysed)")
        ql = kl = None
    if ql is not None:
        ctx.union(ql, kl)
    site_q, site_k = _unpadded(ctx, ql, kl)
    mask = arg(node, 3, "attn_mask")
    if mask is not None:
        ctx.refuse_block(ctx.block(mask), "channels used as an attention mask")
    qv, kv = val(q), val(k)

    head_axis = ctx.block(q).axes[0] if ql is not None and len(ctx.block(q).axes) == 2 else qv.dim() - 3
    batch = 1
    for i, d in enumerate(qv.shape[:-2]):
        batch *= concrete(d) if i != head_axis else 1
    pair_flops = 2.0 * batch * concrete(qv.shape[-2]) * concrete(kv.shape[-2])
    ctx.sites.append(
        AttentionSite(
            node=node.name, q=site_q, k=site_k, v=_unpadded(ctx, vl)[0], scale=arg(node, 6, "scale"), index=len(ctx.sites),
            flops_qk=pair_flops, flops_v=pair_flops,
        )
    )  # fmt: skip
    mv = val(mask)
    if isinstance(mv, torch.Tensor) and mv.is_floating_point() and mv.dim() >= 3 and concrete(mv.shape[-3]) > 1:
        ctx.sites[-1].fixed_heads = f"node {node.name}: its additive mask {mask.name} differs per head"
    if vl is None:
        return None
    r = rank(node)
    vb = ctx.block(v)
    head = vb.axes[0] + r - rank(v) if len(vb.axes) == 2 else r - 3
    return Block((head, r - 1), vl, zero=vb.zero)


SCORES_KEY = "upop_scores_site"


def _toward_scores(node: Node, depth: int = 16) -> Iterator[Node]:
    """The nodes upstream of ``node``, breadth first, ``depth`` levels at most, not past a scores node."""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen or not isinstance(n, Node):
                continue
            seen.add(n)
            yield n
            if SCORES_KEY not in n.meta:
                nxt.extend(n.all_input_nodes)
        frontier = nxt


def _site_upstream(node: Node) -> int | None:
    """The eager attention site whose q·kᵀ scores feed ``node`` (softmax, scale, mask and dropout between)."""
    return next((n.meta[SCORES_KEY] for n in _toward_scores(node) if SCORES_KEY in n.meta), None)


_ADDS = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor}


def _per_head_bias(probs: Node) -> str | None:
    """The node adding a per-head term to the scores upstream of ``probs`` (a relative-position bias, ALiBi
    written as an add): both operands span the head axis. Such a bias is not sliced with the heads."""
    for n in _toward_scores(probs):
        if n.op == "call_function" and n.target in _ADDS:
            vals = [val(x) for x in n.args[:2]]
            if all(isinstance(v, torch.Tensor) and v.dim() >= 3 and concrete(v.shape[-3]) > 1 for v in vals):
                return n.name
    return None


def activation_matmul(ctx: Any, node: Node, a: Any = None, b: Any = None) -> Block | None:
    """Eager attention written as matmuls: ``q @ kᵀ`` (contracts head dims) and ``probs @ v``. Heads may be
    merged with the batch (``(B·H, T, d)``, as BLOOM's ``bmm``/``baddbmm`` do): the same outer factor on both
    operands. One key/value head broadcast over the query heads by the matmul (multi-query attention) meets
    every query head, as under SDPA."""
    a = node.args[0] if a is None else a
    b = node.args[1] if b is None else b
    ab, bb = _one_head(ctx.block(a), a), _one_head(ctx.block(b), b)
    ra, rb, r = rank(a), rank(b), rank(node)

    if (ab is not None and bb is not None and len(ab.axes) == len(bb.axes) == 2 and ab.axes[1] == ra - 1
            and bb.axes[1] == rb - 2 and ab.axes[0] - ra == bb.axes[0] - rb <= -3):  # (H, .., T, d) @ (H, .., d, T)
        clean = ab.outer[1:] == bb.outer[1:] == (1,) and str(ab.outer[0]) == str(bb.outer[0])
        bb = _broadcast_head(ctx, node, bb, b, ab.labels.shape[0])
        if ab.labels.shape != bb.labels.shape or not clean or not (ab.zero and bb.zero):
            ctx.refuse_block(ab, "attention scores with mismatched q/k head layouts")
            ctx.refuse_block(bb, "attention scores with mismatched q/k head layouts")
            return None
        ctx.union(ab.labels, bb.labels)
        out = val(node)
        batch = _batch(ab, a, out)
        flops = 2.0 * batch * concrete(out.shape[-2]) * concrete(out.shape[-1])
        q, k = _unpadded(ctx, ab.labels, bb.labels)
        site = AttentionSite(node=node.name, q=q, k=k, v=None, scale=None, index=len(ctx.sites), flops_qk=flops)
        ctx.sites.append(site)
        node.meta[SCORES_KEY] = site.index
        return None
    if ab is None and bb is not None and len(bb.axes) == 2 and bb.axes[0] <= rb - 3 and bb.axes[1] == rb - 1 and bb.outer[1] == 1:
        idx = _site_upstream(a)
        out = val(node)
        bb = _broadcast_head(ctx, node, bb, b, concrete(out.shape[bb.axes[0] + r - rb]))
        batch = _batch(bb, b, out)
        flops = 2.0 * batch * concrete(out.shape[-2]) * concrete(val(a).shape[-1])
        v = _unpadded(ctx, bb.labels)[0]
        if idx is not None and ctx.sites[idx].v is None:
            ctx.sites[idx].v, ctx.sites[idx].flops_v = v, flops
            bias = _per_head_bias(a)
            if bias is not None and ctx.sites[idx].fixed_heads is None:
                ctx.sites[idx].fixed_heads = f"node {bias}: an additive score bias differs per head"
        else:
            ctx.sites.append(AttentionSite(node=node.name, q=None, k=None, v=v, scale=None, index=len(ctx.sites), flops_v=flops))
        return Block((bb.axes[0] + r - rb, r - 1), bb.labels, bb.outer, zero=bb.zero)
    for x in (ab, bb):
        ctx.refuse_block(x, "matmul of two activations that is not an attention pattern")
    return None


def _broadcast_head(ctx: Any, node: Node, block: Block, x: Node, heads: int) -> Block:
    """``block`` with its one head made ``heads`` where ``x``'s head axis has size 1 (the matmul ``node`` broadcasts
    it over the query heads): a fresh copy of its labels per query head (:meth:`LabelTracer.copy_labels`, as for
    an ``expand``-ed head), its labels repeated where the head axis holds an outer factor; unchanged otherwise."""
    if block.labels.shape[0] != 1 or heads == 1 or concrete(val(x).shape[block.axes[0]]) != 1:
        return block
    if all(o == 1 for o in block.outer):
        return Block(block.axes, ctx.copy_labels(node, block.labels[0], heads), block.outer, block.zero)
    return Block(block.axes, np.repeat(block.labels, heads, axis=0), block.outer, block.zero)


def _one_head(block: Block | None, x: Node) -> Block | None:
    """A single head (``(B, 1, T, d)`` or ``(B, 1, windows, T, d)``, whose size-1 head axis carries no labels;
    the dims last, or one before in ``kᵀ``): the block with that axis as a head axis of one label, as a multi-head
    one has (the last size-1 axis before the last two; none: unchanged)."""
    r = rank(x)
    if block is None or r < 3 or len(block.axes) != 1 or block.axes[0] not in (r - 1, r - 2):
        return block
    ones = [i for i in range(r - 2) if concrete(val(x).shape[i]) == 1]
    if not ones:
        return block
    return Block((ones[-1], block.axes[0]), block.labels[None], (1, *block.outer), block.zero)


def _batch(block: Block, operand: Node, out: torch.Tensor) -> int:
    """Example batch of an attention matmul: the axes other than the heads and the last two (the batch, windows
    between the heads and the tokens), times an outer factor merged into the head axis (``(B·H, T, d)``: the
    operand's head-axis size over the head count)."""
    head_axis = block.axes[0]
    at = head_axis + out.dim() - val(operand).dim()
    batch = 1
    for i, d in enumerate(out.shape[:-2]):
        batch *= concrete(d) if i != at else 1
    return batch * (concrete(val(operand).shape[head_axis]) // int(block.labels.shape[0]))


@rule(aten.baddbmm)
def baddbmm(ctx: Any, node: Node) -> Block | None:
    """``bias + α · q @ kᵀ`` (BLOOM's ALiBi scores): the matmul is an attention score; the added bias (ALiBi's
    per-head slopes times positions, or any mask) carries no channels and passes through untouched."""
    bias = node.args[0]
    if ctx.block(bias) is not None:
        ctx.refuse_block(ctx.block(bias), "channels in the additive term of a baddbmm")
        return None
    n_sites = len(ctx.sites)
    out = activation_matmul(ctx, node, node.args[1], node.args[2])
    b = val(bias)
    if len(ctx.sites) > n_sites and isinstance(b, torch.Tensor) and b.dim() == 3 and b.shape[0] != 1:
        # a bias that differs per head (ALiBi's slopes) is not sliced with the heads: keep every head
        ctx.sites[-1].fixed_heads = f"node {node.name}: the additive score bias {bias.name} differs per head"
    return out


@rewrite(aten.scaled_dot_product_attention)
def pin_scale(ctx: Any, node: Node) -> None:
    """Keep the softmax temperature of the original head dim: SDPA's default is 1/sqrt(current d). Where the cut
    keeps the head dim (whole heads go), the default stays: it is still the original one."""
    if arg(node, 6, "scale") is None and not _head_dim_kept(ctx, node.args[0]):
        scale = 1.0 / math.sqrt(int(val(node.args[0]).shape[-1]))
        if len(node.args) > 6:
            node.args = (*node.args[:6], scale, *node.args[7:])
        else:
            node.kwargs = {**node.kwargs, "scale": scale}


def _head_dim_kept(ctx: Any, q: Any) -> bool:
    """Whether the cut is known to keep every entry of ``q``'s last axis (the head dim): False where ``q``'s
    channels are not known here (a node surgery inserted)."""
    old, new = ctx.old_block(q), ctx.new_block(q)
    last = val(q).dim() - 1
    if not hasattr(old, "axes") or not hasattr(new, "axes") or last not in old.axes or last not in new.axes:
        return False
    return old.axis_labels(last) == new.axis_labels(last)


__all__ = ["activation_matmul"]
