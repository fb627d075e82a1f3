"""Layer-wise distillation: the residual stream after each (cut) layer held to the dense model's.

A cut leaves the residual stream's width whole, so the value right after each cut layer's residual add (an
attention block's, an MLP's: the sites :func:`~upop_fx.training.reconstruct.refit_sites` finds,
:func:`residual_points`) exists in both graphs with the same shape; in the search's masked graph, where every
layer may yet be cut, the points are the residual adds after every linear layer, paired by node name with the
teacher's (:func:`named_points`). :class:`LayerwiseDistillation` adds to the output distillation
(:func:`~upop_fx.training.loop.distillation_loss`) the mean over those points of
:func:`~upop_fx.training.loop.feature_loss` — each feature's squared error over the teacher's variance of it —
times a weight (CoFi's layer distillation). The output loss alone lets every layer drift as long as the last one
lands; the per-layer terms keep each block computing what the dense block computed, which is what the
reconstruction fitted it to.

The values are read by :class:`Taps`: a node after each tapped node of a graph that keeps its value (the tensor
itself, with its autograd history) for the loss; the graph is restored when the taps are removed.

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.passes import FindGroups, Surgery
    >>> from upop_fx.training.layerwise import LayerwiseDistillation
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> dense = upop_fx.capture(layer, torch.randn(2, 5, 16)).gm
    >>> keep = {g.id: range(g.width // 2) for g in FindGroups()(dense).value.prunable if g.kind == "mlp"}
    >>> small = Surgery(keep)(dense).gm
    >>> with LayerwiseDistillation(dense, small, weight=1.0) as objective:
    ...     loss = objective(small, torch.randn(4, 5, 16))
    >>> objective.points, bool(loss > 0)
    (1, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import Node

from .loop import Distillation, call, feature_loss, real_rows
from .reconstruct import linear_parts, refit_sites, residual_add

__all__ = ["Taps", "LayerwiseDistillation", "residual_points", "named_points"]


class Taps:
    """While open, ``gm`` keeps the values of ``nodes`` of each forward in :attr:`values` (in the order of
    ``nodes``; replaced at each forward). The graph is restored on exit."""

    def __init__(self, gm: torch.fx.GraphModule, nodes: Sequence[Node]) -> None:
        self.gm, self.nodes = gm, list(nodes)
        self.values: list[Any] = [None] * len(self.nodes)
        self._added: list[Node] = []

    def _keep(self, value: Any, index: int) -> None:
        self.values[index] = value

    def __enter__(self) -> Taps:
        graph = self.gm.graph
        for i, n in enumerate(self.nodes):
            with graph.inserting_after(n):
                self._added.append(graph.call_function(self._keep, (n, i)))
        self.gm.recompile()
        return self

    def __exit__(self, *exc: Any) -> None:
        for n in self._added:
            self.gm.graph.erase_node(n)
        self._added.clear()
        self.values = [None] * len(self.nodes)
        self.gm.recompile()

    def take(self) -> list[Any]:
        """The values of the last forward, released from the taps."""
        values, self.values = self.values, [None] * len(self.nodes)
        if any(v is None for v in values):
            missing = [n.name for n, v in zip(self.nodes, values) if v is None]
            raise RuntimeError(f"the forward did not run the tapped nodes {missing}")
        return values


def residual_points(dense: torch.fx.GraphModule, small: torch.fx.GraphModule) -> list[tuple[Node, Node]]:
    """``(node of small, node of dense)``: the residual stream right after each cut layer, in both graphs."""
    return [(s.small_add, s.dense_add) for s in refit_sites(dense, small)
            if s.small_add is not None and s.dense_add is not None]


def named_points(teacher: torch.fx.GraphModule, student: torch.fx.GraphModule) -> list[tuple[Node, Node]]:
    """``(node of student, node of teacher)``: the residual stream right after every linear layer that writes
    into it, paired by node name — for a student made from the teacher's graph by adding nodes (the search's
    masked graph), where every layer may yet be cut."""
    names = {n.name: n for n in teacher.graph.nodes}
    pairs = []
    for n in student.graph.nodes:
        if linear_parts(n) is None:
            continue
        added = residual_add(n)
        if added is not None and added[0].name in names:
            pairs.append((added[0], names[added[0].name]))
    return pairs


class LayerwiseDistillation(Distillation):
    """The output distillation of ``student`` (the cut graph) against ``teacher`` (the dense graph) plus
    ``weight`` times the mean :func:`feature_loss` over ``pairs`` (default :func:`residual_points`). A context
    manager: the taps are in both graphs while it is open. The objective takes the student (or the student
    wrapped, as by ``DistributedDataParallel``) and a batch, as every objective does."""

    def __init__(self, teacher: torch.fx.GraphModule, student: torch.fx.GraphModule, weight: float,
                 pairs: list[tuple[Node, Node]] | None = None, task_weight: float = 0.0) -> None:
        super().__init__(teacher, task_weight)
        pairs = residual_points(teacher, student) if pairs is None else pairs
        self.weight = weight
        self.points = len(pairs)
        self._student = Taps(student, [s for s, _ in pairs])
        self._teacher = Taps(teacher, [d for _, d in pairs])

    def __enter__(self) -> LayerwiseDistillation:
        self._student.__enter__()
        try:
            self._teacher.__enter__()
        except BaseException:
            self._student.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._teacher.__exit__(*exc)
        finally:
            self._student.__exit__(*exc)

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            reference = call(self.teacher, batch)
        targets = self._teacher.take() if self.points else []
        loss = self.output_loss(call(model, batch), reference, batch)
        if not self.points:
            return loss
        layers = [feature_loss(real_rows(batch, s.float()), real_rows(batch, t.float()))
                  for s, t in zip(self._student.take(), targets)]
        return loss + self.weight * torch.stack(layers).mean()
