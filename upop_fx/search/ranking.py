"""Unified ranking under an exact cost budget (UPop's global selection, with costs read off the graph).

Scores are z-scored per structure kind (attention vs MLP), so different kinds compete on one scale; all entries
of all layers and towers are sorted together, least important first, and removed until the removed cost reaches
``ratio × total cost``. Each structure keeps at least one entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .structures import Entry, Structure

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


def select_pruned(scores: np.ndarray, entries: Sequence[Entry], structures: Sequence[Structure], ratio: float) -> np.ndarray:
    """Boolean mask over entries: True = prune. Higher score = more important.

    Removes the lowest z-scored entries until their cost reaches ``ratio`` of the total (overshooting by less
    than one entry), never the last entry of a structure.
    """
    z = zscore_by_kind(scores, [e.kind for e in entries])
    costs = np.array([e.cost for e in entries])
    target = ratio * costs.sum()
    left = np.bincount([e.structure for e in entries], minlength=len(structures))
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
