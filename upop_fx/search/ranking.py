"""Unified ranking under an exact cost budget (UPop's global selection, with costs read off the graph).

Scores are z-scored per structure kind (attention vs MLP), so different kinds compete on one scale; all entries
of all layers and towers are sorted together, least important first, and removed until the removed cost reaches
``ratio × total cost``. Each structure keeps at least one entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..structures import Entry, Structure, entries_left

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
    if round_to > 1 or any(s.multiple > 1 or s.latency is not None for s in structures):
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


def _select_rounded(
    scores: np.ndarray, entries: Sequence[Entry], structures: Sequence[Structure], ratio: float, n_all: int
) -> np.ndarray:
    """The same walk over *chunks*: per structure, its entries in ascending z-order cut so that what is left is
    always a multiple of ``n`` (or of the structure's own ``multiple`` where larger); chunks are taken in order
    of their mean z-score, each after its predecessor. Where the structures carry latency tables
    (``budget="latency"``), what a chunk removes is what its structure's table saves between its widths before
    and after, and the walk stops once the saved fraction of the dense latency reaches ``ratio``."""
    import heapq

    z = zscore_by_kind(scores, [e.kind for e in entries])
    costs = np.array([e.cost for e in entries])
    tables = [s.latency for s in structures]
    timed = all(t is not None for t in tables)
    target = ratio if timed else ratio * costs.sum()
    chunks: list[list[np.ndarray]] = []
    by_structure: list[list[int]] = [[] for _ in structures]
    for i, e in enumerate(entries):
        by_structure[e.structure].append(i)
    for s, members in enumerate(by_structure):
        n = max(n_all, structures[s].multiple)
        idx = np.array(members, dtype=np.int64)
        idx = idx[np.argsort(z[idx], kind="stable")]
        if len(idx) <= n:
            chunks.append([])
            continue
        first = len(idx) % n
        cuts = ([first] if first else []) + list(range(first + n if first else n, len(idx), n))
        bounds = [0, *cuts]
        chunks.append([idx[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a and len(idx) - b >= 1])
    heap = [(float(z[c[0]].mean()), s, 0) for s, c in enumerate(chunks) if c]
    heapq.heapify(heap)
    pruned = np.zeros(len(entries), dtype=bool)
    kept = [len(m) for m in by_structure]
    removed = 0.0
    while heap and removed < target:
        _, s, k = heapq.heappop(heap)
        chunk = chunks[s][k]
        pruned[chunk] = True
        if timed:
            removed += float(tables[s][kept[s] - len(chunk)] - tables[s][kept[s]])
            kept[s] -= len(chunk)
        else:
            removed += costs[chunk].sum()
        if k + 1 < len(chunks[s]):
            heapq.heappush(heap, (float(z[chunks[s][k + 1]].mean()), s, k + 1))
    return pruned
