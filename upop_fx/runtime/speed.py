"""Timing helpers: models on the same inputs, interleaved, warmed up, median of many runs.

:func:`time_interleaved` (from :mod:`upop_fx.runtime.timing`) calls any number of callables in turn, so that they all
see the same machine load;
:func:`time_pair` times a dense model against its pruned version in PyTorch and in ONNX Runtime. The ONNX
Runtime sessions come from :func:`upop_fx.runtime.sessions.ort_session`.

Example:
    >>> import torch
    >>> from upop_fx.runtime.speed import time_pair
    >>> rows = time_pair(torch.nn.Linear(64, 64), torch.nn.Linear(64, 16), torch.randn(8, 64), None, runs=3)
    >>> rows[0]["runtime"], rows[0]["ms_dense"] > 0
    ('pytorch', True)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ..capture.program import normalize_inputs
from .export import export_onnx
from .sessions import ort_feeds, ort_session
from .timing import load_average, time_interleaved

__all__ = ["time_interleaved", "time_pair"]


def time_pair(original: torch.nn.Module, small: torch.nn.Module, example: Any, small_onnx: Path | None,
              runs: int = 20) -> list[dict[str, Any]]:
    """Rows ``{runtime, ms_dense, ms_pruned, speedup, shape, threads, load_before, load_after}`` for PyTorch and
    (when ``small_onnx`` exists) ONNX Runtime: ``shape`` the timed inputs' shapes, ``threads`` the runtime's
    intra-op threads (None: ONNX Runtime's default, one per physical core), the load averages (1 min) around each timed group.

    ``original`` and ``small`` run interleaved on ``example`` (:func:`time_interleaved`, ``runs`` timed rounds
    after 3 warm-up rounds). For ONNX Runtime, ``original`` is exported to a temporary file with
    :func:`upop_fx.runtime.export.export_onnx` and both files run in the CPU provider at ONNX Runtime's full
    optimisation level, with spinning off: interleaved sessions whose idle threads spin steal each other's cores.

    Example:
        >>> import torch
        >>> from upop_fx.runtime.speed import time_pair
        >>> rows = time_pair(torch.nn.Linear(32, 32), torch.nn.Linear(32, 8), torch.randn(4, 32), None, runs=3)
        >>> [r["runtime"] for r in rows], rows[0]["speedup"] > 0
        (['pytorch'], True)
    """
    args, kwargs = normalize_inputs(example)
    shape = " ".join(f"{k}{list(t.shape)}" for k, t in [*(("", a) for a in args), *kwargs.items()]
                     if isinstance(t, torch.Tensor))
    rows = []
    load = load_average()
    with torch.inference_mode():
        a, b = time_interleaved(lambda: original(*args, **kwargs), lambda: small(*args, **kwargs), runs=runs)
    rows.append({"runtime": "pytorch", "ms_dense": a, "ms_pruned": b, "speedup": a / b, "shape": shape,
                 "threads": torch.get_num_threads(), "load_before": load, "load_after": load_average()})
    if small_onnx is not None and Path(small_onnx).is_file():
        with tempfile.TemporaryDirectory() as d:
            dense_onnx = export_onnx(original, example, Path(d) / "original.onnx", optimize=False).path
            sa, sb = ort_session(dense_onnx, spinning=False), ort_session(small_onnx, spinning=False)
            fa, fb = ort_feeds(sa, args, kwargs), ort_feeds(sb, args, kwargs)
            load = load_average()
            a, b = time_interleaved(lambda: sa.run(None, fa), lambda: sb.run(None, fb), runs=runs)
            threads = sa.get_session_options().intra_op_num_threads or None  # None: one per physical core
        rows.append({"runtime": "onnxruntime-cpu", "ms_dense": a, "ms_pruned": b, "speedup": a / b, "shape": shape,
                     "threads": threads, "load_before": load, "load_after": load_average()})
    return rows

