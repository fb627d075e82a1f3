"""Ranking entries: what one step of a ranking removes, at a chosen granularity.

An *entry* is the smallest unit a ranking can remove and still leave a dense graph:

* ``"upop"`` (UPop's default): per attention layer, head-dim index ``j`` — q, k and v dim ``j`` of every head
  together (one mask shared across heads and q/k/v); per MLP, one hidden neuron.
* ``"qk_v"``: q/k dim ``j`` and v dim ``j`` are separate entries (all heads together); where one projection
  interleaves q, k and v per head, they share entries as with ``"upop"``.
* ``"heads"``: whole heads (q, k and v of head ``h``); where a per-head additive score bias (ALiBi) fixes the
  heads, that layer's entries are head dims as with ``"upop"``.
* Whatever the granularity, an attention group whose ``whole_heads`` is set (the model's class fixes its head
  size: :mod:`upop_fx.module.class_limits`) has whole heads as its entries.
* Attention groups that share a ``joint`` key (the model's class computes one rotary table for every layer) are
  one structure whatever the granularity: entry ``j`` is rotary pair ``j`` of q/k and the v dims at its
  positions, in every one of those layers at once, so that every layer keeps the same pairs.
* ``"heads+dims"``: per attention layer both — its whole heads and its head dims (as with ``"upop"``) are
  entries of one structure, so a ranking removes whichever is less important: a layer keeps ``h`` heads of
  ``j`` dims each (the kept q/k/v channels are the product). Removing a head is what cuts the softmax and the
  ``T×T`` score work, which a head dim does not. Entries of one layer overlap (a head and a dim share a
  channel): UPop's masks multiply a channel by its head's mask and its dim's.

A *structure* is the set of entries of one attention layer or one MLP; each keeps at least one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..options import BUDGETS, GRANULARITIES, check_choice
from .groups import DimGroup, GroupAnalysis

__all__ = [
    "Entry", "Structure", "STACKED_MULTIPLE", "widths", "build_entries", "group_cost", "keep_sets", "keep_jaccard",
    "removed_fraction", "entries_left",
]

#: stacked experts keep a multiple of this many neurons: grouped matmul kernels (``torch._grouped_mm``) need
#: rows aligned to 16 bytes, 8 entries of a 16-bit dtype (4 of float32)
STACKED_MULTIPLE = 8


@dataclass
class Structure:
    kind: str  # "attn", "qk", "v" or "mlp": the unit of z-scoring
    name: str
    groups: list[int]
    multiple: int = 1  #: keep a multiple of this many entries (or all of them)
    #: ``budget="latency"``: the fraction of the dense model's measured latency saved with ``k`` entries kept
    #: (index ``k``, or ``[h, j]`` where the structure has head entries; :mod:`upop_fx.runtime.latency_tables`), None otherwise
    latency: np.ndarray | None = field(default=None, repr=False)
    #: ``"heads+dims"``: the structure's first ``heads`` entries are whole heads, the rest head dims (0: none)
    heads: int = 0


@dataclass
class Entry:
    structure: int
    kind: str
    channels: dict[int, np.ndarray] = field(default_factory=dict)  # group id -> channel indices
    cost: float = 0.0
    head: bool = False  #: a whole head of a ``"heads+dims"`` structure (its other entries are head dims)


def _head_channels(g: DimGroup, j: int) -> np.ndarray:
    return np.arange(g.heads, dtype=np.int64) * g.head_dim + j


def _head(g: DimGroup, h: int) -> np.ndarray:
    return h * g.head_dim + np.arange(g.head_dim, dtype=np.int64)


def _interleaved(qk: DimGroup, v: DimGroup) -> bool:
    """q/k and v come out of one projection with the slots interleaved per head (BLOOM's and GPT-NeoX's
    ``query_key_value`` viewed as ``(B, T, H, 3, d)``): one view splits them, so they must keep one head dim."""
    v_rows = {(name, axis): chan for name, axis, chan in v.producers}
    for name, axis, chan in qk.producers:
        other = v_rows.get((name, axis))
        if other is None:
            continue
        a, b = np.nonzero(chan >= 0)[0], np.nonzero(other >= 0)[0]
        if len(a) and len(b) and not (a.max() < b.min() or b.max() < a.min()):
            return True
    return False


def _shared_dims(qk: DimGroup, v: DimGroup) -> bool:
    """q/k and v can share head-dim entries: the same head dim, v unpaired (a rotary pair of q/k takes two v dims)."""
    return v.dims is None and qk.head_positions == v.head_dim


def build_entries(analysis: GroupAnalysis, granularity: str = "upop", budget: str = "params") -> tuple[list[Structure], list[Entry]]:
    """Structures and entries over every prunable group of ``analysis``."""
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("budget", budget, BUDGETS)
    structures: list[Structure] = []
    entries: list[Entry] = []
    by_site: dict[int, dict[str, DimGroup]] = {}
    for g in analysis.prunable:
        if g.kind in ("qk", "v"):
            by_site.setdefault(g.site, {})[g.kind] = g
    done: set[int] = set()
    joint: dict[str, list[tuple[DimGroup, DimGroup]]] = {}
    for pair in by_site.values():
        qk, v = pair.get("qk"), pair.get("v")
        if qk is not None and qk.joint and not qk.whole_heads and v is not None and _shared_dims(qk, v):
            joint.setdefault(qk.joint, []).append((qk, v))

    def add(kind: str, name: str, groups: list[DimGroup], chans: list[dict[int, np.ndarray]],
            heads: list[dict[int, np.ndarray]] = ()) -> None:  # fmt: skip
        multiple = STACKED_MULTIPLE if any(g.experts for g in groups) else 1
        structures.append(Structure(kind, name, [g.id for g in groups], multiple, heads=len(heads)))
        for ch in heads:  # z-scored as a kind of their own: a head and a head dim compete by rank
            entries.append(Entry(len(structures) - 1, "head", ch, head=True))
        for ch in chans:
            entries.append(Entry(len(structures) - 1, kind, ch))

    for g in analysis.prunable:
        if g.id in done:
            continue
        name = g.where
        if g.kind == "mlp":
            what = f"mlp ({g.experts} experts)" if g.experts else "mlp"
            add("mlp", f"{name} {what}", [g], [{g.id: np.array([c])} for c in range(g.width)])
            done.add(g.id)
            continue
        pair = by_site.get(g.site, {})
        qk, v = pair.get("qk"), pair.get("v")
        shared = joint.get(qk.joint) if qk is not None and qk.joint else None
        if shared and len({(q.head_dim, q.dims) for q, _ in shared}) == 1:
            first = shared[0][0]
            add("attn", f"{first.tower} attn: rotary pairs shared by {len(shared)} layers", [x for p in shared for x in p], [
                {gid: ch for q, w in shared for gid, ch in ((q.id, _head_channels(q, j)),
                 (w.id, np.concatenate([_head_channels(w, p) for p in q.positions(j)])))}
                for j in range(first.head_dim)
            ])  # fmt: skip
            done.update(x.id for p in shared for x in p)
            continue
        both = qk is not None and v is not None and qk.heads == v.heads
        label = f"{name} {'cross-' if g.cross else ''}attn"
        fixed = analysis.sites[g.site].fixed_heads if g.site is not None and g.site < len(analysis.sites) else None
        whole = qk is not None and qk.whole_heads or v is not None and v.whole_heads
        if (granularity == "heads" or whole) and both and not fixed:
            add("attn", label, [qk, v], [{qk.id: _head(qk, h), v.id: _head(v, h)} for h in range(qk.heads)])
            done.update({qk.id, v.id})
        elif ((granularity in ("upop", "heads", "heads+dims") or (both and _interleaved(qk, v))) and both
              and _shared_dims(qk, v)):  # fmt: skip
            # heads: where the heads are fixed; qk_v: where one per-head view splits q, k and v
            # head-dim j of q, k and v together; a rotary pair of q/k takes the v dims at the same positions
            mixed = granularity == "heads+dims" and not fixed and qk.heads > 1
            add("attn", label, [qk, v], [
                {qk.id: _head_channels(qk, j), v.id: np.concatenate([_head_channels(v, p) for p in qk.positions(j)])}
                for j in range(qk.head_dim)
            ], [{qk.id: _head(qk, h), v.id: _head(v, h)} for h in range(qk.heads)] if mixed else [])  # fmt: skip
            done.update({qk.id, v.id})
        else:  # qk_v, or a layer whose q/k and v cannot share entries
            add(g.kind, f"{label} {g.kind}", [g], [{g.id: _head_channels(g, j)} for j in range(g.head_dim)])
            done.add(g.id)
    for e in entries:
        e.cost = float(sum(group_cost(analysis.groups[gid], budget)[ch].sum() for gid, ch in e.channels.items()))
    return structures, entries


def group_cost(g: DimGroup, budget: str) -> np.ndarray:
    """Per-channel cost of ``g`` in the budget's unit (parameters or FLOPs; FLOPs stand for a latency budget's
    per-channel share, whose real unit is a structure's measured table)."""
    return g.cost_params if budget == "params" else g.cost_flops


def keep_sets(analysis: GroupAnalysis, entries: list[Entry], pruned: np.ndarray) -> dict[int, list[int]]:
    """Kept channel indices per prunable group, once the ``pruned`` entries are removed."""
    keep = {g.id: np.ones(g.width, dtype=bool) for g in analysis.prunable}
    for e, p in zip(entries, pruned):
        if p:
            for gid, ch in e.channels.items():
                keep[gid][ch] = False
    return {gid: np.nonzero(k)[0].tolist() for gid, k in keep.items()}


def keep_jaccard(a: dict[int, list[int]], b: dict[int, list[int]]) -> float:
    """How alike two keep-sets are: the Jaccard index of their kept (group, channel) pairs (1.0: identical)."""
    pa = {(g, c) for g, cs in a.items() for c in cs}
    pb = {(g, c) for g, cs in b.items() for c in cs}
    return len(pa & pb) / len(pa | pb) if pa | pb else 1.0


def entries_left(entries: list[Entry], structures: int, pruned: np.ndarray | None = None) -> np.ndarray:
    """How many entries each of the ``structures`` structures keeps once the ``pruned`` ones go (all: None)."""
    left = np.bincount([e.structure for e in entries], minlength=structures)
    if pruned is not None:
        left = left - np.bincount([e.structure for e, p in zip(entries, pruned) if p], minlength=structures)
    return left


def widths(entries: list[Entry], structures: list[Structure], pruned: np.ndarray | None = None) -> list[Any]:
    """What each structure keeps once the ``pruned`` entries go: the count of its entries, or ``(heads, dims)``
    for a ``"heads+dims"`` structure — the index of its latency table either way."""
    gone = np.zeros(len(entries), dtype=bool) if pruned is None else np.asarray(pruned, dtype=bool)
    left = entries_left(entries, len(structures), gone)
    heads = np.bincount([e.structure for e, p in zip(entries, gone) if e.head and not p], minlength=len(structures))
    return [(int(heads[s]), int(left[s] - heads[s])) if st.heads else int(left[s]) for s, st in enumerate(structures)]


def removed_fraction(entries: list[Entry], pruned: np.ndarray, structures: list[Structure] | None = None) -> float:
    """The fraction of the entries' total cost that the ``pruned`` ones carry. A ``"heads+dims"`` structure
    (its entries overlap) counts what it keeps, ``h·j`` of ``H·D`` channels, at its dims' cost."""
    if structures is None or not any(st.heads for st in structures):
        total = sum(e.cost for e in entries)
        return sum(e.cost for e, p in zip(entries, pruned) if p) / total if total else 0.0
    dims = [(e.structure, e.cost, bool(p)) for e, p in zip(entries, pruned) if not e.head]
    where = np.array([d[0] for d in dims], dtype=np.int64)
    cost = np.array([d[1] for d in dims], dtype=np.float64)
    full = np.bincount(where, cost, minlength=len(structures))
    removed = np.bincount(where, cost * np.array([d[2] for d in dims]), minlength=len(structures))
    for s, (st, kept) in enumerate(zip(structures, widths(entries, structures, pruned))):
        if st.heads:
            h, j = kept
            removed[s] = full[s] * (1 - h * j / (st.heads * np.count_nonzero(where == s)))
    total = full.sum()
    return float(removed.sum() / total) if total else 0.0
