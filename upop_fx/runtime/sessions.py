"""ONNX Runtime sessions, configured in one place for the exporter, the timing helpers and the benchmarks.

:func:`ort_session` opens an ``onnxruntime.InferenceSession`` with upop_fx's settings: a named graph
optimisation level, the CPU execution provider unless told otherwise, sequential execution, ONNX Runtime's
own log quiet below errors, and optionally a fixed thread count, a per-operator profile, or the optimised
graph saved to a file (its weights in an external-data file when the model is large).

Example:
    >>> import tempfile, torch
    >>> from upop_fx.runtime.export import export_onnx
    >>> from upop_fx.runtime.sessions import ort_session
    >>> with tempfile.TemporaryDirectory() as d:
    ...     info = export_onnx(torch.nn.Linear(4, 3), torch.randn(2, 4), f"{d}/linear.onnx", optimize=False)
    ...     session = ort_session(info.path, level="extended")
    ...     session.run(None, {"input_0": torch.randn(5, 4).numpy()})[0].shape
    (5, 3)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnxruntime

from ..errors import ConfigError

__all__ = ["ort_session", "ort_feeds", "OPTIMIZATION_LEVELS", "LARGE_MODEL_BYTES"]

#: ``level`` names of :func:`ort_session` and the ONNX Runtime graph optimisation levels they stand for.
OPTIMIZATION_LEVELS: dict[str, onnxruntime.GraphOptimizationLevel] = {
    "disable": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
#: above this many bytes (the model file and the files beside it), an optimised model saved through
#: ``optimized_path`` keeps its weights in ``<optimized_path>.data`` (a single ONNX protobuf is limited to 2 GiB)
LARGE_MODEL_BYTES = 1 << 30
_QUIET = 3  # ONNX Runtime log severity: errors and fatal only


def ort_session(
    path: str | os.PathLike[str],
    level: str = "all",
    optimized_path: str | os.PathLike[str] | None = None,
    providers: Sequence[str] | None = None,
    *,
    threads: int | None = None,
    profile_prefix: str | None = None,
    spinning: bool = True,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session of the ONNX file at ``path``.

    Args:
        path: the ``.onnx`` file (its external-data files, if any, beside it).
        level: the graph optimisation level, one of :data:`OPTIMIZATION_LEVELS` (``"all"``: ONNX Runtime's
            default, layout transforms included; ``"extended"``: the transformer fusions, portable across CPUs).
        optimized_path: where ONNX Runtime saves the graph it optimised at ``level``, or None to save nothing.
            When the model holds more than :data:`LARGE_MODEL_BYTES`, its weights go to
            ``<optimized_path name>.data`` beside it.
        providers: the execution providers in order of preference; None = ``["CPUExecutionProvider"]``.
        threads: intra-op threads (inter-op: 1); None = ONNX Runtime's default (one per physical core).
        profile_prefix: turn ONNX Runtime's profiler on, writing ``<profile_prefix>_<date>.json`` when the
            caller ends it with ``session.end_profiling()``.
        spinning: let the intra-op threads spin after a run, waiting for the next (ONNX Runtime's default: the
            lowest latency for one session). False for sessions timed in turn: a session's spinning threads
            would take the cores from the next one.

    Raises:
        ConfigError: ``level`` is not one of :data:`OPTIMIZATION_LEVELS`, or ``threads`` is not a positive int.
    """
    if level not in OPTIMIZATION_LEVELS:
        raise ConfigError(f"unknown ONNX Runtime optimisation level {level!r}; choose one of "
                          f"{', '.join(OPTIMIZATION_LEVELS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive int or None, got {threads!r}")
    file = Path(path)
    so = onnxruntime.SessionOptions()
    so.log_severity_level = _QUIET
    so.graph_optimization_level = OPTIMIZATION_LEVELS[level]
    so.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        out = Path(optimized_path)
        so.optimized_model_filepath = str(out)
        if sum(p.stat().st_size for p in file.parent.iterdir() if p.is_file()) > LARGE_MODEL_BYTES:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return onnxruntime.InferenceSession(str(file), so, providers=list(providers or ["CPUExecutionProvider"]))


def ort_feeds(session: onnxruntime.InferenceSession, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The session's inputs as numpy arrays: by name from ``kwargs`` when given, else ``args`` in order."""
    names = [i.name for i in session.get_inputs()]
    if kwargs:
        return {n: kwargs[n].numpy() for n in names}
    return {n: v.numpy() for n, v in zip(names, args)}
