"""Selection strategies: the one step of the pipeline that differs between methods.

The pipeline (``upop_fx.pipeline``) captures the model, finds its groups and lists the entries a ranking can
remove (:class:`Prepared`); a :class:`Strategy` decides which entries go (:class:`Selection`); the pipeline
then cuts them out, checks the cut and writes the report. A strategy never captures, cuts or reports.

Two strategies ship: :class:`~upop_fx.search.upop.UPopSearch` (the unified progressive search) and
:class:`~upop_fx.search.magnitude.Magnitude` (one-shot mean |weight|). Both rank entries by an importance and
hand it to an :data:`Allocate` function, which decides how much each structure loses: :func:`unified` (UPop's
one ranking over every layer and tower, the default) or :func:`uniform` (the same fraction in every
structure), or your own.

Example (a strategy of your own: keep the first entries of every structure):
    >>> import numpy as np, torch, upop_fx
    >>> from upop_fx.search.strategy import Selection, uniform
    >>> class KeepFirst:
    ...     name = "keep_first"
    ...     def select(self, prepared, batches, objective):
    ...         importance = -np.arange(len(prepared.entries), dtype=float)
    ...         pruned = uniform(importance, prepared.entries, prepared.structures, prepared.target)
    ...         return Selection(pruned, prepared.captured.gm)
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> result = upop_fx.pipeline.run(layer, torch.randn(2, 5, 16), KeepFirst(), ratio=0.5, retrain_steps=0)
    >>> mlp = next(g.id for g in result.analysis.prunable if g.kind == "mlp")
    >>> result.report.method, result.keep[mlp][:3]
    ('keep_first', [0, 1, 2])
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..capture.program import Captured
from ..errors import ConfigError
from ..ir.entries import Entry, Structure, widths
from ..ir.groups import GroupAnalysis
from ..ir.latency_model import LatencyModel
from ..options import ALLOCATIONS, Options
from ..training.loop import Batches, Objective, Training
from .ranking import select_pruned

__all__ = ["Prepared", "Selection", "Strategy", "Allocate", "unified", "per_cost", "uniform", "ALLOCATORS", "allocation", "checked"]

#: ``allocate(importance, entries, structures, fraction) -> prune mask``: ``importance`` is higher for entries
#: that matter more; the mask is True for the entries to remove so that ``fraction`` of the cost goes.
Allocate = Callable[[np.ndarray, Sequence[Entry], Sequence[Structure], float], np.ndarray]


@dataclass
class Prepared:
    """What every strategy starts from: the captured graph, its groups, the entries a ranking removes (built
    once, shared by every later stage) and the run's :class:`~upop_fx.options.Options`."""

    captured: Captured
    analysis: GroupAnalysis
    structures: list[Structure]
    entries: list[Entry]
    options: Options
    training: Training | None = None  #: precision and checkpoints of the run's training phases
    source: torch.nn.Module | None = None  #: the caller's model (never modified): what ``Result.module`` copies
    latency: LatencyModel | None = None  #: ``budget="latency"``: the measured latency model
    #: model inputs of the calibration batches, for a strategy that reads them (``reads_calibration = True``)
    calibration: list[Any] | None = None
    #: ``own_class``: per restricted group, what the model's class could not follow and what was done instead
    class_limits: list[str] = field(default_factory=list)
    #: wall-clock seconds of each phase so far (capture, groups, latency tables, ...): ``report.seconds``
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def granularity(self) -> str:
        """The run's granularity, resolved (:attr:`Options.resolved_granularity`)."""
        return self.options.resolved_granularity

    @property
    def target(self) -> float:
        """The fraction of the summed cost an allocation walks to: ``options.ratio``; under a latency budget the
        summed table saving the latency model predicts removes ``ratio`` of the dense latency
        (:meth:`~upop_fx.ir.latency_model.LatencyModel.needed`: the tables overstate deep cuts summed)."""
        ratio = self.options.ratio
        return ratio if self.latency is None else self.latency.needed(ratio)


@dataclass
class Selection:
    """What a strategy decides: the entries to remove (a mask over ``Prepared.entries``) and the graph to cut
    them from (weights as the strategy left them). ``final``, when set, is a model the cut must reproduce
    exactly on the example inputs (UPop's last masked graph)."""

    pruned: np.ndarray
    dense: torch.fx.GraphModule
    final: torch.nn.Module | None = None
    losses: list[float] = field(default_factory=list)
    #: the same ranking allocated at another fraction (what a latency budget re-selects with when the cut
    #: measures short of the asked speedup); None: the strategy cannot re-select
    reselect: Callable[[float], np.ndarray] | None = None


class Strategy(Protocol):
    """One small interface: ``select(prepared, batches, objective) -> Selection``; ``name`` labels the report.
    A strategy reads its settings from ``prepared.options``; one that trains (reads ``options.search_steps``
    batches) says so with a ``trains = True`` attribute, so that the pipeline checks the data holds them."""

    name: str

    def select(self, prepared: Prepared, batches: Batches, objective: Objective | None) -> Selection: ...


def unified(
    importance: np.ndarray, entries: Sequence[Entry], structures: Sequence[Structure], fraction: float,
    round_to: int = 1,
) -> np.ndarray:  # fmt: skip
    """UPop's unified allocation: one ranking of every entry of every layer and tower (z-scored per kind),
    removed in order until ``fraction`` of the total cost is gone; every structure keeps an entry."""
    return select_pruned(importance, entries, structures, fraction, round_to)


def per_cost(
    importance: np.ndarray, entries: Sequence[Entry], structures: Sequence[Structure], fraction: float,
    round_to: int = 1,
) -> np.ndarray:  # fmt: skip
    """The unified ranking ordered by importance per unit of cost saved: each entry's importance (its z-score
    made non-negative, scaled to its kind's mean cost) over what removing it saves — under a latency budget what
    its structure's measured table saves at that width, so an entry that saves more time than its kind's average
    goes earlier; under another budget its parameters or FLOPs."""
    return select_pruned(importance, entries, structures, fraction, round_to, per_cost=True)


def uniform(
    importance: np.ndarray, entries: Sequence[Entry], structures: Sequence[Structure], fraction: float
) -> np.ndarray:
    """The same ``fraction`` of the entries of every structure (rounded to the nearest entry, at least one
    kept; a multiple of the structure's ``multiple``), the least important first. Entries of one structure cost
    the same at every granularity (one head dim across heads, one head, one neuron), so this is the same
    fraction of every structure's cost. With latency tables (``budget="latency"``) the common fraction of
    entries is the smallest whose measured saving reaches ``fraction`` of the dense latency. A
    ``"heads+dims"`` structure keeps its heads and loses that fraction of its head dims."""
    if not structures or any(s.latency is None for s in structures):
        return _uniform_entries(importance, entries, structures, fraction)
    def saved(q: float) -> tuple[float, np.ndarray]:
        pruned = _uniform_entries(importance, entries, structures, q)
        kept = widths(list(entries), list(structures), pruned)
        return float(sum(s.latency[k] for s, k in zip(structures, kept))), pruned

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if saved(mid)[0] >= fraction:
            hi = mid
        else:
            lo = mid
    return saved(hi)[1]


def _uniform_entries(
    importance: np.ndarray, entries: Sequence[Entry], structures: Sequence[Structure], fraction: float
) -> np.ndarray:
    """:func:`uniform` by the entries' count."""
    by_structure: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(entries):
        if not e.head:  # a heads+dims structure: its dims alone
            by_structure[e.structure].append(i)
    pruned = np.zeros(len(entries), dtype=bool)
    for idx in by_structure.values():
        idx_arr = np.asarray(idx)
        costs = np.array([entries[i].cost for i in idx_arr])
        if not np.allclose(costs, costs[0]):
            raise ConfigError("uniform allocation needs the entries of a structure to cost the same")
        k = min(len(idx_arr) - 1, int(math.floor(fraction * len(idx_arr) + 0.5)))
        m = structures[entries[idx_arr[0]].structure].multiple
        if m > 1 and k > 0:  # keep a multiple of it: the nearest to the fraction, at least one multiple
            n = len(idx_arr)
            kept = min(m * (n // m), max(m, m * int(math.floor((n - k) / m + 0.5))))
            k = max(0, n - kept)
        order = idx_arr[np.argsort(importance[idx_arr], kind="stable")]
        pruned[order[:k]] = True
    return pruned


#: the functions of the allocations selectable by name (:data:`~upop_fx.options.ALLOCATIONS`)
ALLOCATORS: dict[str, Allocate] = {"unified": unified, "uniform": uniform, "per_cost": per_cost}
assert tuple(ALLOCATORS) == ALLOCATIONS


def allocation(options: Options) -> Allocate:
    """The allocation ``options.allocate`` names (None: :func:`unified`; it and :func:`per_cost` at
    ``options.round_to``), or the callable itself."""
    allocate = "unified" if options.allocate is None else options.allocate
    if allocate in ("unified", "per_cost"):  # the unified walks, at options.round_to
        walk = ALLOCATORS[allocate]
        return lambda imp, ent, st, f: walk(imp, ent, st, f, options.round_to)  # type: ignore[call-arg]
    return ALLOCATORS[allocate] if isinstance(allocate, str) else allocate


def checked(mask: Any, entries: Sequence[Entry]) -> np.ndarray:
    """An allocation's answer as a boolean mask over ``entries``; ConfigError when it has the wrong shape."""
    out = np.asarray(mask, dtype=bool)
    if out.shape != (len(entries),):
        raise ConfigError(f"allocate returned shape {out.shape}, expected ({len(entries)},)")
    return out
