"""The one-shot magnitude baseline: rank entries by the mean |weight| of every parameter slice tied to them.

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.search.magnitude import Magnitude
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> result = upop_fx.pipeline.run(layer, torch.randn(2, 5, 16), Magnitude(), ratio=0.5, retrain_steps=0)
    >>> result.report.method, result.report.prunable_cost_removed >= 0.5
    ('magnitude', True)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..ir.entries import Entry
from ..ir.groups import GroupAnalysis
from ..passes.base import get_tensor
from ..training.loop import Batches, Objective
from .strategy import Prepared, Selection, allocation, checked

__all__ = ["Magnitude", "channel_magnitude", "magnitude_scores", "entry_means"]


class Magnitude:
    """One-shot selection: importance = mean |weight| of the entry's parameter slices, allocated by
    ``options.allocate``; reads no data."""

    name = "magnitude"
    trains = False

    def select(self, prepared: Prepared, batches: Batches, objective: Objective | None) -> Selection:
        scores = magnitude_scores(prepared.captured.gm, prepared.analysis, prepared.entries)
        fn = allocation(prepared.options)

        def allocate(fraction: float) -> np.ndarray:
            return checked(fn(scores, prepared.entries, prepared.structures, fraction), prepared.entries)

        return Selection(allocate(prepared.target), prepared.captured.gm, reselect=allocate)


def channel_magnitude(gm: torch.nn.Module, analysis: GroupAnalysis, gid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel of group ``gid``: the sum of |w| over its tied parameter slices, and their element count."""
    g = analysis.groups[gid]
    total = np.zeros(g.width)
    count = np.zeros(g.width)
    for name, axis, chan in g.producers + g.consumers:
        t = get_tensor(gm, name).detach().double().abs()  # on its device
        per_entry = (t.sum(dim=[d for d in range(t.dim()) if d != axis]) if t.dim() > 1 else t).cpu().numpy()
        n = t.numel() // t.shape[axis]
        hit = chan >= 0
        np.add.at(total, chan[hit], per_entry[hit])
        np.add.at(count, chan[hit], n)
    return total, count


def entry_means(entries: list[Entry], per_channel: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per entry: the sum over its channels of ``per_channel(gid)``'s totals over the sum of its counts (each
    group's channels are scored once)."""
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    scores = np.zeros(len(entries))
    for i, e in enumerate(entries):
        tot = cnt = 0.0
        for gid, ch in e.channels.items():
            if gid not in cache:
                cache[gid] = per_channel(gid)
            tot += cache[gid][0][ch].sum()
            cnt += cache[gid][1][ch].sum()
        scores[i] = tot / max(cnt, 1.0)
    return scores


def magnitude_scores(gm: torch.nn.Module, analysis: GroupAnalysis, entries: list[Entry]) -> np.ndarray:
    """Mean |w| per entry (higher = more important)."""
    return entry_means(entries, lambda gid: channel_magnitude(gm, analysis, gid))
