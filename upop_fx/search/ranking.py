"""Unified ranking under an exact cost budget (UPop's global selection, with costs read off the graph).

Scores are z-scored per structure kind (attention vs MLP), so different kinds compete on one scale; all entries
of all layers and towers are sorted together, least important first, and removed until the removed cost reaches
``ratio × total cost``. Each structure keeps at least one entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..ir.entries import Entry, Structure, entries_left

__all__ = ["zscore_by_kind", "select_pruned"]


def zscore_by_kind(scores: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
    """Standardise ``scores`` within each kind (a constant kind maps to 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    kinds_arr = np.asarray(kinds)
    out = np.zeros_like(scores)
    for k in np.unique(kinds_arr):
        m = kinds_arr == k
        s = scores[m]
        std = s.std()
        out[m] = (s - s.mean()) / std if std > 0 else 0.0
    return out


def select_pruned(
    scores: np.ndarray,
    entries: Sequence[Entry],
    structures: Sequence[Structure],
    ratio: float,
    round_to: int = 1,
) -> np.ndarray:
    """Boolean mask over entries: True = prune. Higher score = more important.

    Removes the lowest z-scored entries until their cost reaches ``ratio`` of the total (overshooting by less
    than one entry, or one chunk with ``round_to``), never the last entry of a structure. With ``round_to=N``
    every structure keeps a multiple of N entries (or all of them when it has fewer than N); a structure whose
    ``multiple`` is larger (stacked experts) keeps a multiple of that.
    """
    if round_to > 1 or any(s.multiple > 1 or s.latency is not None or s.heads for s in structures):
        return _select_rounded(scores, entries, structures, ratio, round_to)
    z = zscore_by_kind(scores, [e.kind for e in entries])
    costs = np.array([e.cost for e in entries])
    target = ratio * costs.sum()
    left = entries_left(list(entries), len(structures))
    pruned = np.zeros(len(entries), dtype=bool)
    removed = 0.0
    for i in np.argsort(z, kind="stable"):
        if removed >= target:
            break
        s = entries[i].structure
        if left[s] <= 1:
            continue
        pruned[i] = True
        left[s] -= 1
        removed += costs[i]
    return pruned


def _chunks(order: np.ndarray, n: int) -> list[np.ndarray]:
    """``order`` (one structure's entries, least important first) cut into chunks so that what is left after
    each is a multiple of ``n``; at least one entry always stays."""
    if len(order) <= n:
        return []
    first = len(order) % n
    cuts = ([first] if first else []) + list(range(first + n if first else n, len(order), n))
    bounds = [0, *cuts]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a and len(order) - b >= 1]


class _Walk:
    """One structure's steps in the walk: its chunks in order, or — a ``"heads+dims"`` structure — at each step
    the less important of its next head (z-scored among heads) and its next chunk of head dims."""

    def __init__(self, z: np.ndarray, members: np.ndarray, heads: np.ndarray, n: int, table: np.ndarray | None,
                 costs: np.ndarray) -> None:  # fmt: skip
        self.z, self.table, self.costs = z, table, costs
        self.chunks = _chunks(members[np.argsort(z[members], kind="stable")], n)
        self.heads = list(heads[np.argsort(z[heads], kind="stable")])
        self.n_heads, self.n_dims = len(heads), len(members)
        self.h, self.j = len(heads), len(members)  # kept (a plain structure: h stays 0)
        self.next_chunk = 0

    def offer(self) -> tuple[float, np.ndarray] | None:
        """The next step's priority and entries (None: nothing more can go)."""
        chunk = self.chunks[self.next_chunk] if self.next_chunk < len(self.chunks) else None
        head = self.heads[self.n_heads - self.h] if self.h > 1 else None
        options = []
        if chunk is not None:
            options.append((float(self.z[chunk].mean()), chunk))
        if head is not None:
            options.append((float(self.z[head]), np.array([head])))
        return min(options, key=lambda o: o[0]) if options else None

    def take(self, step: np.ndarray) -> float:
        """Remove ``step``; what it saves (the table's fraction of the dense latency, else its cost)."""
        h, j = self.h, self.j
        if self.n_heads and len(step) == 1 and step[0] in self.heads:
            self.h -= 1
        else:
            self.j -= len(step)
            self.next_chunk += 1
        if self.table is not None:
            at = (lambda a, b: self.table[a, b]) if self.n_heads else (lambda a, b: self.table[b])
            return float(at(self.h, self.j) - at(h, j))
        if not self.n_heads:
            return float(self.costs[step].sum())
        # overlapping entries: a head's cost spans every dim, a dim's every head; count what is still kept
        return float(self.costs[step].sum() * (self.j / self.n_dims if self.h < h else self.h / self.n_heads))


def _select_rounded(
    scores: np.ndarray, entries: Sequence[Entry], structures: Sequence[Structure], ratio: float, n_all: int
) -> np.ndarray:
    """The same walk over *chunks*: per structure, its entries in ascending z-order cut so that what is left is
    always a multiple of ``n`` (or of the structure's own ``multiple`` where larger); chunks are taken in order
    of their mean z-score, each after its predecessor. Where the structures carry latency tables
    (``budget="latency"``), what a chunk removes is what its structure's table saves between its widths before
    and after, and the walk stops once the saved fraction of the dense latency reaches ``ratio``. A
    ``"heads+dims"`` structure offers its next head or its next chunk of dims, whichever ranks lower."""
    import heapq

    z = zscore_by_kind(scores, [e.kind for e in entries])
    costs = np.array([e.cost for e in entries])
    timed = all(s.latency is not None for s in structures)
    members: list[list[int]] = [[] for _ in structures]
    heads: list[list[int]] = [[] for _ in structures]
    for i, e in enumerate(entries):
        (heads if e.head else members)[e.structure].append(i)
    if timed:
        target = ratio
    else:  # a heads+dims structure costs what its dims cost (its heads cover the same channels)
        target = ratio * sum(costs[m].sum() for m in members)
    walks = [
        _Walk(z, np.array(m, dtype=np.int64), np.array(h, dtype=np.int64), max(n_all, st.multiple),
              st.latency if timed else None, costs)
        for m, h, st in zip(members, heads, structures)
    ]  # fmt: skip
    heap = [(o[0], s, o[1]) for s, w in enumerate(walks) if (o := w.offer()) is not None]
    heapq.heapify(heap)
    pruned = np.zeros(len(entries), dtype=bool)
    removed = 0.0
    while heap and removed < target:
        _, s, step = heapq.heappop(heap)
        pruned[step] = True
        removed += walks[s].take(step)
        if (o := walks[s].offer()) is not None:
            heapq.heappush(heap, (o[0], s, o[1]))
    return pruned
