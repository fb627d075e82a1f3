"""InsertMasks: one learnable mask vector per ranking structure, multiplied in where channels are produced.

Requires: ``gm`` analysed by :class:`~upop_fx.passes.find_groups.FindGroups`; the ranking's structures and
entries over that analysis (:func:`~upop_fx.ir.entries.build_entries`, configured in ``__init__``), entries
grouped by structure in order — the same objects the rest of the run ranks, so a mask element *is* an entry.
Ensures (functional): a *new* GraphModule whose producers of prunable channels (Linear/conv outputs: q, k and
v projections, MLP hidden neurons *before* the activation), and the ``expand`` that copies a shared key/value head
per query head (:class:`~upop_fx.ir.groups.HeadCopies`: each copy masked as its query head's), are multiplied by a
gathered view of the masks;
``gm.meta["upop_masks"]`` holds the :class:`MaskState`, and each ``mul`` that applies a mask carries a
:class:`MaskTag` under ``node.meta["upop_mask"]`` (what :class:`~upop_fx.passes.fuse_attention.FuseMaskedAttention`
reads). With every mask at 1.0 the graph computes exactly what it did (multiplication by 1.0 is exact):
checked on the capture's example inputs. The original ``gm`` is not modified. A graph with nothing to mask is
returned as it is, ``modified=False``.

Mask ``s`` has one element per entry of structure ``s`` (see :mod:`upop_fx.ir.entries`): with granularity
``"upop"`` an attention layer's mask has one element per head dim, shared by every head and by q, k and v —
UPop's ``qkv * alpha``, so a q·k score sees ``m_j²`` — and an MLP's mask one element per neuron. With
``"heads+dims"`` an attention layer's mask has one element per head and then one per head dim, and a channel
is multiplied by both (its head's and its dim's: two gathers, one product).

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.ir.entries import build_entries
    >>> from upop_fx.passes import FindGroups, InsertMasks
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> x = torch.randn(2, 5, 16)
    >>> cap = upop_fx.capture(layer, x)
    >>> analysis = FindGroups()(cap.gm).value
    >>> masked = InsertMasks(*build_entries(analysis, "upop"))(cap.gm).gm
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

from ..capture.program import get_capture
from ..compare import relative_error
from ..errors import PostconditionError, PreconditionError
from ..ir.entries import Entry, Structure
from ..ir.groups import DIMS_KEY, GroupAnalysis, get_analysis
from .base import GraphPass, PassResult

__all__ = ["InsertMasks", "MaskState", "MaskTag", "MASKS_KEY", "MASK_TAG_KEY", "MASK_MODULE", "get_masks"]

#: ``gm.meta`` key of the :class:`MaskState` of a masked graph.
MASKS_KEY = "upop_masks"
#: ``node.meta`` key of the :class:`MaskTag` on every ``mul`` that applies masks.
MASK_TAG_KEY = "upop_mask"
#: the submodule that holds the mask parameters and gather buffers.
MASK_MODULE = "upop_masks"


@dataclass(frozen=True)
class MaskTag:
    """What one masking ``mul(producer, mult)`` applies, for passes that rewrite masked graphs.

    ``mult = index_select(cat([1, *masks]), 0, index)``, then cast to ``dtype`` if it is set, then viewed as
    ``view`` if it is set; ``masks`` are the mask parameters' targets, ``index`` the gather buffer's target.
    With ``granularity="heads+dims"`` a channel is masked by its head dim and by its head: ``heads`` is then a
    second gather buffer, and ``mult`` the product of the two gathers (cast and viewed after).
    """

    producer: str
    masks: tuple[str, ...]
    index: str
    dtype: torch.dtype | None
    view: tuple[int, ...] | None
    heads: str | None = None


@dataclass
class MaskState:
    """The masked graph's state: which structure each mask belongs to, and where it was inserted."""

    structures: list[Structure]
    entries: list[Entry]
    entry_slices: list[tuple[int, int]]  # structure -> (first entry, end) in ``entries``
    sites: list[str] = field(default_factory=list)  # nodes whose output is masked

    def masks(self, gm: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [getattr(gm.get_submodule(MASK_MODULE), f"m{s}") for s in range(len(self.structures))]


def get_masks(gm: torch.fx.GraphModule) -> MaskState:
    state = getattr(gm, "meta", {}).get(MASKS_KEY)
    if state is None:
        raise LookupError("no masks on this graph: run upop_fx.passes.InsertMasks first")
    return state


class InsertMasks(GraphPass[MaskState]):
    """Insert one mask per ranking structure (see the module docstring)."""

    in_place = False

    def __init__(self, structures: list[Structure], entries: list[Entry]) -> None:
        self.structures, self.entries = list(structures), list(entries)

    def requires(self, gm: torch.fx.GraphModule) -> None:
        analysis = get_analysis(gm)
        if MASKS_KEY in gm.meta:
            raise PreconditionError("InsertMasks: this graph is masked already")
        order = [e.structure for e in self.entries]
        if order != sorted(order) or (order and (order[0] != 0 or order[-1] != len(self.structures) - 1)):
            raise PreconditionError("InsertMasks: the entries must be grouped by structure, in order (build_entries)")
        if any(gid >= len(analysis.groups) for e in self.entries for gid in e.channels):
            raise PreconditionError("InsertMasks: the entries name groups this graph's analysis does not have")

    def ensures(self, gm: torch.fx.GraphModule, result: PassResult[MaskState]) -> None:
        if not result.modified:
            return
        tags = [n for n in result.gm.graph.nodes if MASK_TAG_KEY in n.meta]
        if len(tags) != len(result.value.sites):
            raise PostconditionError(f"InsertMasks: {len(result.value.sites)} masked sites but {len(tags)} tagged")
        info = get_capture(gm)
        devices = sorted({p.device.index or 0 for p in gm.parameters() if p.is_cuda})
        outs = []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the same draws for a random graph
            for module in (result.gm, gm):
                torch.manual_seed(0)
                outs.append(module(*info.args, **info.kwargs))
        same = relative_error(*outs) == 0.0
        if not same:
            raise PostconditionError("InsertMasks: the masked graph at mask 1.0 differs from the original")

    def run(self, gm: torch.fx.GraphModule) -> PassResult[MaskState]:
        analysis = get_analysis(gm)
        structures, entries = self.structures, self.entries
        if not structures:
            return PassResult(gm, False, MaskState([], [], []))
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
        new.add_module(MASK_MODULE, holder)
        label_slot = _label_slots(analysis, [(i, e) for i, e in enumerate(entries) if not e.head])
        mixed = any(e.head for e in entries)
        head_slot = _label_slots(analysis, [(i, e) for i, e in enumerate(entries) if e.head]) if mixed else None
        state = MaskState(structures, entries, slices)
        _insert(new, analysis, label_slot, head_slot, slices, state)
        if not state.sites:
            return PassResult(gm, False, MaskState([], [], []))
        new.graph.lint()
        new.recompile()
        new.meta[MASKS_KEY] = state
        return PassResult(new, True, state)


def _label_slots(analysis: GroupAnalysis, entries: list[tuple[int, Entry]]) -> np.ndarray:
    """Per label: its index in the concatenation ``[1, m0, m1, ...]`` (0 = not masked), from ``entries``
    (``(index among all entries, entry)``; disjoint: a channel has one)."""
    slot = np.zeros(len(analysis.label_class), dtype=np.int64)
    class_slot: dict[int, int] = {}
    for i, e in entries:
        for gid, chans in e.channels.items():
            for c in np.asarray(chans).tolist():
                class_slot[int(analysis.groups[gid].classes[c])] = 1 + i
    for label, r in enumerate(analysis.label_class.tolist()):
        slot[label] = class_slot.get(r, 0)
    return slot


def _insert(gm: torch.fx.GraphModule, analysis: GroupAnalysis, label_slot: np.ndarray, head_slot: np.ndarray | None,
            slices, state) -> None:  # noqa: ANN001  # fmt: skip
    graph = gm.graph
    seeds = {u.node for u in analysis.uses if u.role == "out"}
    copied = {c.node for c in analysis.copies}  # a key/value head broadcast over the query heads: its copies
    nodes = {n.name: n for n in graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    for name in sorted(seeds | copied, key=order.__getitem__):
        node = nodes[name]
        block = node.meta.get(DIMS_KEY)
        if block is None or (block.labels.ndim != 1 and name not in copied):  # copies: clean (heads, dims)
            continue
        flat = block.labels.reshape(-1)
        slots = label_slot[flat]
        heads = head_slot[flat] if head_slot is not None else np.zeros_like(slots)
        if not slots.any() and not heads.any():
            continue
        used = sorted({_structure_of(int(x), slices) for x in (*slots, *heads) if x})
        # index into cat([1, m_used...]): remap global slots to the local concatenation
        offsets, pos = {}, 1
        for s in used:
            offsets[s] = pos - slices[s][0]
            pos += slices[s][1] - slices[s][0]
        idx_name = f"idx_{name}"
        holder = gm.get_submodule(MASK_MODULE)
        device = holder.m0.device
        holder.register_buffer(idx_name, torch.as_tensor(_local(slots, offsets, slices), device=device), persistent=False)
        head_name = f"heads_{name}" if heads.any() else None
        if head_name is not None:
            holder.register_buffer(head_name, torch.as_tensor(_local(heads, offsets, slices), device=device), persistent=False)
        axis = block.axes[0]
        rank = node.meta["val"].dim()
        shape = [block.axis_labels(a) if a in block.axes else 1 for a in range(axis, rank)]
        users = list(node.users)
        emit = _Emitter(graph, node)
        masks = [emit("get_attr", f"{MASK_MODULE}.m{s}") for s in used]
        one = emit("call_function", torch.ops.aten.new_ones.default, (masks[0], [1]))  # the masks' device, dtype
        full = emit("call_function", torch.ops.aten.cat.default, ([one, *masks],))
        idx = emit("get_attr", f"{MASK_MODULE}.{idx_name}")
        last = emit("call_function", torch.ops.aten.index_select.default, (full, 0, idx))
        if head_name is not None:  # a channel's head dim times its head
            of_head = emit("call_function", torch.ops.aten.index_select.default,
                           (full, 0, emit("get_attr", f"{MASK_MODULE}.{head_name}")))  # fmt: skip
            last = emit("call_function", torch.ops.aten.mul.Tensor, (last, of_head))
        dtype = node.meta["val"].dtype
        cast = dtype if dtype != torch.float32 else None  # keep the activation's dtype (bf16/fp16 models)
        if cast is not None:
            last = emit("call_function", torch.ops.aten.to.dtype, (last, dtype))
        view = (-1 if len(block.axes) == 1 else shape[0], *shape[1:]) if shape != [len(flat)] else None
        if view is not None:
            last = emit("call_function", torch.ops.aten.view.default, (last, list(view)))
        masked = emit("call_function", torch.ops.aten.mul.Tensor, (node, last))
        masked.meta["val"] = node.meta["val"]  # the mask broadcasts to the producer's shape, in its dtype
        masked.meta[MASK_TAG_KEY] = MaskTag(
            name, tuple(f"{MASK_MODULE}.m{s}" for s in used), f"{MASK_MODULE}.{idx_name}", cast, view,
            None if head_name is None else f"{MASK_MODULE}.{head_name}",
        )
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


def _local(slots: np.ndarray, offsets: dict[int, int], slices: list[tuple[int, int]]) -> np.ndarray:
    """Global slots (``1 + entry index``, 0: none) as indices into one site's ``cat([1, m_used...])``:
    ``offsets[s]`` maps structure ``s``'s entries there."""
    return np.array([0 if x == 0 else offsets[_structure_of(int(x), slices)] + int(x) - 1 for x in slots],
                    dtype=np.int64)  # fmt: skip


def _structure_of(slot: int, slices: list[tuple[int, int]]) -> int:
    e = slot - 1
    for s, (a, b) in enumerate(slices):
        if a <= e < b:
            return s
    raise AssertionError(slot)
