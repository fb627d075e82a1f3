"""Unified ranking under an exact cost budget (UPop's global selection, with costs read off the graph).

Scores are z-scored per structure kind (attention vs MLP), so different kinds compete on one scale; all entries
of all layers and towers are sorted together, least important first, and removed until the removed cost reaches
``ratio × total cost``. Each structure keeps at least one entry.

With ``per_cost=True`` the order is importance per unit of what a removal saves instead. An entry's importance
is its z-score shifted so that the least important of its kind is 0, scaled so that the kind's mean importance is
the kind's mean cost: an entry that saves what its kind saves on average is ranked by its importance relative to
its kind, and one that saves more (under a latency budget: what its structure's measured table saves from its
width at that step) moves ahead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..ir.entries import Entry, Structure, entries_left

__all__ = ["zscore_by_kind", "importance_by_kind", "select_pruned"]


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


def importance_by_kind(scores: np.ndarray, kinds: Sequence[str], costs: np.ndarray) -> np.ndarray:
    """Non-negative importance in the unit of cost: per kind, the z-score less the kind's minimum, scaled so
    that its mean is the kind's mean cost (0 for the least important entry of a kind; a constant kind: every
    entry its kind's mean cost). What a per-cost order divides by what a step saves."""
    z = zscore_by_kind(scores, kinds)
    kinds_arr = np.asarray(kinds)
    costs = np.asarray(costs, dtype=np.float64)
    out = np.zeros_like(z)
    for k in np.unique(kinds_arr):
        m = kinds_arr == k
        shifted = z[m] - z[m].min()
        mean = shifted.mean()
        out[m] = costs[m].mean() * (shifted / mean if mean > 0 else 1.0)
    return out


def select_pruned(
    scores: np.ndarray,
    entries: Sequence[Entry],
    structures: Sequence[Structure],
    ratio: float,
    round_to: int = 1,
    per_cost: bool = False,
) -> np.ndarray:
    """Boolean mask over entries: True = prune. Higher score = more important.

    Removes the lowest z-scored entries until their cost reaches ``ratio`` of the total (overshooting by less
    than one entry, or one chunk with ``round_to``), never the last entry of a structure. With ``round_to=N``
    every structure keeps a multiple of N entries (or all of them when it has fewer than N); a structure whose
    ``multiple`` is larger (stacked experts) keeps a multiple of that. ``per_cost``: the lowest importance per
    unit of cost saved first (see the module docstring).
    """
    if round_to > 1 or any(s.multiple > 1 or s.latency is not None or s.heads for s in structures):
        return _select_rounded(scores, entries, structures, ratio, round_to, per_cost)
    kinds = [e.kind for e in entries]
    costs = np.array([e.cost for e in entries])
    if per_cost:
        with np.errstate(divide="ignore", invalid="ignore"):
            importance = importance_by_kind(scores, kinds, costs)
            order_key = np.where(costs > 0, importance / np.where(costs > 0, costs, 1), np.inf)
    else:
        order_key = zscore_by_kind(scores, kinds)
    target = ratio * costs.sum()
    left = entries_left(list(entries), len(structures))
    pruned = np.zeros(len(entries), dtype=bool)
    removed = 0.0
    for i in np.argsort(order_key, kind="stable"):
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
    the less important of its next head (z-scored among heads) and its next chunk of head dims.

    ``importance`` given (a per-cost order): a step's priority is its importance over what it saves; a chunk that
    saves nothing on its own (a flat stretch of a measured table) is offered together with the chunks after it,
    up to the first that saves something."""

    def __init__(self, z: np.ndarray, members: np.ndarray, heads: np.ndarray, n: int, table: np.ndarray | None,
                 costs: np.ndarray, importance: np.ndarray | None = None) -> None:  # fmt: skip
        self.z, self.table, self.costs, self.importance = z, table, costs, importance
        self.chunks = _chunks(members[np.argsort(z[members], kind="stable")], n)
        self.heads = list(heads[np.argsort(z[heads], kind="stable")])
        self.n_heads, self.n_dims = len(heads), len(members)
        self.h, self.j = len(heads), len(members)  # kept (a plain structure: h stays 0)
        self.next_chunk = 0

    def offer(self) -> tuple[float, np.ndarray] | None:
        """The next step's priority and entries (None: nothing more can go)."""
        head = self.heads[self.n_heads - self.h] if self.h > 1 else None
        options = []
        if self.next_chunk < len(self.chunks):
            if self.importance is None:
                chunk = self.chunks[self.next_chunk]
                options.append((float(self.z[chunk].mean()), chunk))
            else:
                options.append(self._bundle())
        if head is not None:
            step = np.array([head])
            key = float(self.z[head]) if self.importance is None else _ratio(self.importance[head], self._saves(step))
            options.append((key, step))
        return min(options, key=lambda o: o[0]) if options else None

    def _bundle(self) -> tuple[float, np.ndarray]:
        """The next chunks up to the first that saves something, with their importance per unit saved."""
        taken: list[np.ndarray] = []
        saved = 0.0
        for chunk in self.chunks[self.next_chunk:]:
            taken.append(chunk)
            saved = self._saves(np.concatenate(taken))
            if saved > 0:
                break
        step = np.concatenate(taken)
        return _ratio(float(self.importance[step].sum()), saved), step

    def _is_head(self, step: np.ndarray) -> bool:
        return bool(self.n_heads) and len(step) == 1 and step[0] in self.heads

    def _after(self, step: np.ndarray) -> tuple[int, int]:
        """The heads and dims kept once ``step`` goes."""
        return (self.h - 1, self.j) if self._is_head(step) else (self.h, self.j - len(step))

    def _saves(self, step: np.ndarray) -> float:
        """What removing ``step`` now would save (the structure's table, else the entries' cost)."""
        return self._saved(self.h, self.j, *self._after(step), step)

    def _saved(self, h: int, j: int, nh: int, nj: int, step: np.ndarray) -> float:
        if self.table is not None:
            at = (lambda a, b: self.table[a, b]) if self.n_heads else (lambda a, b: self.table[b])
            return float(at(nh, nj) - at(h, j))
        if not self.n_heads:
            return float(self.costs[step].sum())
        # overlapping entries: a head's cost spans every dim, a dim's every head; count what is still kept
        return float(self.costs[step].sum() * (nj / self.n_dims if nh < h else nh / self.n_heads))

    def take(self, step: np.ndarray) -> float:
        """Remove ``step`` (a head, or one or more chunks in order); what it saves (the table's fraction of the
        dense latency, else its cost)."""
        h, j = self.h, self.j
        if not self._is_head(step):
            left = len(step)
            while left > 0:
                left -= len(self.chunks[self.next_chunk])
                self.next_chunk += 1
        self.h, self.j = self._after(step)
        return self._saved(h, j, self.h, self.j, step)


def _ratio(importance: float, saved: float) -> float:
    """A step's priority in a per-cost order: importance per unit saved (a step that saves nothing: last)."""
    return importance / saved if saved > 0 else float("inf")


def _select_rounded(
    scores: np.ndarray, entries: Sequence[Entry], structures: Sequence[Structure], ratio: float, n_all: int,
    per_cost: bool = False,
) -> np.ndarray:
    """The same walk over *chunks*: per structure, its entries in ascending z-order cut so that what is left is
    always a multiple of ``n`` (or of the structure's own ``multiple`` where larger); chunks are taken in order
    of their mean z-score, each after its predecessor. Where the structures carry latency tables
    (``budget="latency"``), what a chunk removes is what its structure's table saves between its widths before
    and after, and the walk stops once the saved fraction of the dense latency reaches ``ratio``. A
    ``"heads+dims"`` structure offers its next head or its next chunk of dims, whichever ranks lower. ``per_cost``:
    steps are taken in order of importance per unit saved."""
    import heapq

    kinds = [e.kind for e in entries]
    z = zscore_by_kind(scores, kinds)
    costs = np.array([e.cost for e in entries])
    importance = importance_by_kind(scores, kinds, costs) if per_cost else None
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
              st.latency if timed else None, costs, importance)
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
