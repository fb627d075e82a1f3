"""The label tracer: forward propagation of channel labels over an aten graph, one rule per op family.

It is the engine of :class:`~upop_fx.passes.find_groups.FindGroups`; rules (``passes/rules``) call its small
API. Labels live in a union-find; every coupling an op implies (a residual add, q·kᵀ in attention) is a union.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ..ir.groups import DIMS_KEY, AttentionSite, Block, HeadCopies, Padding, ParamUse, TableUse
from .param_views import ParamView, resolve
from .rules import RULES, SEEDING, key_of

__all__ = ["LabelTracer"]

# Ops that take tensors but return nothing that carries channels (asserts, shape queries).
_IGNORED = {
    key_of(torch.ops.aten._assert_tensor_metadata.default),
    key_of(torch.ops.aten.sym_size.int),
    key_of(torch.ops.aten.sym_numel.default),
    key_of(torch.ops.aten._assert_scalar.default),
    key_of(torch.ops.aten.sym_constrain_range_for_size.default),
}


class LabelTracer:
    """Propagates labels through ``gm.graph``; rules read and write through this object."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.parent = np.zeros(0, dtype=np.int64)
        self.uses: list[ParamUse] = []
        self.sites: list[AttentionSite] = []
        self.tables: list[TableUse] = []
        self.seeds: list[tuple[str, np.ndarray]] = []
        self.copies: list[HeadCopies] = []  # channels broadcast over query heads, labelled per head
        self.paddings: list[Padding] = []  # positions a constant pad adds along a channel axis
        self._padded = np.zeros(0, dtype=bool)  # label -> a padded position (no channel of any weight)
        self.refusals: dict[int, str] = {}  # label -> first reason its class cannot be removed
        self.slices: dict[int, str] = {}  # label -> why its class is a whole slice (a head's dims reduced together)
        self.node: Node | None = None
        self._views: dict[str, Any] = {}

    # ----------------------------------------------------------------- labels
    def new_labels(self, shape: tuple[int, ...], seed: bool = True) -> np.ndarray:
        """Fresh labels; ``seed``: channels the current node produces (in its groups, masked during the search)."""
        n = int(np.prod(shape)) if shape else 1
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])
        self._padded = np.concatenate([self._padded, np.zeros(n, dtype=bool)])
        labels = np.arange(start, start + n, dtype=np.int64).reshape(shape)
        if seed:
            self.seeds.append((self.node.name if self.node is not None else "", labels.reshape(-1)))
        return labels

    def pad_labels(self, block: Block, axis: int, before: int, after: int) -> Block:
        """``block`` with ``before`` and ``after`` positions added along its tensor ``axis`` by a constant pad of
        the current node: fresh labels, recorded as a :class:`~upop_fx.ir.groups.Padding` of the rows they extend
        (they go only with their whole row)."""
        i = block.axes.index(axis)
        moved = np.moveaxis(block.labels, i, -1)
        rows = moved.reshape(-1, moved.shape[-1])
        added = self.new_labels((rows.shape[0], before + after), seed=False)
        self._padded[added.reshape(-1)] = True
        self.paddings.append(Padding(self.node.name, added, rows.copy()))
        wide = np.concatenate([added[:, :before], rows, added[:, before:]], axis=1)
        labels = np.moveaxis(wide.reshape(*moved.shape[:-1], wide.shape[1]), -1, i)
        return Block(block.axes, np.ascontiguousarray(labels), block.outer, block.zero)

    def is_padding(self, labels: np.ndarray) -> np.ndarray:
        """Per label: whether it is a padded position (:meth:`pad_labels`)."""
        return self._padded[np.asarray(labels)]

    def copy_labels(self, node: Node, source: np.ndarray, heads: int) -> np.ndarray:
        """Fresh labels for ``heads`` copies of ``source`` made by ``node`` (shape ``(heads, *source.shape)``),
        recorded as :class:`~upop_fx.ir.groups.HeadCopies` (the copies are seeded at ``node``)."""
        current, self.node = self.node, node
        try:
            copies = self.new_labels((heads, *source.shape))
        finally:
            self.node = current
        self.copies.append(HeadCopies(node.name, copies, source.copy()))
        return copies

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return int(root)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple labels elementwise: ``a[i]`` and ``b[i]`` must be removed together."""
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)

    # ------------------------------------------------------------ recording
    def refuse(self, labels: np.ndarray | None, reason: str) -> None:
        """Mark the classes of ``labels`` as not removable, with a reason naming the current node."""
        if labels is None:
            return
        where = f"node {self.node.name} ({_op_name(self.node)})" if self.node is not None else "graph"
        for x in np.asarray(labels).reshape(-1).tolist():
            self.refusals.setdefault(int(x), f"{where}: {reason}")

    def couple_slices(self, block: Block, axes: tuple[int, ...], reason: str) -> np.ndarray:
        """The labels of ``block`` along its tensor ``axes`` are reduced together (a norm over a head's dims): couple
        each slice (one per position of the block's other axes) into one class, which can only go whole. Returns
        one label per slice (``block.labels`` without those axes)."""
        where = [block.axes.index(a) for a in axes]
        rest = [i for i in range(len(block.axes)) if i not in where]
        moved = np.moveaxis(block.labels, where, list(range(len(rest), len(block.axes))))
        rows = moved.reshape(int(np.prod(moved.shape[: len(rest)])), -1)
        self.union(rows, rows[:, :1])
        text = f"node {self.node.name} ({_op_name(self.node)}): {reason}" if self.node is not None else reason
        for x in rows[:, 0].tolist():
            self.slices.setdefault(int(x), text)
        return rows[:, 0].reshape(moved.shape[: len(rest)])

    def whole_rows(self, rows: np.ndarray) -> bool:
        """Whether every row of ``rows`` (labels) is one class (a whole slice), with several rows."""
        if rows.shape[0] < 2 or rows.shape[1] < 2:
            return False
        return all(len({self.find(int(x)) for x in row}) == 1 for row in rows.tolist())

    def refuse_block(self, block: Block | None, reason: str) -> None:
        if block is not None:
            self.refuse(block.labels, reason)

    def use(self, param: Node, axis: int, labels: np.ndarray, role: str, flops: float = 0.0) -> None:
        """Record that parameter ``param`` (a get_attr node, or a view of one: see :mod:`..param_views`) has
        its ``axis`` tied to ``labels``. A view axis that is not one axis of the parameter refuses the labels."""
        size = param.meta["val"].shape[axis]
        assert labels.shape == (size,), (param.name, axis, labels.shape, size)
        view = self.view(param)
        located = view.locate(axis) if view is not None else None
        if located is None:
            self.refuse(labels, f"weight {param.name} is a view that mixes the axes of its parameter")
            return
        p_axis, where = located
        p_size = int(view.param.meta["val"].shape[p_axis])
        positions = None if param.op == "get_attr" else where
        self.uses.append(ParamUse(str(view.param.target), p_axis, labels.copy(), role, self.node.name, flops,
                                  positions, p_size))

    def view(self, arg: Any) -> ParamView | None:
        """The parameter ``arg`` is, or is a view of (None for anything else)."""
        out = resolve(arg, self._views)
        return out if isinstance(out, ParamView) else None

    # ---------------------------------------------------------------- access
    @staticmethod
    def block(arg: Any) -> Block | None:
        if isinstance(arg, Node):
            b = arg.meta.get(DIMS_KEY)
            return b if isinstance(b, Block) else None
        return None

    def is_param(self, arg: Any) -> bool:
        """A parameter, or a view of one (a chunk, a slice, a transpose: what a weight may be)."""
        return isinstance(arg, Node) and (arg.op == "get_attr" or self.view(arg) is not None)

    # ------------------------------------------------------------------ run
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.node = node
            node.meta[DIMS_KEY] = None
            if node.op == "output":
                self._refuse_outputs(node)
                continue
            if node.op != "call_function":
                continue
            inputs = [n for n in node.all_input_nodes if _carries(n)]
            if not inputs and key_of(node.target) not in SEEDING:
                continue
            if node.target is operator.getitem:
                blocks = node.args[0].meta.get(DIMS_KEY)
                if isinstance(blocks, list):
                    node.meta[DIMS_KEY] = blocks[node.args[1]]
                continue
            if key_of(node.target) in _IGNORED:
                continue
            fn = RULES.get(key_of(node.target))
            if fn is None:
                for n in inputs:
                    self.refuse_block(self.block(n), f"no channel rule for {_op_name(node)}")
                continue
            node.meta[DIMS_KEY] = fn(self, node)
        self.node = None

    def _refuse_outputs(self, node: Node) -> None:
        flat, _ = torch.utils._pytree.tree_flatten(node.args)
        for n in flat:
            b = self.block(n)
            if b is not None:
                self.refuse(b.labels, "its channels reach the model output")


def _carries(n: Node) -> bool:
    b = n.meta.get(DIMS_KEY)
    if isinstance(b, list):
        return any(x is not None for x in b)
    return b is not None


def _op_name(node: Node) -> str:
    t = node.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))
