"""The latency model: measured tables → the predicted latency of a cut. Pure: nothing here times anything
(the tables are measured by :mod:`upop_fx.runtime.latency_tables`).

A :class:`LatencyModel` holds the measured latency of the dense model and, per ranking structure, the
milliseconds it saves at each width. Removals in different structures are taken to add up, bent at the deep end
by one more measurement, the *floor* cut (every structure at its narrowest at once). :func:`priced` turns it
into the units a ranking walks: each structure's table and each entry's cost as fractions of the dense latency.

Example:
    >>> import numpy as np
    >>> model = LatencyModel("torch-cpu", (8, None), 10.0, [np.array([4.0, 2.0, 0.0])])
    >>> model.predict([1])      # one of two entries kept: 2 ms of 10 saved
    8.0
    >>> model.most_saved()     # every structure at its narrowest: one entry kept
    0.2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .entries import Entry, Structure, widths

__all__ = ["LatencyModel", "priced"]


@dataclass
class LatencyModel:
    """Measured latency of the dense model and, per structure, the milliseconds it saves at each width.

    ``saved[s][k]`` is what structure ``s`` saves with ``k`` of its entries kept (``saved[s][n] = 0``). Summed,
    the tables overstate deep cuts (what thinner attention and thinner MLPs save overlaps: the same norms, adds
    and copies get cheaper once): the *floor* cut, every structure at its narrowest at once, is timed too, and a
    summed saving ``x`` (a fraction of the dense latency) is predicted to save
    ``x − overlap · (x / reach)²`` — the sum where it is small, what the floor measured (``reach − overlap``) at
    the deepest cut, monotone between (``overlap`` is held to ``[−reach/2, reach/2]``)."""

    runtime: str
    shape: tuple[int, int | None]
    dense_ms: float
    saved: list[np.ndarray]
    measured: list[str] = field(default_factory=list)  #: the classes measured now (the others came from the cache)
    seconds: float = 0.0  #: the time taken to measure (dense model, tables and the floor cut)
    reach: float = 0.0  #: the summed saving of every structure at its narrowest (a fraction of the dense latency)
    overlap: float = 0.0  #: ``reach`` less what the floor cut measured

    def together(self, summed: float) -> float:
        """What structures whose tables add up to ``summed`` save cut together (fractions of the dense latency)."""
        if self.reach <= 0:
            return summed
        return summed - self.overlap * (min(summed, self.reach) / self.reach) ** 2

    def needed(self, fraction: float) -> float:
        """The summed table saving that :meth:`together` maps to ``fraction``: what an allocation walks to."""
        d, a = self.overlap, self.reach
        if a <= 0 or abs(d) < 1e-12:
            return fraction
        disc = max(0.0, 1 - 4 * d * fraction / a**2)
        return float(a**2 * (1 - np.sqrt(disc)) / (2 * d))

    def predict(self, kept: Sequence[Any]) -> float:
        """Predicted milliseconds with ``kept[s]`` entries kept in structure ``s`` (``(heads, dims)`` for a
        ``"heads+dims"`` structure: :func:`~upop_fx.ir.entries.widths`)."""
        summed = float(sum(t[k] for t, k in zip(self.saved, kept))) / self.dense_ms
        return self.dense_ms * (1 - self.together(summed))

    def fractions(self) -> list[np.ndarray]:
        """``saved`` as fractions of the dense latency: what the ranking's walk adds up."""
        return [t / self.dense_ms for t in self.saved]

    def most_saved(self) -> float:
        """The largest fraction of the dense latency pruning can save: every structure at its narrowest (what
        the floor cut measured)."""
        if self.reach > 0:
            return self.together(self.reach)
        return sum(float(t[(1,) * t.ndim]) for t in self.saved) / self.dense_ms


def priced(latency: LatencyModel, structures: Sequence[Structure], entries: Sequence[Entry]
           ) -> tuple[list[Structure], list[Entry]]:
    """New structures and entries priced by ``latency``: every structure carries its table (fractions of the
    dense latency), every entry the mean fraction its structure saves per entry (what the search's cost
    weighting reads). The inputs are left as they were."""
    full = widths(list(entries), list(structures))
    tables = latency.fractions()
    out_structures = [dataclasses.replace(st, latency=t) for st, t in zip(structures, tables)]
    out_entries = []
    for e in entries:
        table, n = tables[e.structure], full[e.structure]
        if structures[e.structure].heads:  # a head: the mean of all but one head going (all dims kept); a dim
            h, j = n                       # the same over dims
            per = table[1, j] / (h - 1) if e.head else table[h, 1] / (j - 1)
            cost = float(per) if min(h, j) > 1 else 0.0
        else:
            cost = float(table[1] / (n - 1)) if n > 1 else 0.0
        out_entries.append(dataclasses.replace(e, cost=cost))
    return out_structures, out_entries
