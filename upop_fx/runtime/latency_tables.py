"""A latency model of one model on one runtime, measured from the model's own layers, for ``budget="latency"``.

What does not shrink with the FLOPs (softmax and the T×T score work, LayerNorm, activations, residual adds,
embeddings, launch overheads) makes a FLOP budget a poor proxy for time. So the cost of removing entries is
measured, not counted: structures of one shape in one tower (the attention layers of a text tower, say) form a
*class*; for each class the dense graph is cut at a few widths of that class only (every structure of the class
keeps ``k`` entries, the rest of the model stays whole), each cut is built for the runtime (for ONNX Runtime
exported as it is deployed — dynamic axes, as ``export_onnx`` writes it; the graph itself for PyTorch), and all
of them run interleaved with the dense model on inputs of the latency shape.
``(dense − cut) / dense / structures in the class`` is the share of the time one structure saves at width ``k``
(a share of the dense time measured in the same interleaved run: the load may drift from one class to the next);
between the measured widths it is interpolated linearly, and made monotone (fewer entries never cost more).
With ``granularity="heads+dims"`` a class of attention layers is also cut to a few head counts (every dim kept),
and its table is two-dimensional: ``h`` heads of ``j`` dims save what ``h·j`` channels save as head dims plus
what removing those heads saves beyond their channels (the softmax and score work), exact on both measured axes.
Removals in different classes are taken to add up, bent at the deep end by one more measurement: the *floor* cut,
every structure at its narrowest at once (:class:`LatencyModel`: what the tables sum to there, less what the floor
measured, is taken off in proportion to the square of the summed saving). The prediction for a selection is the
measured dense time minus that, and the report sets a measured speedup beside it.

Tables are cached on disk (``$UPOP_FX_CACHE`` or ``~/.cache/upop_fx``, ``latency/``) per machine, runtime,
library versions, class shape, batch and sequence length (the floor cut per graph): a second ``compress`` of the
same model measures nothing but the dense model.

Example:
    >>> import os
    >>> from upop_fx.runtime.latency_tables import cache_dir
    >>> os.environ["UPOP_FX_CACHE"] = "/tmp/upop-cache"
    >>> str(cache_dir())
    '/tmp/upop-cache/latency'
    >>> del os.environ["UPOP_FX_CACHE"]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from ..capture.program import CaptureInfo
from ..ir.entries import Entry, Structure, entries_left
from ..ir.groups import GroupAnalysis
from ..ir.latency_model import LatencyModel
from ..logs import progress_bar
from ..options import cache_root, check_runtime
from ..passes.base import graph_fingerprint
from ..passes.surgery import cut_entries
from . import timing
from .runners import deployed_inputs, latency_inputs, runner, timed_rounds

__all__ = ["GRID", "HEAD_GRID", "measure_latency", "cache_dir"]

log = logging.getLogger(__name__)

#: the widths measured per class, as fractions of its entries (the full width is the dense model); the narrowest
#: point measures the tail: below an eighth, what a cut saves keeps growing faster than the 1/4 → 1/8 slope says
GRID = (0.75, 0.5, 0.25, 0.125, 0.03125)
#: the head counts measured per ``"heads+dims"`` class (all dims kept), as fractions of its heads
HEAD_GRID = (0.5, 0.25, 0.125)


def cache_dir() -> Path:
    """Where latency tables are kept: ``$UPOP_FX_CACHE/latency`` or ``~/.cache/upop_fx/latency``."""
    return Path(cache_root()) / "latency"


def _machine() -> dict[str, Any]:
    return {
        "node": platform.node(), "processor": timing.cpu_name(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }  # fmt: skip


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _classes(analysis: GroupAnalysis, structures: Sequence[Structure], entries: Sequence[Entry]) -> dict[str, list[int]]:
    """Structures of the same shape in the same tower: ``signature -> structure indices``."""
    counts = entries_left(list(entries), len(structures))
    out: dict[str, list[int]] = {}
    for s, st in enumerate(structures):
        groups = [analysis.groups[g] for g in st.groups]
        sig = json.dumps([st.kind, int(counts[s]), st.multiple, *([st.heads] if st.heads else []), [
            (g.kind, g.tower, g.width, g.heads, g.head_dim, g.cross, g.experts, round(float(g.cost_flops.sum())),
             len(g.producers), len(g.consumers), *(["whole heads"] if g.whole_heads else []))
            for g in groups
        ]])  # fmt: skip
        out.setdefault(sig, []).append(s)
    return out


def _grid(n: int, multiple: int, fractions: Sequence[float] | None = None) -> list[int]:
    """The widths below ``n`` measured for a class: ``fractions`` (default :data:`GRID`) of ``n``, rounded to
    ``multiple``."""
    ks = set()
    for f in GRID if fractions is None else fractions:
        k = max(1, int(round(f * n)))
        if multiple > 1:
            k = max(multiple, multiple * round(k / multiple)) if n > multiple else n
        if k < n:
            ks.add(k)
    return sorted(ks, reverse=True)


def _interpolate(n: int, points: dict[int, float]) -> np.ndarray:
    """Saved milliseconds at every width ``0..n`` from the measured ``{k: saved}`` (``saved(n) = 0``): linear
    between points, extrapolated from the last segment below the narrowest, non-increasing in ``k``."""
    ks = sorted({n, *points})
    ys = [0.0 if k == n else points[k] for k in ks]
    grid = np.arange(n + 1, dtype=np.float64)
    out = np.interp(grid, ks, ys)
    if len(ks) >= 2 and ks[0] > 0:  # below the narrowest measured width: the first segment's slope
        slope = (ys[1] - ys[0]) / (ks[1] - ks[0])
        low = grid < ks[0]
        out[low] = ys[0] + slope * (grid[low] - ks[0])
    out = np.maximum.accumulate(out[::-1])[::-1]  # saved(k) >= saved(k') for k < k'
    return np.maximum(out, 0.0)


def _heads_table(n_heads: int, dims: np.ndarray, heads: dict[int, float]) -> np.ndarray:
    """A ``"heads+dims"`` class's saving at ``[h, j]`` (``h`` heads of ``j`` dims kept) from its dims table
    (all heads kept, ``dims[j]``) and its measured head counts (all dims kept): what the kept channels ``h·j``
    save as dims, plus what removing the heads saves beyond their channels (the softmax and score work) —
    exact on both measured axes."""
    n_dims = len(dims) - 1
    by_heads = _interpolate(n_heads, heads)
    h = np.arange(n_heads + 1, dtype=np.float64)[:, None]
    j = np.arange(n_dims + 1, dtype=np.float64)[None, :]
    as_dims = np.interp(h * j / n_heads, np.arange(n_dims + 1), dims)
    beyond = by_heads[:, None] - np.interp(h * n_dims / n_heads, np.arange(n_dims + 1), dims)
    out = np.maximum(as_dims + beyond, 0.0)
    out = np.maximum.accumulate(out[::-1], axis=0)[::-1]  # fewer heads or dims never save less
    return np.maximum.accumulate(out[:, ::-1], axis=1)[:, ::-1]


def _cut_to_widths(dense: torch.fx.GraphModule, analysis: GroupAnalysis, entries: Sequence[Entry], members: dict[int, list[int]],
         widths: dict[int, Any], structures: Sequence[Structure]) -> torch.fx.GraphModule:  # fmt: skip
    """``dense`` with structure ``s`` cut to its first ``widths[s]`` entries (the others whole); a
    ``"heads+dims"`` structure to its first ``(h, j)`` heads and dims."""
    pruned = np.zeros(len(entries), dtype=bool)
    for s, k in widths.items():
        n_heads = structures[s].heads
        h, j = k if n_heads else (0, k)
        pruned[members[s][h:n_heads]] = True
        pruned[members[s][n_heads + j:]] = True
    return cut_entries(dense, analysis, list(entries), pruned)


def measure_latency(
    dense: torch.fx.GraphModule, analysis: GroupAnalysis, structures: Sequence[Structure], entries: Sequence[Entry],
    info: CaptureInfo, runtime: str = "onnxruntime-cpu", shape: tuple[int, int | None] | None = None,
    runs: int = 15, use_cache: bool = True, seconds: float = 3.0,
) -> LatencyModel:  # fmt: skip
    """Measure the :class:`LatencyModel` of ``dense`` (see the module docstring): at least ``runs`` timed rounds
    per class, more for a fast model (about ``seconds`` of runs per session: a median of few short runs is noise).

    Raises:
        ConfigError: an unknown or unavailable runtime, or a ``shape`` the inputs cannot take (before anything
            is measured).
    """
    check_runtime("runtime", runtime)
    start = time.perf_counter()
    inputs = latency_inputs(info, shape)
    exported = deployed_inputs(runtime, info, shape)
    batch = int(next(t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)).shape[0])
    resolved = (batch, shape[1] if shape is not None else None)
    classes = _classes(analysis, structures, entries)
    members: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        members.setdefault(e.structure, []).append(i)
    machine = _machine()
    store = cache_dir()
    timed = "deployed" if exported is not None else "graph"  # what the tables timed: part of their cache key
    base = {"machine": machine, "runtime": runtime, "shape": resolved, "unit": "fraction", "grid": GRID,
            "timed": timed,
            "inputs": [list(t.shape) for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]}
    tables: dict[str, dict[int, float]] = {}  # per class: entries kept -> fraction of the dense latency saved
    head_tables: dict[str, dict[int, float]] = {}  # per "heads+dims" class: heads kept (all dims) -> the same
    todo = []
    for sig in classes:
        mixed = {"head_grid": HEAD_GRID} if structures[classes[sig][0]].heads else {}
        file = store / f"{_key(base | {'class': sig} | mixed)}.json"
        if use_cache and file.is_file():
            stored = json.loads(file.read_text())
            tables[sig] = {int(k): float(v) for k, v in stored["saved"].items()}
            if "heads" in stored:
                head_tables[sig] = {int(k): float(v) for k, v in stored["heads"].items()}
        else:
            todo.append((sig, file))
    dims = {sig: len(members[idx[0]]) - structures[idx[0]].heads for sig, idx in classes.items()}
    narrowest = {s: _narrowest(structures[s], dims[sig]) for sig, idx in classes.items() for s in idx}
    # the floor cut is a whole-model measurement: keyed by the graph and its tensors' names and shapes too
    code, tensors = graph_fingerprint(dense)
    counts = sorted((sig, len(idx)) for sig, idx in classes.items())
    graph = {"code": code, "tensors": [(name, shape) for name, shape, _ in tensors]}
    floor_file = store / f"{_key(base | {'floor': counts, 'graph': graph})}.json"
    floor: float | None = None
    if use_cache and floor_file.is_file():
        floor = float(json.loads(floor_file.read_text())["saved"])
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dense_call = runner(runtime, dense, inputs, work, "dense", exported)
        (first,) = timing.time_interleaved(dense_call, runs=3, warmup=1)
        runs = timed_rounds(first, runs, seconds)
        bar = progress_bar(len(todo) + (floor is None), "latency tables")
        for sig, file in todo:
            idx = classes[sig]
            n_heads = structures[idx[0]].heads
            ks = _grid(dims[sig], structures[idx[0]].multiple)
            hs = _grid(n_heads, 1, HEAD_GRID) if n_heads else []
            cuts = [(n_heads, k) if n_heads else k for k in ks] + [(h, dims[sig]) for h in hs]
            calls = [runner(runtime, _cut_to_widths(dense, analysis, entries, members, dict.fromkeys(idx, w), structures),
                            inputs, work, f"w{i}", exported) for i, w in enumerate(cuts)]  # fmt: skip
            # per round, relative to the dense time of that round: the load may drift within a class and between
            base, saved = timing.saved_interleaved(dense_call, *calls, runs=runs, warmup=2)
            per = [max(0.0, f / len(idx)) for f in saved]
            tables[sig] = dict(zip(ks, per[: len(ks)]))
            record = {"class": json.loads(sig), "runtime": runtime, "shape": resolved, "timed": timed,
                      "dense_ms": base, "saved": tables[sig], "machine": machine}  # fmt: skip
            if n_heads:
                head_tables[sig] = record["heads"] = dict(zip(hs, per[len(ks):]))
            log.debug("latency class %s: dense %.2f ms, saved per structure (fraction of dense) %s%s",
                     structures[idx[0]].name, base, {k: round(v, 4) for k, v in tables[sig].items()},
                     f", by heads kept {({h: round(v, 4) for h, v in head_tables[sig].items()})}" if n_heads else "")
            measured.append(structures[idx[0]].name)
            store.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(record, indent=1))
            bar.update()
        if floor is None and narrowest:
            call = runner(runtime, _cut_to_widths(dense, analysis, entries, members, narrowest, structures), inputs, work,
                          "floor", exported)  # fmt: skip
            base_ms, (floor,) = timing.saved_interleaved(dense_call, call, runs=runs, warmup=2)
            measured.append("floor")
            store.mkdir(parents=True, exist_ok=True)
            floor_file.write_text(json.dumps({"runtime": runtime, "shape": resolved, "dense_ms": base_ms,
                                              "saved": floor, "machine": machine}, indent=1))  # fmt: skip
            bar.update()
        bar.close()
        (dense_ms,) = timing.time_interleaved(dense_call, runs=runs, warmup=2)
    saved = [np.zeros(1)] * len(structures)
    for sig, idx in classes.items():
        table = _interpolate(dims[sig], tables[sig])
        if sig in head_tables:
            table = _heads_table(structures[idx[0]].heads, table, head_tables[sig])
        for s in idx:
            saved[s] = dense_ms * table
    reach = sum(float(saved[s][k]) for s, k in narrowest.items()) / dense_ms
    overlap = _overlap(reach, floor) if floor is not None else 0.0
    seconds = time.perf_counter() - start
    log.info("latency tables on %s: %d of %d measured in %.0f s", runtime, len(measured), len(classes) + 1, seconds)
    return LatencyModel(runtime, resolved, dense_ms, saved, measured, seconds, reach, overlap)


def _narrowest(structure: Structure, dims: int) -> Any:
    """The narrowest width a structure may be cut to: one entry (a multiple of ``structure.multiple``; one head
    of as many dims for a ``"heads+dims"`` structure)."""
    m = structure.multiple
    k = m if dims > m else dims
    return (1, k) if structure.heads else k


def _overlap(reach: float, floor: float) -> float:
    """``reach`` (what the tables sum to at the floor) less what the floor cut measured, held to ``[−reach/2,
    reach/2]`` (where :meth:`LatencyModel.together` stays monotone); 0 when too little is saved to tell."""
    if reach < 0.02 or floor <= 0:
        log.warning("latency: the floor cut saved %.1f%% against %.1f%% summed: taken as additive", 100 * floor,
                    100 * reach)
        return 0.0
    overlap = float(np.clip(reach - floor, -reach / 2, reach / 2))
    log.debug("latency: every structure at its narrowest saves %.1f%% together, %.1f%% summed: overlap %.3f",
             100 * floor, 100 * reach, overlap)
    return overlap
