"""A model as a no-argument callable on a runtime, and the inputs it is timed on.

:data:`RUNNERS` maps each runtime of :data:`~upop_fx.options.RUNTIMES` to the function that builds its
callable; everything that times a model on a runtime builds it through :func:`runner`, so a runtime (or a
simulated one, in tests) is registered in one place.

Example:
    >>> import torch
    >>> from upop_fx.runtime.runners import runner
    >>> from pathlib import Path
    >>> call = runner("torch-cpu", torch.nn.Linear(4, 2), ((torch.randn(3, 4),), {}), Path("."), "lin")
    >>> call().shape
    torch.Size([3, 2])
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..capture.program import CaptureInfo, is_sequence, sequence_lengths
from ..errors import ConfigError
from ..options import check_latency_shape
from .export import export_for_timing
from .sessions import ort_feeds, ort_session

__all__ = ["RUNNERS", "Inputs", "runner", "timed_rounds", "latency_inputs", "deployed_inputs", "ort_providers",
           "MAX_RUNS"]

#: positional and keyword inputs of a model call
Inputs = tuple[tuple[Any, ...], dict[str, Any]]
#: the most timed rounds per session (a fast model gets more rounds, up to this many)
MAX_RUNS = 150


def timed_rounds(ms: float, least: int, seconds: float) -> int:
    """Timed rounds for a model that takes ``ms``: about ``seconds`` of them, at least ``least``, at most
    :data:`MAX_RUNS` (a median of a few runs of a fast model is noise)."""
    return max(least, min(MAX_RUNS, int(np.ceil(1e3 * seconds / max(ms, 1e-3)))))


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
    check_latency_shape("latency_shape", shape)
    if shape is None:
        return info.args, info.kwargs
    batch, seq = shape
    seq_axis = bool(_sequence_axes(info))
    if seq is not None and not seq_axis and sequence_lengths(info) != {seq}:
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
    """For ONNX Runtime, the inputs the deployed file is exported at (:func:`latency_inputs` with a batch and
    sequence of at least 2: the timed file has dynamic axes, as ``export_onnx`` writes it); None for PyTorch
    runtimes."""
    if not runtime.startswith("onnxruntime"):
        return None
    # no shape: the example inputs themselves, whose batch capture already required to be at least 2; a size of
    # 1 would be specialised by the export (one token is timed on a file exported at 2)
    return latency_inputs(info, None if shape is None else (max(2, shape[0]), None if shape[1] is None else max(2, shape[1])))


def ort_providers(runtime: str) -> list[str] | None:
    """ONNX Runtime's execution providers for ``runtime`` (None: its default, the CPU)."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if runtime == "onnxruntime-cuda" else None


def _torch_runner(runtime: str, gm: torch.nn.Module, inputs: Inputs, workdir: Path, name: str,
                  export_inputs: Inputs | None = None) -> Callable[[], Any]:
    args, kwargs = inputs
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


def _ort_runner(runtime: str, gm: torch.nn.Module, inputs: Inputs, workdir: Path, name: str,
                export_inputs: Inputs | None = None) -> Callable[[], Any]:
    args, kwargs = inputs
    at_args, at_kwargs = inputs if export_inputs is None else export_inputs
    path = export_for_timing(gm, tuple(at_args), dict(at_kwargs), workdir / f"{name}.onnx",
                             deployed=export_inputs is not None)
    session = ort_session(path, providers=ort_providers(runtime), spinning=False)  # timed in turn with others
    feeds = ort_feeds(session, args, kwargs)
    return lambda: session.run(None, feeds)


#: runtime name -> ``build(runtime, gm, inputs, workdir, name, export_inputs) -> callable``
RUNNERS: dict[str, Callable[..., Callable[[], Any]]] = {
    "torch-cpu": _torch_runner, "torch-cuda": _torch_runner,
    "onnxruntime-cpu": _ort_runner, "onnxruntime-cuda": _ort_runner,
}


def runner(runtime: str, gm: torch.nn.Module, inputs: Inputs, workdir: Path, name: str,
           export_inputs: Inputs | None = None) -> Callable[[], Any]:
    """A no-argument callable that runs ``gm`` on ``inputs`` on ``runtime``. For ONNX Runtime ``gm`` is exported
    under ``workdir`` (:func:`~upop_fx.runtime.export.export_for_timing`): as deployed — dynamic axes, exported at
    ``export_inputs`` (a batch of at least 2) — when ``export_inputs`` is given, else with the shapes of
    ``inputs`` fixed."""
    if runtime not in RUNNERS:
        raise ConfigError(f"no runner for runtime {runtime!r}; known: {', '.join(RUNNERS)}")
    return RUNNERS[runtime](runtime, gm, inputs, workdir, name, export_inputs)
