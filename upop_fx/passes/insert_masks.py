"""InsertMasks: one learnable mask vector per ranking structure, multiplied in where channels are produced.

Requires: ``gm`` analysed by :class:`~upop_fx.passes.find_groups.FindGroups`; a granularity.
Ensures: a *new* GraphModule whose producers of prunable channels (Linear/conv outputs: q, k and v
projections, MLP hidden neurons *before* the activation) are multiplied by a gathered view of the masks;
``gm.meta["upop_masks"]`` holds the :class:`MaskState`. With every mask at 1.0 the graph computes exactly what
it did (multiplication by 1.0 is exact). The original ``gm`` is not modified.

Mask ``s`` has one element per entry of structure ``s`` (see ``upop_fx/structures.py``): with granularity
``"upop"`` an attention layer's mask has one element per head dim, shared by every head and by q, k and v —
UPop's ``qkv * alpha``, so a q·k score sees ``m_j²`` — and an MLP's mask one element per neuron.

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.passes import FindGroups, InsertMasks
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> x = torch.randn(2, 5, 16)
    >>> cap = upop_fx.capture(layer, x)
    >>> analysis = FindGroups()(cap.gm, cap.batch_size).value
    >>> masked = InsertMasks("upop")(cap.gm).gm
    >>> [tuple(m.shape) for m in masked.upop_masks.parameters()]
    [(8,), (32,)]
    >>> bool((masked(x) == cap.gm(x)).all())
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from ..groups import GroupAnalysis, get_analysis
from ..structures import Entry, Structure, build_entries
from .base import GraphPass, PassResult

__all__ = ["InsertMasks", "MaskState", "MASKS_KEY", "get_masks"]

MASKS_KEY = "upop_masks"
_MODULE = "upop_masks"


@dataclass
class MaskState:
    """The masked graph's state: which structure each mask belongs to, and where it was inserted."""

    granularity: str
    budget: str
    structures: list[Structure]
    entries: list[Entry]
    entry_slices: list[tuple[int, int]]  # structure -> (first entry, end) in ``entries``
    sites: list[str] = field(default_factory=list)  # nodes whose output is masked

    def masks(self, gm: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [getattr(gm.get_submodule(_MODULE), f"m{s}") for s in range(len(self.structures))]


def get_masks(gm: torch.fx.GraphModule) -> MaskState:
    state = getattr(gm, "meta", {}).get(MASKS_KEY)
    if state is None:
        raise LookupError("no masks on this graph: run upop_fx.passes.InsertMasks first")
    return state


class InsertMasks(GraphPass[MaskState]):
    requires = "gm analysed by FindGroups"
    ensures = "a new GraphModule with one mask per structure, an exact no-op at 1.0; gm.meta['upop_masks']"

    def __init__(self, granularity: str = "upop", budget: str = "params") -> None:
        self.granularity, self.budget = granularity, budget

    def run(self, gm: torch.fx.GraphModule) -> PassResult[MaskState]:
        analysis = get_analysis(gm)
        structures, entries = build_entries(analysis, self.granularity, self.budget)
        order = sorted(range(len(entries)), key=lambda i: entries[i].structure)
        entries = [entries[i] for i in order]
        slices, start = [], 0
        for s in range(len(structures)):
            n = sum(1 for e in entries if e.structure == s)
            slices.append((start, start + n))
            start += n
        new = copy.deepcopy(gm)
        holder = torch.nn.Module()
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        for s, (a, b) in enumerate(slices):
            holder.register_parameter(f"m{s}", torch.nn.Parameter(torch.ones(b - a, device=device)))
        new.add_module(_MODULE, holder)
        label_slot = _label_slots(analysis, entries, slices)
        state = MaskState(self.granularity, self.budget, structures, entries, slices)
        _insert(new, analysis, label_slot, slices, state)
        new.graph.lint()
        new.recompile()
        new.meta[MASKS_KEY] = state
        return PassResult(new, True, state)


def _label_slots(analysis: GroupAnalysis, entries: list[Entry], slices: list[tuple[int, int]]) -> np.ndarray:
    """Per label: its index in the concatenation ``[1, m0, m1, ...]`` (0 = not masked)."""
    slot = np.zeros(len(analysis.label_class), dtype=np.int64)
    class_slot: dict[int, int] = {}
    for i, e in enumerate(entries):
        for gid, chans in e.channels.items():
            for c in np.asarray(chans).tolist():
                class_slot[int(analysis.groups[gid].classes[c])] = 1 + i
    for label, r in enumerate(analysis.label_class.tolist()):
        slot[label] = class_slot.get(r, 0)
    return slot


def _insert(gm: torch.fx.GraphModule, analysis: GroupAnalysis, label_slot: np.ndarray, slices, state) -> None:  # noqa: ANN001
    from ..groups import DIMS_KEY

    graph = gm.graph
    seeds = {u.node for u in analysis.uses if u.role == "out"}
    nodes = {n.name: n for n in graph.nodes}
    for name in sorted(seeds, key=lambda n: list(nodes).index(n)):
        node = nodes[name]
        block = node.meta.get(DIMS_KEY)
        if block is None or block.labels.ndim != 1:
            continue
        slots = label_slot[block.labels]
        if not slots.any():
            continue
        used = sorted({_structure_of(int(x), slices) for x in slots if x})
        # index into cat([1, m_used...]): remap global slots to the local concatenation
        offsets, pos = {}, 1
        for s in used:
            offsets[s] = pos
            pos += slices[s][1] - slices[s][0]
        local = np.array(
            [0 if x == 0 else offsets[_structure_of(int(x), slices)] + (int(x) - 1 - slices[_structure_of(int(x), slices)][0]) for x in slots],
            dtype=np.int64,
        )
        idx_name = f"idx_{name}"
        holder = gm.get_submodule(_MODULE)
        device = holder.m0.device
        holder.register_buffer(idx_name, torch.as_tensor(local, device=device), persistent=False)
        axis = block.axes[0]
        rank = node.meta["val"].dim()
        users = list(node.users)
        emit = _Emitter(graph, node)
        masks = [emit("get_attr", f"{_MODULE}.m{s}") for s in used]
        one = emit("call_function", torch.ops.aten.new_ones.default, (masks[0], [1]))  # the masks' device, dtype
        full = emit("call_function", torch.ops.aten.cat.default, ([one, *masks],))
        idx = emit("get_attr", f"{_MODULE}.{idx_name}")
        last = emit("call_function", torch.ops.aten.index_select.default, (full, 0, idx))
        dtype = node.meta["val"].dtype
        if dtype != torch.float32:  # keep the activation's dtype (bf16/fp16 models)
            last = emit("call_function", torch.ops.aten.to.dtype, (last, dtype))
        if axis != rank - 1:
            last = emit("call_function", torch.ops.aten.view.default, (last, [-1] + [1] * (rank - 1 - axis)))
        masked = emit("call_function", torch.ops.aten.mul.Tensor, (node, last))
        for u in users:
            u.replace_input_with(node, masked)
        state.sites.append(name)


class _Emitter:
    """Creates nodes one after another, starting after ``node``."""

    def __init__(self, graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        self.graph, self.cursor = graph, node

    def __call__(self, op: str, target: object, args: tuple = (), kwargs: dict | None = None) -> torch.fx.Node:
        with self.graph.inserting_after(self.cursor):
            self.cursor = self.graph.create_node(op, target, args, kwargs or {})
        return self.cursor


def _structure_of(slot: int, slices: list[tuple[int, int]]) -> int:
    e = slot - 1
    for s, (a, b) in enumerate(slices):
        if a <= e < b:
            return s
    raise AssertionError(slot)
