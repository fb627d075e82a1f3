"""Packed projections whose slots keep different widths: give each slot its own chain.

A packed q/k/v projection (timm's ``qkv``, ``nn.MultiheadAttention``'s ``in_proj``, BLIP's vision ``qkv``) is
reshaped to ``(..., 3, H, d)`` and taken apart by ``select``/``unbind`` on the slot axis. When q/k and v keep
different head dims (granularity ``"qk_v"``) that block is no longer rectangular. This step, run by
:class:`~upop_fx.passes.surgery.Surgery`, slices the reduced projection output into its slots and replays the
shape ops between the projection and the ``select``/``unbind`` once per slot, with a slot axis of size 1 — a
dense graph again, computing the same thing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ..errors import SurgeryError
from ..ir.groups import Block
from .blocks import compact
from .rules import REWRITES, key_of

__all__ = ["split_ragged"]

aten = torch.ops.aten


def _slot_axis(labels: np.ndarray, kept: np.ndarray) -> int | None:
    """The labels-array axis along which every slice is dense on its own."""
    for j in range(labels.ndim):
        try:
            for k in range(labels.shape[j]):
                compact(np.take(labels, [k], axis=j), np.take(kept, [k], axis=j), "")
            return j
        except SurgeryError:
            continue
    return None


def split_ragged(gm: torch.fx.GraphModule, ctx: Any, ragged: set[str]) -> set[str]:
    """Rewrite every ragged region of ``gm`` into one chain per slot; returns the names of the new nodes."""
    graph = gm.graph
    order = [n for n in graph.nodes if n.name in ragged]
    slot: dict[str, int] = {}
    for n in order:
        b = ctx.old[n.name]
        j = _slot_axis(b.labels, ~ctx.removed[b.labels])
        if j is None:
            raise SurgeryError(
                f"node {n.name}: the kept channels do not form a dense block: every head must keep as many dims"
            )
        slot[n.name] = j
    for n in order:  # only a packed projection taken apart by select/unbind on its slot axis can be split
        for user in n.users:
            if user.name not in ragged and not _is_slot_exit(user, n, ctx.old[n.name], slot[n.name]):
                raise SurgeryError(
                    f"node {n.name}: the kept channels do not form a dense block: every head must keep as many dims"
                )
    made: set[str] = set()
    clones: dict[tuple[str, int], Node] = {}
    for n in order:
        old = ctx.old[n.name]
        j = slot[n.name]
        for k in range(old.labels.shape[j]):
            sub = np.take(old.labels, [k], axis=j)
            new = Block(old.axes, compact(sub, ~ctx.removed[sub], f"node {n.name}"), old.outer, old.zero)
            src = n.args[0]
            if src.name in ragged:
                arg_map = {src: clones[(src.name, k)]}
            else:
                arg_map = {src: _slot_input(graph, ctx, src, n, sub, made)}
            with graph.inserting_after(n):
                clone = graph.node_copy(n, lambda a, m=arg_map: m.get(a, a))
            clone.meta = dict(n.meta)
            ctx.old[clone.name], ctx.new[clone.name] = old, new
            fn = REWRITES.get(key_of(clone.target))
            if fn is not None:
                try:
                    fn(ctx, clone)
                except ValueError as exc:
                    raise SurgeryError(str(exc)) from exc
            clones[(n.name, k)] = clone
            made.add(clone.name)
    for n in order:
        for user in list(n.users):
            if user.name in ragged or user.name in made:
                continue
            _rewire_exit(graph, user, n, ctx.old[n.name], slot[n.name], clones, made)
    for n in reversed(order):
        graph.erase_node(n)
    return made


def _slot_input(graph: torch.fx.Graph, ctx: Any, src: Node, entry: Node, sub: np.ndarray, made: set[str]) -> Node:
    """``slice`` of the (reduced) packed tensor holding one slot's surviving channels."""
    src_new = ctx.new.get(src.name)
    if not isinstance(src_new, Block) or src_new.labels.ndim != 1:
        raise SurgeryError(f"node {entry.name}: a packed projection must enter the reshape with one channel axis")
    kept = sub.reshape(-1)[~ctx.removed[sub.reshape(-1)]]
    pos = {int(lab): i for i, lab in enumerate(src_new.labels.tolist())}
    idx = sorted(pos[int(lab)] for lab in kept)
    if idx != list(range(idx[0], idx[0] + len(idx))):
        raise SurgeryError(f"node {entry.name}: a slot of the packed projection is not contiguous")
    with graph.inserting_before(entry):
        part = graph.call_function(aten.slice.Tensor, (src, src_new.axes[0], idx[0], idx[0] + len(idx)))
    part.meta = dict(src.meta)
    made.add(part.name)
    return part


def _is_slot_exit(user: Node, n: Node, block: Block, j: int) -> bool:
    rank = n.meta["val"].dim()
    target = getattr(user.target, "overloadpacket", None)
    if target is aten.select:
        return user.args[1] % rank == block.axes[j]
    if target is aten.unbind:
        return (user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)) % rank == block.axes[j]
    return False


def _rewire_exit(graph: torch.fx.Graph, user: Node, n: Node, block: Block, j: int, clones: dict, made: set[str]) -> None:  # noqa: ANN001
    rank = n.meta["val"].dim()
    axis = block.axes[j]
    target = getattr(user.target, "overloadpacket", None)
    if target is aten.select and user.args[1] % rank == axis:
        with graph.inserting_before(user):
            new = graph.call_function(aten.select.int, (clones[(n.name, user.args[2])], axis, 0))
        new.meta = dict(user.meta)
        made.add(new.name)
        user.replace_all_uses_with(new)
        graph.erase_node(user)
        return
    if target is aten.unbind and (user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)) % rank == axis:
        for g in list(user.users):
            with graph.inserting_before(g):
                new = graph.call_function(aten.select.int, (clones[(n.name, g.args[1])], axis, 0))
            new.meta = dict(g.meta)
            made.add(new.name)
            g.replace_all_uses_with(new)
            graph.erase_node(g)
        graph.erase_node(user)
        return
    raise SurgeryError(f"node {user.name}: cannot take apart a packed projection whose slots keep different widths")
