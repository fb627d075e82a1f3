"""SortExperts: order each expert's neurons by weight magnitude, so that an MoE layer's neuron ``j`` is every
expert's ``j``-th strongest.

A stacked MoE layer (``[E, 2I, H]`` and ``[E, H, I]`` weights applied by a grouped matmul) stays dense only if
its experts keep one width, so the analysis gives it one MLP group whose channel ``j`` is neuron ``j`` of every
expert (as UPop's head-dim mask is shared by the heads of a layer). The neurons of one expert are in no
particular order, so this pass permutes them, expert by expert — the rows of the producing weights and the
columns of the consuming one together, which leaves every output unchanged — until channel ``j`` holds each
expert's ``j``-th largest neuron by the product of the norms of its weight slices. The ranking then chooses
channels as for any MLP: keeping channel ``j`` keeps the ``j``-th strongest neuron of every expert, so each
expert keeps its own neurons, not the ones that happened to share an index.

Requires: :class:`~upop_fx.passes.find_groups.FindGroups` has run (``gm.meta["upop_groups"]``).
Ensures (in place; shapes unchanged, so ``modified=False``): the graph's outputs on the capture's example
inputs are unchanged (relative error ≤ 1e-5), and within every expert of every sorted group the neuron scores
do not increase with the channel index. The caller's tensors are never written: the permuted weights are new
tensors.

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.passes import FindGroups, SortExperts
    >>> class Experts(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w1 = torch.nn.Parameter(torch.randn(4, 8, 16))
    ...         self.w2 = torch.nn.Parameter(torch.randn(4, 16, 8))
    ...     def forward(self, x):
    ...         h = torch.relu(torch.bmm(x.unsqueeze(0).expand(4, -1, -1), self.w1))
    ...         return x + torch.bmm(h, self.w2).sum(0)
    >>> cap = upop_fx.capture(Experts().eval(), torch.randn(3, 8))
    >>> FindGroups()(cap.gm).value.prunable[0].describe()
    '#0 mlp w1 experts=4 width=16'
    >>> SortExperts()(cap.gm).value   # the ids of the groups it sorted
    [0]
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import torch

from ..capture.program import get_capture
from ..compare import relative_error
from ..errors import PostconditionError
from ..ir.groups import DimGroup, get_analysis
from .base import GraphPass, PassResult, module_tensors, set_tensor

__all__ = ["SortExperts", "neuron_scores"]

log = logging.getLogger(__name__)


def _uses(g: DimGroup) -> list[tuple[str, int, np.ndarray]]:
    return [*g.producers, *g.consumers]


def neuron_scores(gm: torch.fx.GraphModule, g: DimGroup) -> np.ndarray | None:
    """``(experts, width)``: for each expert and channel of a stacked group, the sum of the log-norms of the
    neuron's weight slices (every row and column it owns); None when a use is not a stacked ``[E, ...]``
    tensor."""
    tensors = module_tensors(gm)
    out = np.zeros((g.experts, g.width))
    for name, axis, chan in _uses(g):
        t = tensors.get(name)
        if t is None or t.dim() < 2 or axis == 0 or t.shape[0] != g.experts:
            return None
        other = [a for a in range(1, t.dim()) if a != axis]
        with torch.no_grad():
            norms = t.detach().double().pow(2).sum(dim=other).sqrt() if other else t.detach().double().abs()
        norms = norms.cpu().numpy()  # (E, size of axis)
        pos = np.nonzero(chan >= 0)[0]
        np.add.at(out, (slice(None), chan[pos]), np.log(norms[:, pos] + 1e-30))
    return out


class SortExperts(GraphPass[list[int]]):
    """Permute the neurons of every expert of every stacked MoE group (see the module docstring); the value is
    the ids of the groups it sorted."""

    in_place = True

    def requires(self, gm: torch.fx.GraphModule) -> None:
        get_analysis(gm)  # the base turns its LookupError ("run FindGroups first") into a PreconditionError

    def run(self, gm: torch.fx.GraphModule) -> PassResult[list[int]]:
        groups = [g for g in get_analysis(gm).prunable if g.experts]
        if not groups:
            self._before = None
            return PassResult(gm, False, [])
        cap = get_capture(gm)
        with torch.no_grad():
            self._before = gm(*cap.args, **cap.kwargs)
        tensors = module_tensors(gm)
        index: dict[tuple[str, int], np.ndarray] = {}
        sorted_ids = []
        for g in groups:
            scores = neuron_scores(gm, g)
            if scores is None:
                log.debug("group %d: a use is not stacked per expert; left in its order", g.id)
                continue
            order = np.argsort(-scores, axis=1, kind="stable")  # (E, width): old channel at each new channel
            for name, axis, chan in _uses(g):
                size = tensors[name].shape[axis]
                idx = index.setdefault((name, axis), np.tile(np.arange(size), (g.experts, 1)))
                pos = np.nonzero(chan >= 0)[0]
                nth = np.zeros(len(pos), dtype=np.int64)  # a channel may own several positions (gate and up)
                seen: dict[int, int] = defaultdict(int)
                for i, c in enumerate(chan[pos].tolist()):
                    nth[i], seen[c] = seen[c], seen[c] + 1
                where = np.full((g.width, max(seen.values())), -1)
                where[chan[pos], nth] = pos  # (channel, occurrence) -> its position along this axis
                for e in range(g.experts):  # position p now holds the old neuron ranked chan[p] in expert e
                    idx[e, pos] = where[order[e, chan[pos]], nth]
            sorted_ids.append(g.id)
        by_name: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for (name, axis), idx in index.items():
            by_name[name].append((axis, idx))
        with torch.no_grad():
            for name, axes in by_name.items():
                t = tensors[name]
                new = t.detach()
                for axis, idx in axes:
                    new = torch.stack([new[e].index_select(axis - 1, torch.as_tensor(idx[e], device=t.device))
                                       for e in range(t.shape[0])])
                set_tensor(gm, name, new, t)
        return PassResult(gm, False, sorted_ids)

    def ensures(self, gm: torch.fx.GraphModule, result: PassResult[list[int]]) -> None:
        if self._before is None:
            return
        cap = get_capture(gm)
        with torch.no_grad():
            after = gm(*cap.args, **cap.kwargs)
        err = relative_error(after, self._before)
        self._before = None
        if not err <= 1e-5:
            raise PostconditionError(f"SortExperts: permuting the experts' neurons changed the outputs (relative error {err:.2e})")
        analysis = get_analysis(gm)
        for gid in result.value:
            scores = neuron_scores(gm, analysis.groups[gid])
            if scores is not None and np.any(np.diff(scores, axis=1) > 1e-9 * np.abs(scores).max()):
                raise PostconditionError(f"SortExperts: group {gid}: an expert's neurons are not in decreasing order")
