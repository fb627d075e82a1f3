"""A buffer allocated empty and filled piece by piece becomes the concatenation of its pieces.

``out = x.new_empty(..., n); out[..., :a].copy_(p); out[..., a:].copy_(q)`` (DeepSeek-V2/V3 assemble their attention
key this way: a per-head part beside a rotary part shared by the heads) computes ``cat([p, q], -1)``, but as writes
through views of uninitialised memory, which no channel rule can follow. :func:`fill_to_cat` rewrites each such
buffer in a captured graph to ``aten.cat`` of its pieces, placed after the last write, where every slice of one
axis is written exactly once, the pieces tile the axis, and each piece already has its slice's shape and dtype
(the values are then bit for bit the same). Any other use of the buffer's memory — a read before it is full, a
write by another op, a piece that would be broadcast or cast — leaves the graph as it is.

Example:
    >>> import torch
    >>> class Assemble(torch.nn.Module):
    ...     def forward(self, p, q):
    ...         out = p.new_empty(*p.shape[:-1], 6)
    ...         out[..., :4].copy_(p)
    ...         out[..., 4:].copy_(q)
    ...         return out * 2
    >>> ep = torch.export.export(Assemble(), (torch.randn(2, 4), torch.randn(2, 2)))
    >>> gm = ep.module()
    >>> fill_to_cat(gm)
    1
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and "cat" in str(n.target)]
    ['cat.default']
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

__all__ = ["fill_to_cat"]

aten = torch.ops.aten
_EMPTY = {aten.new_empty.default, aten.empty_like.default, aten.empty.memory_format}
_END = 2**63 - 1  # how torch.export writes an open slice end


def fill_to_cat(gm: GraphModule) -> int:
    """Rewrite every buffer of ``gm`` filled by covering slice copies (see the module docstring) to a ``cat`` of
    its pieces; returns how many were rewritten (``gm`` is recompiled when any was)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    done = 0
    for buf in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _EMPTY]:
        plan = _pieces(buf, order)
        if plan is None:
            continue
        dim, writes = plan
        last = max(writes, key=lambda w: order[w[1]])[1]
        with gm.graph.inserting_after(last):
            cat = gm.graph.call_function(aten.cat.default, ([src for _, _, src in writes], dim))
        cat.meta.update({k: v for k, v in buf.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")})
        for view, copy, _ in writes:
            gm.graph.erase_node(copy)
            gm.graph.erase_node(view)
        buf.replace_all_uses_with(cat)
        gm.graph.erase_node(buf)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _pieces(buf: Node, order: dict[Node, int]) -> tuple[int, list[tuple[Node, Node, Node]]] | None:
    """``(dim, [(slice, copy_, source)] in axis order)`` when ``buf`` is filled by covering slice copies along
    one axis before any other use of it reads it; else None."""
    val = buf.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    slices = [u for u in buf.users if u.op == "call_function" and u.target is aten.slice.Tensor]
    readers = [u for u in buf.users if u not in slices]
    writes: list[tuple[int, int, Node, Node, Node]] = []
    dims = set()
    for s in slices:
        dim, start, end, step = (list(s.args[1:]) + [0, None, None, 1][len(s.args) - 1:])[:4]
        start = 0 if start is None else start
        if step != 1 or not isinstance(start, int) or not (end is None or isinstance(end, int)):
            return None
        (copy,) = list(s.users) if len(s.users) == 1 else (None,)
        if copy is None or copy.target is not aten.copy_.default or copy.args[0] is not s or copy.users:
            return None
        src, sv = copy.args[1], s.meta.get("val")
        v = src.meta.get("val") if isinstance(src, Node) else None
        if not isinstance(v, torch.Tensor) or v.dtype != val.dtype or tuple(v.shape) != tuple(sv.shape):
            return None
        dims.add(dim % val.dim())
        writes.append((start, end, s, copy, src))
    if len(dims) != 1 or len(writes) < 2:
        return None
    (dim,) = dims
    size = val.shape[dim]
    writes.sort(key=lambda w: w[0])
    at = 0
    for start, end, *_ in writes:  # the pieces tile [0, size) in order
        if start != at:
            return None
        at = end
    if not (at is None or at == _END or (isinstance(size, int) and at == size)):
        return None
    last = max(order[w[3]] for w in writes)
    if any(order[r] <= last for r in readers):  # read before it is full
        return None
    return dim, [(s, c, src) for _, _, s, c, src in writes]
