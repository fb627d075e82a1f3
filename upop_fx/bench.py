"""Timing helpers: models on the same inputs, interleaved, warmed up, median of many runs.

:func:`time_interleaved` calls any number of callables in turn, so that they all see the same machine load;
:func:`time_pair` times a dense model against its pruned version in PyTorch and in ONNX Runtime. The ONNX
Runtime sessions come from :func:`upop_fx.ort.ort_session`.

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
from .errors import ConfigError
from .export import export_onnx
from .ort import ort_session

__all__ = ["time_interleaved", "time_pair"]


def time_interleaved(*fns: Callable[[], Any], runs: int = 20, warmup: int = 3, alternate: bool = False) -> list[float]:
    """Median milliseconds of each callable, the callables run in turn.

    Each of ``warmup`` warm-up rounds calls every callable once, in order; each of ``runs`` timed rounds then
    does the same, timing every call with :func:`time.perf_counter`. With ``alternate`` the timed rounds run in
    reverse order every other round (a, b, c, c, b, a, a, b, c, ...), so that no callable always runs right
    after the same other one. Every callable is called ``warmup + runs`` times.

    Args:
        fns: the callables, taking no argument (their results are discarded).
        runs: timed rounds (the median is over these), at least 1.
        warmup: untimed rounds first, at least 0.
        alternate: reverse the order of the calls in every odd-numbered timed round.

    Returns:
        One median time in milliseconds per callable, in the order of ``fns``.

    Raises:
        ConfigError: no callable, something that is not callable (``runs`` and ``warmup`` are keyword-only),
            or ``runs`` / ``warmup`` out of range.

    Example:
        >>> calls = []
        >>> medians = time_interleaved(lambda: calls.append("a"), lambda: calls.append("b"), runs=2, warmup=1,
        ...                            alternate=True)
        >>> len(medians), "".join(calls)
        (2, 'ababba')
    """
    if not fns:
        raise ConfigError("time_interleaved needs at least one callable")
    for f in fns:
        if not callable(f):
            raise ConfigError(f"time_interleaved takes callables (runs= and warmup= by keyword), got {f!r}")
    for name, value, least in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an int >= {least}, got {value!r}")
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    forward = list(range(len(fns)))
    for r in range(runs):
        for i in (forward[::-1] if alternate and r % 2 else forward):
            t0 = time.perf_counter()
            fns[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def _feeds(session: Any, example: Any) -> dict[str, np.ndarray]:
    args, kwargs = normalize_inputs(example)
    names = [i.name for i in session.get_inputs()]
    if kwargs:
        return {n: kwargs[n].numpy() for n in names}
    return {n: v.numpy() for n, v in zip(names, args)}


def time_pair(original: torch.nn.Module, small: torch.nn.Module, example: Any, small_onnx: Path | None,
              runs: int = 20) -> list[dict[str, Any]]:
    """Rows ``{runtime, ms_dense, ms_pruned, speedup}`` for PyTorch and (when ``small_onnx`` exists) ONNX Runtime.

    ``original`` and ``small`` run interleaved on ``example`` (:func:`time_interleaved`, ``runs`` timed rounds
    after 3 warm-up rounds). For ONNX Runtime, ``original`` is exported to a temporary file with
    :func:`upop_fx.export.export_onnx` and both files run in the CPU provider at ONNX Runtime's full
    optimisation level.

    Example:
        >>> import torch
        >>> from upop_fx.bench import time_pair
        >>> rows = time_pair(torch.nn.Linear(32, 32), torch.nn.Linear(32, 8), torch.randn(4, 32), None, runs=3)
        >>> [r["runtime"] for r in rows], rows[0]["speedup"] > 0
        (['pytorch'], True)
    """
    args, kwargs = normalize_inputs(example)
    rows = []
    with torch.inference_mode():
        a, b = time_interleaved(lambda: original(*args, **kwargs), lambda: small(*args, **kwargs), runs=runs)
    rows.append({"runtime": "pytorch", "ms_dense": a, "ms_pruned": b, "speedup": a / b})
    if small_onnx is not None and Path(small_onnx).is_file():
        with tempfile.TemporaryDirectory() as d:
            dense_onnx = export_onnx(original, example, Path(d) / "original.onnx", optimize=False).path
            sa, sb = ort_session(dense_onnx), ort_session(small_onnx)
            fa, fb = _feeds(sa, example), _feeds(sb, example)
            a, b = time_interleaved(lambda: sa.run(None, fa), lambda: sb.run(None, fb), runs=runs)
        rows.append({"runtime": "onnxruntime-cpu", "ms_dense": a, "ms_pruned": b, "speedup": a / b})
    return rows
