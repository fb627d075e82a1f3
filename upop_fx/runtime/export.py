"""ONNX export with ONNX Runtime parity checks: the original model and the compressed GraphModule alike.

``export_onnx`` captures the model with ``torch.export`` (non-strict, the same dynamic axes as
:mod:`upop_fx.capture`: axis 0 of every tensor, axis 1 of rank-2 integer token tensors and of rank-3 float
tensors), translates the ExportedProgram with the dynamo ONNX exporter (``torch.onnx.export(ep, dynamo=True)``),
names inputs and outputs, and runs the file in ONNX Runtime (CPUExecutionProvider) against PyTorch on the
example inputs and on a second batch size and sequence length derived from them. With ``optimize=True`` it also
saves ONNX Runtime's optimised graph (``<stem>.opt.onnx``: the transformer fusions of ORT's extended level —
LayerNorm, SkipLayerNorm, (Bias)Gelu, MatMul+Add, ...) and checks that one too. Nothing is written to ``path``
unless every check passes: the files are staged in a temporary directory beside ``path`` and moved in with
``os.replace`` at the end; on any failure nothing (no .onnx, .opt.onnx, external-data file or temporary) is
left behind.

Why the dynamo exporter. Measured on torch 2.13 / transformers 5.x / onnxruntime 1.31 over the whole test zoo
(BERT, BERT-cls, ViT, DeiT, DistilBERT, GPT-2, CLIP, BLIP-VQA, ``nn.TransformerEncoder``, timm-style ViT),
original and compressed: the dynamo exporter exported all twenty with ONNX Runtime parity below 1e-6 at two
batch sizes and sequence lengths. The TorchScript exporter (``dynamo=False`` + ``dynamic_axes``) failed on
every compressed model — ``torch.export``'s ``ep.module()`` is a GraphModule whose ``graph`` is an FX graph,
which the TorchScript exporter mistakes for a TorchScript graph (``'Graph' object has no attribute 'outputs'``),
and when given ``output_names`` the trace bakes the example batch into the graph (ORT: "Got invalid dimensions"
at another batch) — and on four originals: BERT (``forward() got multiple values for argument 'use_cache'``),
GPT-2 (``KeyError: 'logits_to_keep'``), CLIP (inputs bound in the wrong order) and ``nn.TransformerEncoder``
(the batch size baked into a Reshape).

The axes: ``torch.export`` assumes dynamic sizes are at least 2, so the example batch must be at least 2 (as
for :func:`upop_fx.compress`); the ONNX file itself accepts any batch. An axis that ``torch.export`` specialises
(the model's code fixes its size) stays static in the file; a specialised batch axis is an error.

Example:
    >>> import tempfile, torch
    >>> from upop_fx.runtime.export import export_onnx
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     info = export_onnx(layer, torch.randn(2, 5, 16), f"{d}/layer.onnx")
    ...     info.input_names, info.output_names, info.max_error < 1e-4, info.optimized_path.name
    (['input_0'], ['output_0'], True, 'layer.opt.onnx')
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from ..capture.program import dynamic_shapes, normalize_inputs, run_module
from ..compare import relative_error
from ..errors import ConfigError, ExportError, InputError
from ..logs import quietly
from .sessions import ort_session

__all__ = ["ExportError", "ExportInfo", "export_onnx", "export_for_timing", "SUPPORTED_OPSETS", "PARITY_TOLERANCE"]

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  #: largest allowed ‖onnx − torch‖ / ‖torch‖ per output
# The dynamo exporter writes opset 18 (its torchlib opset) and up; below 18 it silently writes 18 (asked 7 or
# 14, got 18), and above torch's ONNX_MAX_OPSET it is not validated (26 wrote a graph ONNX Runtime rejects).
_MIN_OPSET = 18
try:
    from torch.onnx._constants import ONNX_MAX_OPSET as _MAX_OPSET
except ImportError:  # pragma: no cover - older/newer torch
    _MAX_OPSET = 23
SUPPORTED_OPSETS = range(_MIN_OPSET, _MAX_OPSET + 1)
_STAGE_PREFIX = ".upop_export-"


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export_onnx` wrote."""

    path: Path  #: the ONNX file
    optimized_path: Path | None  #: ONNX Runtime's optimised graph (``<stem>.opt.onnx``), or None
    input_names: list[str]  #: ONNX input names, in order (keyword names, or ``input_0..`` for positional)
    output_names: list[str]  #: ONNX output names, in order (``output_0..`` or the output's field names)
    max_error: float  #: largest relative error ‖onnx − torch‖ / ‖torch‖ seen by the parity checks


@quietly
def export_onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    dynamic: bool = True,
    optimize: bool = True,
    opset: int | None = None,
    *,
    exported: torch.export.ExportedProgram | None = None,
) -> ExportInfo:
    """Export ``model`` to ONNX at ``path``, checked against PyTorch in ONNX Runtime.

    Args:
        model: an ``nn.Module`` (a Hugging Face model, or ``upop_fx.compress(...).model``). It is never
            modified: a deep copy in eval mode is exported.
        example_inputs: a tensor, a tuple of positional args, or a dict of keyword args; batch ≥ 2.
        path: the ``.onnx`` file to write; its directory must exist and be writable.
        dynamic: make the batch axis (and the sequence axes) dynamic; with False the file has the example's
            shapes and only the example inputs are checked.
        optimize: also write ONNX Runtime's optimised graph as ``<stem>.opt.onnx`` (runs in ONNX Runtime's CPU
            provider; it holds ONNX Runtime contrib ops) and check it.
        opset: the ONNX opset (one of :data:`SUPPORTED_OPSETS`); None = the exporter's default.
        exported: ``torch.export`` of ``model`` at ``example_inputs`` already made (with ``dynamic``'s axes, as
            :func:`~upop_fx.capture.program.export_program` makes it), translated instead of exporting again.

    Raises:
        InputError: ``model`` is not a module, or the inputs are malformed or do not fit the model.
        ConfigError: ``opset`` is not supported.
        ExportError: ``path`` cannot be written, the model cannot be exported, or an output of ONNX Runtime
            differs from PyTorch by more than :data:`PARITY_TOLERANCE`. Nothing is left on disk.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    opset = _check_opset(opset)
    dest = _check_destination(path)
    opt_dest = dest.with_name(f"{dest.stem}.opt{dest.suffix or '.onnx'}")
    work = _eval_copy(model)
    try:
        expected = run_module(work, args, kwargs)
    except Exception as exc:
        raise InputError(f"the model raises on example_inputs: {type(exc).__name__}: {_first_line(exc)}") from exc
    with _staging(dest.parent) as stage:
        ep = exported if exported is not None else _torch_export(work, args, kwargs, dynamic)
        program = _onnx_program(ep, opset, type(model).__name__)
        feeds = _Inputs.build(work, ep, args, kwargs)
        output_names = _output_names(expected)
        _name_graph(program, feeds, output_names, dynamic)
        staged = stage / dest.name
        try:
            program.save(staged)
        except Exception as exc:
            raise ExportError(f"could not write the ONNX file {dest}: {_first_line(exc)}") from exc
        _check_written_opset(staged, opset)
        cases = [(feeds.example, expected)]
        other = feeds.other() if dynamic else None
        if other is not None:
            try:
                cases.append((other, run_module(work, *feeds.split(other))))
            except Exception as exc:  # the model itself rejects the derived shape: check the example only
                log.warning("the model raises on derived inputs %s (%s); ONNX parity checked on the example only",
                            {n: tuple(t.shape) for n, t in other.items()}, _first_line(exc))
        max_error = _parity(staged, feeds, cases, output_names, "ONNX file")
        if optimize:
            staged_opt = stage / opt_dest.name
            _ort_optimize(staged, staged_opt)
            max_error = max(max_error, _parity(staged_opt, feeds, cases, output_names, "optimised ONNX file"))
        _commit(stage, dest.parent, last=[n for n in (opt_dest.name, dest.name) if (stage / n).exists()])
    log.info("exported %s to %s (max relative error %.2e)", type(model).__name__, dest, max_error)
    return ExportInfo(dest, opt_dest if optimize else None, feeds.names, output_names, max_error)


def export_for_timing(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                      path: str | os.PathLike[str], deployed: bool = False) -> Path:
    """Export ``model`` to ``path`` for timing, with one parity check (on the example inputs).

    With ``deployed=False`` the shapes of ``model(*args, **kwargs)`` are fixed (any batch, 1 too): about a third
    of :func:`export_onnx`'s time (no dynamic axes, no exporter-side graph optimisation — ONNX Runtime optimises
    the graph when it loads it). A file to time, not to ship: it accepts only these shapes. With
    ``deployed=True`` it is the file :func:`export_onnx` writes (dynamic batch and sequence axes, the exporter's
    optimisation; the example batch must hold at least 2), without its second parity check and optimised copy:
    what a user ships, so what a latency budget should time. The two can differ by several per cent in ONNX
    Runtime (shape-specialised planning of the fixed file).

    Raises:
        ExportError: as :func:`export_onnx` (the model cannot be exported, or ONNX Runtime differs from PyTorch).

    Example:
        >>> import tempfile, torch
        >>> from upop_fx.runtime.export import export_for_timing
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     export_for_timing(layer, (torch.randn(1, 5, 16),), {}, f"{d}/layer.onnx").name
        'layer.onnx'
    """
    dest = _check_destination(path)
    work = _eval_copy(model)
    expected = run_module(work, args, kwargs)
    ep = _torch_export(work, args, kwargs, dynamic=deployed)
    program = _onnx_program(ep, None, type(model).__name__, optimize=deployed)
    feeds = _Inputs.build(work, ep, args, kwargs)
    output_names = _output_names(expected)
    _name_graph(program, feeds, output_names, dynamic=deployed)
    try:
        program.save(dest)
    except Exception as exc:
        raise ExportError(f"could not write the ONNX file {dest}: {_first_line(exc)}") from exc
    _parity(dest, feeds, [(feeds.example, expected)], output_names, "ONNX file for timing")
    return dest


# ---------------------------------------------------------------------------------------------- checks

def _check_opset(opset: int | None) -> int | None:
    if opset is None:
        return None
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ConfigError(
            f"opset {opset!r} is not supported by the dynamo ONNX exporter; choose one of "
            f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (or None for its default)"
        )
    return opset


def _check_destination(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    dest = Path(path).expanduser().absolute()
    if dest.is_dir():
        raise ExportError(f"cannot write the ONNX file {dest}: it is a directory")
    if not dest.parent.is_dir():
        raise ExportError(f"cannot write the ONNX file {dest}: directory {dest.parent} does not exist")
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write the ONNX file {dest}: directory {dest.parent} is not writable")
    return dest


def _check_written_opset(file: Path, opset: int | None) -> None:
    if opset is None:
        return
    import onnx

    got = {o.version for o in onnx.load(str(file), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")}
    if got != {opset}:
        raise ExportError(f"asked for opset {opset}, the exporter wrote opset {sorted(got)}")


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter colours its messages
    return text.splitlines()[0] if text else type(exc).__name__


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from`` chain: the exporter wraps the real reason (e.g. "No ONNX
    function found for <OpOverload ...>") in a generic ConversionError."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    work = copy.deepcopy(model)
    try:
        work.eval()
    except Exception:  # a GraphModule from ExportedProgram.module() may refuse .eval()
        from torch.ao.quantization import move_exported_model_to_eval

        work = move_exported_model_to_eval(work)
    return work


# ---------------------------------------------------------------------------------------------- staging

@contextlib.contextmanager
def _staging(directory: Path) -> Iterator[Path]:
    """A temporary directory beside the destination (same file system, so ``os.replace`` is atomic); removed
    with whatever it still holds, on success and on failure."""
    try:
        stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=directory))
    except OSError as exc:
        raise ExportError(f"cannot write to directory {directory}: {exc.strerror or exc}") from exc
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(stage: Path, directory: Path, last: list[str]) -> None:
    """Move every staged file into ``directory``: external-data files first, the model files (``last``) last,
    so that a reader never finds a model file without its weights."""
    files = sorted(p.name for p in stage.iterdir() if p.name not in last) + last
    moved: list[Path] = []
    try:
        for name in files:
            os.replace(stage / name, directory / name)
            moved.append(directory / name)
    except OSError as exc:
        for p in moved:
            p.unlink(missing_ok=True)
        raise ExportError(f"could not move the ONNX files into {directory}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------------------------------- export

def _torch_export(work: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                  dynamic: bool) -> torch.export.ExportedProgram:
    spec = dynamic_shapes(work, args, kwargs) if dynamic else None
    try:
        return torch.export.export(work, args, kwargs, strict=False, dynamic_shapes=spec)
    except Exception as exc:
        raise ExportError(
            f"torch.export could not capture {type(work).__name__} for ONNX export: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def _onnx_program(ep: torch.export.ExportedProgram, opset: int | None, model_name: str, optimize: bool = True) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(ep, (), dynamo=True, opset_version=opset, optimize=optimize, verbose=False)
    except Exception as exc:
        root = _root_cause(exc)
        raise ExportError(
            f"the ONNX exporter could not translate {model_name}: {type(root).__name__}: {_first_line(root)}"
        ) from exc


def _name_graph(program: Any, feeds: _Inputs, output_names: list[str], dynamic: bool) -> None:
    """Name the ONNX inputs/outputs and the dynamic axes (``batch``, ``seq``, ``<input>_seq``)."""
    graph = program.model.graph
    if len(graph.inputs) != len(feeds.names):
        raise ExportError(
            f"the ONNX graph has {len(graph.inputs)} inputs, the example inputs hold {len(feeds.names)} tensors"
        )
    if len(graph.outputs) != len(output_names):
        raise ExportError(
            f"the ONNX graph has {len(graph.outputs)} outputs, the PyTorch output holds {len(output_names)} "
            f"tensors ({', '.join(output_names)})"
        )
    targets = list(zip(graph.inputs, feeds.names)) + list(zip(graph.outputs, output_names))
    mine = {id(v) for v, _ in targets}
    wanted = {n for _, n in targets}
    for value in _all_values(graph):  # an inner value that already holds a wanted name gives it up
        if id(value) not in mine and value.name in wanted:
            value.name = f"{value.name}__inner"
    for value, name in targets:
        value.name = name
    if not dynamic:
        feeds.set_dynamic_axes({name: [] for name in feeds.names})
        return
    rename: dict[str, str] = {}
    seq_symbol: str | None = None
    dynamic_axes: dict[str, list[int]] = {name: [] for name in feeds.names}
    for value, name in zip(graph.inputs, feeds.names):
        for axis in feeds.dynamic_axes(name):
            dim = value.shape[axis] if value.shape is not None else None
            if dim is None or isinstance(dim, int) or not isinstance(getattr(dim, "value", None), str):
                if axis == 0:
                    raise ExportError(
                        f"torch.export fixed the batch axis of input {name!r} to {dim}: the model's code does not "
                        "work for other batch sizes; export with dynamic=False"
                    )
                log.warning("torch.export fixed axis %d of input %r to %s; it stays static in the ONNX file",
                            axis, name, dim)
                continue
            symbol = dim.value
            dynamic_axes[name].append(axis)
            if symbol in rename:
                continue
            if axis == 0:
                rename[symbol] = "batch"
            elif seq_symbol is None:
                seq_symbol, rename[symbol] = symbol, "seq"
            else:
                rename[symbol] = f"{name}_seq"
    program.rename_axes(rename)
    feeds.set_dynamic_axes(dynamic_axes)


def _all_values(graph: Any) -> Iterator[Any]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _output_names(output: Any) -> list[str]:
    """``output_0..`` for a tensor or a tuple; field names (``a.b`` when nested) for a dict / ModelOutput."""
    leaves = [(p, v) for p, v in pytree.tree_flatten_with_path(output)[0] if isinstance(v, torch.Tensor)]
    if not leaves:
        raise ExportError("the model returns no tensor")
    names = []
    for i, (path, _) in enumerate(leaves):
        parts = []
        for k, key in enumerate(path):
            if isinstance(key, pytree.MappingKey):
                parts.append(str(key.key))
            elif isinstance(key, pytree.GetAttrKey):
                parts.append(key.name)
            elif isinstance(key, pytree.SequenceKey):
                parts.append(f"output_{key.idx}" if k == 0 else str(key.idx))
            else:
                parts.append(str(key))
        names.append(".".join(parts) if parts else f"output_{i}")
    if len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(names))]
    return names


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class _Inputs:
    """The tensor inputs by ONNX name, and how to rebuild ``(args, kwargs)`` from a feed."""

    names: list[str]
    example: dict[str, torch.Tensor]
    roles: dict[str, str]  # forward-parameter name (for spotting attention masks)
    structure: Any  # pytree spec of (args, kwargs)
    leaves: list[Any]  # the example leaves (non-tensors kept as they are)
    ranges: dict[str, tuple[int, int]]  # "name:axis" -> (lower, upper) allowed by torch.export
    _axes: dict[str, list[int]]

    @classmethod
    def build(cls, work: torch.nn.Module, ep: torch.export.ExportedProgram,
              args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Inputs:
        flat, structure = pytree.tree_flatten_with_path((args, kwargs))
        try:
            bound = inspect.signature(work.forward).bind(*args, **kwargs).arguments
            by_id = {id(v): k for k, v in bound.items() if isinstance(v, torch.Tensor)}
        except (TypeError, ValueError):
            by_id = {}
        names, example, roles, axes = [], {}, {}, {}
        for path, leaf in flat:
            if not isinstance(leaf, torch.Tensor):
                continue
            top = path[1]
            if path[0].idx == 0:  # positional
                name = f"input_{top.idx}"
            else:
                name = str(top.key)
            rest = [str(getattr(k, "idx", getattr(k, "key", k))) for k in path[2:]]
            name = "_".join([name, *rest])
            names.append(name)
            example[name] = leaf
            roles[name] = by_id.get(id(leaf), name if path[0].idx == 1 else "")
            axes[name] = _axes_of(leaf)
        ranges = _symbol_ranges(ep, names)
        leaves = [leaf for _, leaf in flat]
        return cls(names, example, roles, structure, leaves, ranges, axes)

    def dynamic_axes(self, name: str) -> list[int]:
        """The axes of input ``name`` made dynamic (requested; after export: the ones the file keeps symbolic)."""
        return self._axes[name]

    def set_dynamic_axes(self, axes: dict[str, list[int]]) -> None:
        self._axes = {name: list(axes.get(name, [])) for name in self.names}

    def split(self, feed: dict[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        it = iter(feed[n] for n in self.names)
        leaves = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.structure)
        return tuple(args), dict(kwargs)

    def other(self) -> dict[str, torch.Tensor] | None:
        """The example with batch + 1 and every dynamic sequence axis + 3 (within torch.export's ranges):
        token ids repeated from the example (so they stay valid), attention masks all ones, floats drawn anew."""
        gen = torch.Generator().manual_seed(0)
        sizes: dict[tuple[str, int], int] = {}
        for name in self.names:
            t = self.example[name]
            for axis in self._axes[name]:
                lo, hi = self.ranges.get(f"{name}:{axis}", (1, math.inf))
                n = int(t.shape[axis])
                steps = (1, -1) if axis == 0 else (3, -3, 1, -1)
                sizes[(name, axis)] = next((n + s for s in steps if max(lo, 1) <= n + s <= hi), n)
        if all(sizes[(name, ax)] == self.example[name].shape[ax] for name in self.names for ax in self._axes[name]):
            return None
        out = {}
        for name in self.names:
            t = self.example[name]
            shape = list(t.shape)
            for axis in self._axes[name]:
                shape[axis] = sizes[(name, axis)]
            if t.is_floating_point() or t.is_complex():
                std = float(t.float().std()) if t.numel() > 1 else 1.0
                new = torch.randn(shape, generator=gen) * (std if math.isfinite(std) and std > 0 else 1.0)
                out[name] = (new + t.float().mean()).to(t.dtype)
            elif "mask" in self.roles[name].lower():
                out[name] = torch.ones(shape, dtype=t.dtype)
            else:  # repeat rows / columns of the example: ids stay valid
                new = t
                for axis in self._axes[name]:
                    idx = torch.arange(shape[axis]) % t.shape[axis]
                    new = new.index_select(axis, idx)
                out[name] = new.contiguous()
        return out


def _axes_of(t: torch.Tensor) -> list[int]:
    """The axes :func:`upop_fx.capture.program.dynamic_shapes` makes dynamic."""
    if t.dim() == 0:
        return []
    is_tokens = not t.is_floating_point() and t.dim() == 2
    is_sequence = t.is_floating_point() and t.dim() == 3
    return [0, 1] if (is_tokens or is_sequence) and t.shape[1] > 1 else [0]


def _symbol_ranges(ep: torch.export.ExportedProgram, names: list[str]) -> dict[str, tuple[int, int]]:
    """``"input:axis" -> (lower, upper)`` of the symbolic sizes, from torch.export's range constraints."""
    users = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
             and isinstance(n.meta.get("val"), torch.Tensor)]
    ranges: dict[str, tuple[int, int]] = {}
    if len(users) != len(names):
        return ranges
    constraints = {str(k): v for k, v in ep.range_constraints.items()}
    for name, node in zip(names, users):
        val = node.meta.get("val")
        for axis, size in enumerate(getattr(val, "shape", ())):
            vr = constraints.get(str(size.node.expr)) if isinstance(size, torch.SymInt) else None
            if vr is not None:
                ranges[f"{name}:{axis}"] = (_finite(vr.lower, 1), _finite(vr.upper, math.inf))
    return ranges


def _finite(bound: Any, default: float) -> Any:
    """An integer bound of a torch.export value range, or ``default`` for ±infinity (``int_oo``)."""
    import sympy

    return int(bound) if isinstance(bound, (int, sympy.Integer)) else default


# ---------------------------------------------------------------------------------------------- ONNX Runtime

def _ort_optimize(src: Path, dst: Path) -> None:
    """ONNX Runtime's extended level (the transformer fusions), saved: portable across CPUs, unlike the
    ``ORT_ENABLE_ALL`` layout transforms, which ORT applies again when the file is loaded."""
    try:
        ort_session(src, level="extended", optimized_path=dst)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime could not optimise {src.name}: {_first_line(exc)}") from exc
    if not dst.exists():
        raise ExportError(f"ONNX Runtime did not write the optimised model {dst.name}")


def _parity(file: Path, feeds: _Inputs, cases: list[tuple[dict[str, torch.Tensor], Any]],
            output_names: list[str], what: str) -> float:
    try:
        sess = ort_session(file)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load the {what}: {_first_line(exc)}") from exc
    onnx_inputs = [i.name for i in sess.get_inputs()]
    worst = 0.0
    for feed, expected in cases:
        shapes = ", ".join(f"{n}{tuple(feed[n].shape)}" for n in feeds.names)
        try:
            got = sess.run(output_names, {n: feed[n].detach().cpu().numpy() for n in onnx_inputs})
        except Exception as exc:
            raise ExportError(f"ONNX Runtime fails on the {what} with inputs {shapes}: {_first_line(exc)}") from exc
        want = [v for v in pytree.tree_leaves(expected) if isinstance(v, torch.Tensor)]
        for name, a, b in zip(output_names, got, want):
            b = b.detach().cpu().numpy()
            if a.shape != b.shape:
                raise ExportError(f"output {name!r} of the {what} has shape {a.shape}, PyTorch {b.shape} "
                                  f"(inputs {shapes})")
            err = relative_error(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b)))
            if not err <= PARITY_TOLERANCE:
                raise ExportError(f"output {name!r} of the {what} differs from PyTorch: relative error {err:.3g} "
                                  f"> {PARITY_TOLERANCE:g} (inputs {shapes})")
            worst = max(worst, err)
    log.debug("%s parity: max relative error %.3g", what, worst)
    return worst
