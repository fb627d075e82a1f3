"""Timing helpers: two models on the same inputs, interleaved, warmed up, median of many runs.

Example:
    >>> import torch
    >>> from upop_fx.bench import time_interleaved
    >>> a, b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 16)
    >>> x = torch.randn(8, 64)
    >>> ms_a, ms_b = time_interleaved(lambda: a(x), lambda: b(x), runs=5, warmup=1)
    >>> ms_a > 0 and ms_b > 0
    True
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .capture import normalize_inputs

__all__ = ["time_interleaved", "time_pair", "ort_session"]


def time_interleaved(fa: Callable[[], Any], fb: Callable[[], Any], runs: int = 20, warmup: int = 3) -> tuple[float, float]:
    """Median milliseconds of ``fa`` and ``fb``, called alternately (a, b, a, b, ...) after a warm-up."""
    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for _ in range(runs):
        for f, acc in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            f()
            acc.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ta), statistics.median(tb)


def ort_session(path: str | Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(session: Any, example: Any) -> dict[str, np.ndarray]:
    args, kwargs = normalize_inputs(example)
    values = list(kwargs.values()) if kwargs else list(args)
    names = [i.name for i in session.get_inputs()]
    if kwargs:
        return {n: kwargs[n].numpy() for n in names}
    return {n: v.numpy() for n, v in zip(names, values)}


def time_pair(original: torch.nn.Module, small: torch.nn.Module, example: Any, small_onnx: Path | None, runs: int = 20) -> list[dict[str, Any]]:
    """Rows ``{runtime, ms_dense, ms_pruned, speedup}`` for PyTorch and (when ``small_onnx`` exists) ONNX Runtime."""
    from .export import export_onnx

    args, kwargs = normalize_inputs(example)
    rows = []
    with torch.inference_mode():
        a, b = time_interleaved(lambda: original(*args, **kwargs), lambda: small(*args, **kwargs), runs)
    rows.append({"runtime": "pytorch", "ms_dense": a, "ms_pruned": b, "speedup": a / b})
    if small_onnx is not None and Path(small_onnx).is_file():
        with tempfile.TemporaryDirectory() as d:
            dense_onnx = export_onnx(original, example, Path(d) / "original.onnx", optimize=False).path
            sa, sb = ort_session(dense_onnx), ort_session(small_onnx)
            fa, fb = _feeds(sa, example), _feeds(sb, example)
            a, b = time_interleaved(lambda: sa.run(None, fa), lambda: sb.run(None, fb), runs)
        rows.append({"runtime": "onnxruntime-cpu", "ms_dense": a, "ms_pruned": b, "speedup": a / b})
    return rows
