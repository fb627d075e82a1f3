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
    >>> import torch
    >>> from upop_fx.latency import check_runtime, RUNTIMES
    >>> RUNTIMES[:2]
    ('onnxruntime-cpu', 'torch-cpu')
    >>> check_runtime("tensorrt")
    Traceback (most recent call last):
    ...
    upop_fx.errors.ConfigError: runtime must be one of onnxruntime-cpu, torch-cpu, torch-cuda, onnxruntime-cuda; got 'tensorrt'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from tqdm.auto import tqdm

from .capture import CaptureInfo, is_sequence
from .errors import ConfigError
from .export import export_for_timing
from .groups import GroupAnalysis
from .ort import ort_feeds, ort_session
from .passes import Surgery
from .passes.base import fingerprint
from .search.strategy import Prepared, Selection
from .structures import Entry, Structure, check_choice, entries_left, keep_sets, widths
from .timing import saved_interleaved, time_interleaved

__all__ = [
    "RUNTIMES", "CALIBRATIONS", "SHORT", "OVER", "LatencyModel", "check_runtime", "check_latency_shape", "latency_inputs",
    "measure_latency", "runner", "deployed_inputs", "ort_providers", "cache_dir", "use_latency", "calibrated_cut",
]  # fmt: skip

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime-cpu", "torch-cpu", "torch-cuda", "onnxruntime-cuda")
#: the widths measured per class, as fractions of its entries (the full width is the dense model); the narrowest
#: point measures the tail: below an eighth, what a cut saves keeps growing faster than the 1/4 → 1/8 slope says
GRID = (0.75, 0.5, 0.25, 0.125, 0.03125)
#: the head counts measured per ``"heads+dims"`` class (all dims kept), as fractions of its heads
HEAD_GRID = (0.5, 0.25, 0.125)
#: the most timed rounds per session (a fast model gets more rounds, up to this many)
MAX_RUNS = 150


def _rounds(ms: float, least: int, seconds: float) -> int:
    """Timed rounds for a model that takes ``ms``: about ``seconds`` of them, at least ``least``, at most
    :data:`MAX_RUNS` (a median of a few runs of a fast model is noise)."""
    return max(least, min(MAX_RUNS, int(np.ceil(1e3 * seconds / max(ms, 1e-3)))))


def check_runtime(runtime: Any) -> None:
    """Raise :class:`~upop_fx.errors.ConfigError` for an unknown runtime, or a CUDA one this machine lacks."""
    check_choice("runtime", runtime, RUNTIMES)
    if runtime.endswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime {runtime!r} needs a CUDA GPU, and torch sees none on this machine")
    if runtime == "onnxruntime-cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ConfigError("runtime 'onnxruntime-cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available)")


def check_latency_shape(shape: Any) -> None:
    """``None`` or ``(batch, seq)`` of positive ints (``seq`` may be None: the inputs' own length)."""
    if shape is None:
        return
    ok = isinstance(shape, (tuple, list)) and len(shape) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape[:1])
    ok = ok and (shape[1] is None or (isinstance(shape[1], int) and not isinstance(shape[1], bool) and shape[1] >= 1))
    if not ok:
        raise ConfigError(f"latency_shape must be (batch, seq) with positive ints (seq may be None), got {shape!r}")


def _sequence_axes(info: CaptureInfo) -> list[Any]:
    """The leaves of the capture's dynamic-shape spec that make axis 1 dynamic."""
    leaves = torch.utils._pytree.tree_leaves(info.dynamic_shapes, is_leaf=lambda x: isinstance(x, dict) and 0 in x)
    return [x for x in leaves if isinstance(x, dict) and 1 in x]


def latency_inputs(info: CaptureInfo, shape: tuple[int, int | None] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The example inputs resized to ``shape = (batch, seq)``: rows repeated or dropped on axis 0, and on axis 1
    of the inputs with a dynamic sequence axis, positions repeated cyclically or dropped. None: the example.

    Raises:
        ConfigError: ``seq`` differs from the example's but no input has a sequence axis (an image model), or
            the model rejects inputs of that shape (a sequence longer than its position table, say).
    """
    check_latency_shape(shape)
    if shape is None:
        return info.args, info.kwargs
    batch, seq = shape
    seq_axis = bool(_sequence_axes(info))
    leaves = [t for t in torch.utils._pytree.tree_leaves((info.args, info.kwargs)) if isinstance(t, torch.Tensor)]
    lengths = {int(t.shape[1]) for t in leaves if is_sequence(t)}
    if seq is not None and not seq_axis and lengths != {seq}:
        raise ConfigError(f"latency_shape asks for sequence length {seq}, but no input of this model has a "
                          "sequence axis (give seq=None to time at the inputs' own size)")

    def resize(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        t = t[torch.arange(batch) % t.shape[0]]
        if seq is not None and seq_axis and is_sequence(t):
            t = t[:, torch.arange(seq) % t.shape[1]]
        return t

    return torch.utils._pytree.tree_map(resize, (info.args, info.kwargs))


def deployed_inputs(runtime: str, info: CaptureInfo, shape: tuple[int, int | None] | None
                    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """For ONNX Runtime, the inputs the deployed file is exported at (:func:`latency_inputs` with a batch of at
    least 2: the timed file has dynamic axes, as ``export_onnx`` writes it); None for PyTorch runtimes."""
    if not runtime.startswith("onnxruntime"):
        return None
    # no shape: the example inputs themselves, whose batch capture already required to be at least 2
    return latency_inputs(info, None if shape is None else (max(2, shape[0]), shape[1]))


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
        ``"heads+dims"`` structure: :func:`~upop_fx.structures.widths`)."""
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


def cache_dir() -> Path:
    """Where latency tables are kept: ``$UPOP_FX_CACHE/latency`` or ``~/.cache/upop_fx/latency``."""
    root = os.environ.get("UPOP_FX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "upop_fx")
    return Path(root) / "latency"


def _machine() -> dict[str, Any]:
    return {
        "node": platform.node(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
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
             len(g.producers), len(g.consumers))
            for g in groups
        ]])  # fmt: skip
        out.setdefault(sig, []).append(s)
    return out


def _grid(n: int, multiple: int, fractions: Sequence[float] = GRID) -> list[int]:
    """The widths below ``n`` measured for a class: ``fractions`` of ``n``, rounded to ``multiple``."""
    ks = set()
    for f in fractions:
        k = max(1, int(round(f * n)))
        if multiple > 1:
            k = max(multiple, multiple * round(k / multiple)) if n > multiple else n
        if k < n:
            ks.add(k)
    return sorted(ks, reverse=True)


def ort_providers(runtime: str) -> list[str] | None:
    """ONNX Runtime's execution providers for ``runtime`` (None: its default, the CPU)."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if runtime == "onnxruntime-cuda" else None


def runner(runtime: str, gm: torch.nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]],
           workdir: Path, name: str, export_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
           ) -> Callable[[], Any]:  # fmt: skip
    """A no-argument callable that runs ``gm`` on ``inputs`` on ``runtime``. For ONNX Runtime ``gm`` is exported
    under ``workdir`` (:func:`~upop_fx.export.export_for_timing`): as deployed — dynamic axes, exported at
    ``export_inputs`` (a batch of at least 2) — when ``export_inputs`` is given, else with the shapes of
    ``inputs`` fixed."""
    args, kwargs = inputs
    if runtime.startswith("torch"):
        device = "cuda" if runtime == "torch-cuda" else "cpu"
        gm = gm.to(device)
        a = torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, (args, kwargs))

        def call() -> Any:
            with torch.inference_mode():
                out = gm(*a[0], **a[1])
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        return call
    at_args, at_kwargs = inputs if export_inputs is None else export_inputs
    path = export_for_timing(gm, tuple(at_args), dict(at_kwargs), workdir / f"{name}.onnx",
                             deployed=export_inputs is not None)
    session = ort_session(path, providers=ort_providers(runtime), spinning=False)  # timed in turn with others
    feeds = ort_feeds(session, args, kwargs)
    return lambda: session.run(None, feeds)


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


def _cut(dense: torch.fx.GraphModule, analysis: GroupAnalysis, entries: Sequence[Entry], members: dict[int, list[int]],
         widths: dict[int, Any], structures: Sequence[Structure]) -> torch.fx.GraphModule:  # fmt: skip
    """``dense`` with structure ``s`` cut to its first ``widths[s]`` entries (the others whole); a
    ``"heads+dims"`` structure to its first ``(h, j)`` heads and dims."""
    pruned = np.zeros(len(entries), dtype=bool)
    for s, k in widths.items():
        n_heads = structures[s].heads
        h, j = k if n_heads else (0, k)
        pruned[members[s][h:n_heads]] = True
        pruned[members[s][n_heads + j:]] = True
    return Surgery(keep_sets(analysis, list(entries), pruned))(dense).gm


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
    check_runtime(runtime)
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
    code, tensors = fingerprint(dense)
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
        (first,) = time_interleaved(dense_call, runs=3, warmup=1)
        runs = _rounds(first, runs, seconds)
        bar = tqdm(total=len(todo) + (floor is None), desc="latency tables", leave=False, disable=None)
        for sig, file in todo:
            idx = classes[sig]
            n_heads = structures[idx[0]].heads
            ks = _grid(dims[sig], structures[idx[0]].multiple)
            hs = _grid(n_heads, 1, HEAD_GRID) if n_heads else []
            cuts = [(n_heads, k) if n_heads else k for k in ks] + [(h, dims[sig]) for h in hs]
            calls = [runner(runtime, _cut(dense, analysis, entries, members, dict.fromkeys(idx, w), structures),
                            inputs, work, f"w{i}", exported) for i, w in enumerate(cuts)]  # fmt: skip
            # per round, relative to the dense time of that round: the load may drift within a class and between
            base, saved = saved_interleaved(dense_call, *calls, runs=runs, warmup=2)
            per = [max(0.0, f / len(idx)) for f in saved]
            tables[sig] = dict(zip(ks, per[: len(ks)]))
            record = {"class": json.loads(sig), "runtime": runtime, "shape": resolved, "timed": timed,
                      "dense_ms": base, "saved": tables[sig], "machine": machine}  # fmt: skip
            if n_heads:
                head_tables[sig] = record["heads"] = dict(zip(hs, per[len(ks):]))
            log.info("latency class %s: dense %.2f ms, saved per structure (fraction of dense) %s%s",
                     structures[idx[0]].name, base, {k: round(v, 4) for k, v in tables[sig].items()},
                     f", by heads kept {({h: round(v, 4) for h, v in head_tables[sig].items()})}" if n_heads else "")
            measured.append(structures[idx[0]].name)
            store.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(record, indent=1))
            bar.update()
        if floor is None and narrowest:
            call = runner(runtime, _cut(dense, analysis, entries, members, narrowest, structures), inputs, work,
                          "floor", exported)  # fmt: skip
            base_ms, (floor,) = saved_interleaved(dense_call, call, runs=runs, warmup=2)
            measured.append("floor")
            store.mkdir(parents=True, exist_ok=True)
            floor_file.write_text(json.dumps({"runtime": runtime, "shape": resolved, "dense_ms": base_ms,
                                              "saved": floor, "machine": machine}, indent=1))  # fmt: skip
            bar.update()
        bar.close()
        (dense_ms,) = time_interleaved(dense_call, runs=runs, warmup=2)
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
    log.info("latency: every structure at its narrowest saves %.1f%% together, %.1f%% summed: overlap %.3f",
             100 * floor, 100 * reach, overlap)
    return overlap


def use_latency(prepared: Prepared, latency: LatencyModel) -> None:
    """Give every structure its table (fractions of the dense latency) and every entry the mean fraction its
    structure saves per entry (what the search's sparsity weighting reads). Raises ConfigError when the asked
    ratio is more than the structures can save."""
    prepared.latency = latency
    full = widths(prepared.entries, prepared.structures)
    for st, table in zip(prepared.structures, latency.fractions()):
        st.latency = table
    for e in prepared.entries:
        st, n = prepared.structures[e.structure], full[e.structure]
        if st.heads:  # a head: the mean of all but one head going (all dims kept); a dim: the same over dims
            h, j = n
            per = st.latency[1, j] / (h - 1) if e.head else st.latency[h, 1] / (j - 1)
            e.cost = float(per) if min(h, j) > 1 else 0.0
        else:
            e.cost = float(st.latency[1] / (n - 1)) if n > 1 else 0.0
    most = latency.most_saved()
    log.info("latency on %s at %s: dense %.2f ms; the most pruning can save: %.0f%%", latency.runtime,
             latency.shape, latency.dense_ms, 100 * most)
    if prepared.ratio > most:
        raise ConfigError(
            f"ratio={prepared.ratio} asks to remove {100 * prepared.ratio:.0f}% of the measured latency "
            f"({latency.dense_ms:.2f} ms on {latency.runtime}), but the prunable structures account for at most "
            f"{100 * most:.0f}% (the rest — embeddings, norms, the head, overheads — does not shrink); ask for less "
            "(the tables are cached: a second call measures only the dense model)"
        )


#: how many times a latency-budget cut that measures off the asked speedup is re-selected
CALIBRATIONS = 2
#: the band a measured speedup may stray from the asked one before the cut is re-selected: below ``SHORT × asked``
#: it falls short; above ``OVER × asked`` it removes more than the ask needs (and costs accuracy for nothing).
#: ``SHORT`` is 1: one interleaved measurement on a CPU strays by a few per cent from the next, so a cut kept at
#: 0.97 × asked measures below that as often as not afterwards
SHORT, OVER = 1.0, 1.08


def calibrated_cut(
    prepared: Prepared, selection: Selection, pruned: np.ndarray, small: torch.fx.GraphModule,
    cut_graph: Callable[[Prepared, np.ndarray, torch.fx.GraphModule], torch.fx.GraphModule],
) -> tuple[np.ndarray, torch.fx.GraphModule, dict[str, Any]]:  # fmt: skip
    """Time the cut ``small`` on the runtime beside the prediction; while it measures outside
    ``[SHORT, OVER] × asked``, re-select (``selection.reselect``) with the miss folded into the target
    (:func:`_next_target`: the measured / predicted ratio, then the line through the last two rounds) and cut again
    with ``cut_graph`` (up to :data:`CALIBRATIONS` times). Of the rounds, the one kept is the slowest that reaches
    ``SHORT × asked`` (the fastest when none does). Returns its selection, its cut and the report's latency row
    (with ``rounds``: target, predicted and measured speedup of each round, and ``kept_round``)."""
    asked = 1 / (1 - prepared.ratio)
    model = prepared.latency
    info = prepared.captured.info
    inputs = latency_inputs(info, model.shape)
    exported = deployed_inputs(model.runtime, info, model.shape)
    with tempfile.TemporaryDirectory() as d:
        dense = runner(model.runtime, selection.dense, inputs, Path(d), "dense", exported)

        def timed(pruned: np.ndarray, small: torch.fx.GraphModule, name: str) -> dict[str, Any]:
            return _latency_row(prepared, pruned, dense, runner(model.runtime, small, inputs, Path(d), name, exported))

        row = timed(pruned, small, "cut0")
        tried = [(pruned, small, row)]
        rounds = [_round(prepared.ratio, row)]
        target = prepared.ratio
        most = model.most_saved()
        for i in range(CALIBRATIONS if selection.reselect is not None else 0):
            speedup = row["measured_speedup"]
            short, over = speedup < SHORT * asked, speedup > OVER * asked
            if not (short or over) or (short and target >= most):
                break
            target = _next_target(prepared.ratio, rounds, most)
            pruned = np.asarray(selection.reselect(model.needed(target)), dtype=bool)
            small = cut_graph(prepared, pruned, selection.dense)
            row = timed(pruned, small, f"cut{i + 1}")
            tried.append((pruned, small, row))
            rounds.append(_round(target, row))
            log.info("latency: measured %.2fx of the asked %.2fx; re-selected for %.0f%% of the predicted latency",
                     speedup, asked, 100 * target)
    reached = [i for i, (_, _, r) in enumerate(tried) if r["measured_speedup"] >= SHORT * asked]
    speed = [r["measured_speedup"] for _, _, r in tried]
    kept = min(reached, key=speed.__getitem__) if reached else max(range(len(tried)), key=speed.__getitem__)
    pruned, small, row = tried[kept]
    row["rounds"], row["kept_round"] = rounds, kept
    return pruned, small, row


def _next_target(ratio: float, rounds: list[dict[str, float]], most: float) -> float:
    """The target of the next re-selection. After one round the measured time is taken to stay the same multiple
    of the predicted one; after two, the measured saving is taken to be linear in the target through the last two
    rounds (a secant: where the tables misjudge deep cuts more than shallow ones, the ratio rule falls short
    twice). Held to ``(0, most]``."""
    last = rounds[-1]
    saved = [1 - 1 / r["measured_speedup"] for r in rounds[-2:]]
    target = 1 - (1 - ratio) * last["measured_speedup"] / last["predicted_speedup"]
    if len(rounds) >= 2:
        dt, ds = last["target"] - rounds[-2]["target"], saved[1] - saved[0]
        if abs(dt) > 1e-9 and ds / dt > 0:
            target = last["target"] + (ratio - saved[1]) * dt / ds
    return float(min(most, max(target, 1e-3)))


def _round(target: float, row: dict[str, Any]) -> dict[str, float]:
    return {"target": target, "predicted_speedup": row["predicted_speedup"], "measured_speedup": row["measured_speedup"]}


def _latency_row(prepared: Prepared, pruned: np.ndarray, dense: Callable[[], Any], small: Callable[[], Any]
                 ) -> dict[str, Any]:
    """Predicted latency after the cut, and the speedup measured on the runtime (dense and cut interleaved)."""
    model = prepared.latency
    predicted = model.predict(widths(prepared.entries, prepared.structures, pruned))
    runs = _rounds(model.dense_ms, 30, 5.0)
    dense_ms, (saved,) = saved_interleaved(dense, small, runs=runs, warmup=3)
    small_ms = dense_ms * (1 - saved)  # the per-round saving on the dense median: see saved_interleaved
    row = {
        "runtime": model.runtime, "batch": model.shape[0], "seq": model.shape[1], "dense_ms": model.dense_ms,
        "predicted_ms": predicted, "predicted_speedup": model.dense_ms / predicted,
        "measured_dense_ms": dense_ms, "measured_ms": small_ms, "measured_speedup": dense_ms / small_ms,
        "table_seconds": model.seconds, "floor_summed": model.reach, "floor_measured": model.together(model.reach),
        "load_average": os.getloadavg()[0], "measured_classes": list(model.measured),
    }  # fmt: skip
    log.info("latency on %s: predicted %.2f -> %.2f ms (%.2fx), measured %.2f -> %.2f ms (%.2fx)", model.runtime,
             model.dense_ms, predicted, row["predicted_speedup"], dense_ms, small_ms, row["measured_speedup"])
    return row
