"""Capture: ``nn.Module`` → ``torch.fx.GraphModule`` with torch.export (non-strict, default IR).

The batch axis (axis 0 of every tensor input: one shared ``Dim("batch")``, since the inputs of one call share
their batch) and the sequence axis (axis 1 of integer token tensors of rank 2 and of float tensors of rank 3) are
made dynamic, so the captured graph — and everything made from it — runs at other batch sizes and sequence
lengths than the example's. Where the model fixes the batch size (a literal batch in a reshape), capture falls
back to one automatic batch dim per input; every other axis is captured at the example's size, and the graph
refuses another size there (or on a batch or sequence axis the model's code fixed) with an
:class:`~upop_fx.errors.InputError` naming the input, the axis and the size. A model whose config asks for a KV cache (``use_cache=True``, every
Hugging Face decoder's default) is captured without it: the cache is an inference-time output, not part of the
function being pruned. Non-contiguous example tensors are captured as contiguous copies (torch.export guards an
input's strides), and a keyword input the forward does not take is refused before capture. When torch.export
fails, the :class:`~upop_fx.errors.CaptureError` names the model's source line it failed on.

Example:
    >>> import torch
    >>> from upop_fx import capture
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> cap = capture(layer, torch.randn(2, 5, 16))
    >>> cap.gm(torch.randn(3, 7, 16)).shape
    torch.Size([3, 7, 16])
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import linecache
import logging
import os
import re
import sysconfig
import traceback
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..errors import CaptureError, InputError
from ..logs import quietly
from .filled_buffers import fill_to_cat

__all__ = [
    "CAPTURE_KEY", "CaptureInfo", "Captured", "capture", "get_capture", "export_program", "normalize_inputs",
    "run_module", "dynamic_shapes", "batch_size_of", "cache_off", "is_sequence", "sequence_lengths", "FixedSize", "fixed_sizes",
    "static_sizes",
    "guard_fixed_sizes", "unknown_keywords", "capture_failure", "PROMPT_INPUTS", "prompt_ids",
]

log = logging.getLogger(__name__)

#: ``gm.meta`` key holding the :class:`CaptureInfo` of a captured graph (kept by every pass that copies it).
CAPTURE_KEY = "upop_capture"


@dataclass
class CaptureInfo:
    """What capture records for later passes, under ``gm.meta[CAPTURE_KEY]``: how to call the graph on the
    example inputs, the example batch size, and which input axes are dynamic (``torch.export``'s spec)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    batch_size: int
    dynamic_shapes: Any
    model_name: str
    #: input axes asked to be dynamic that the model's code fixed (torch.export made them constants)
    fixed: list[FixedSize] = field(default_factory=list)
    #: input axes capture never asks to vary: the graph runs at the example's size there
    static: list[FixedSize] = field(default_factory=list)


@dataclass(frozen=True)
class FixedSize:
    """An input axis at which the captured graph runs only at ``size``: one capture asked to keep dynamic (batch,
    sequence) that the model's code fixed (``asked``), or one capture never asks to vary (a feature or image
    axis: ``asked=False``). ``input``: the forward's parameter (or keyword) name; ``position``: its index among
    the positional inputs, or None for a keyword input."""

    input: str
    position: int | None
    axis: int
    size: int
    #: the model's line that fixed it (``file:line: code``), where torch.export's guard was added from it
    source: str | None = None
    asked: bool = True

    def describe(self) -> str:
        if not self.asked:
            return f"size {self.size} on axis {self.axis} of input {self.input!r}"
        what = "batch" if self.axis == 0 else "sequence length"
        where = f", fixed by {self.source}" if self.source else ""
        return f"{what} {self.size} (input {self.input!r}, axis {self.axis}{where})"

    def value(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        """The size this axis has in a call, or None when the call lacks the input."""
        t = args[self.position] if self.position is not None and self.position < len(args) else kwargs.get(self.input)
        return int(t.shape[self.axis]) if isinstance(t, torch.Tensor) and t.dim() > self.axis else None


def _top_inputs(gm: torch.fx.GraphModule, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> list[tuple[str, int | None, torch.Tensor, torch.Tensor]]:
    """The top-level tensor inputs as ``(name, position, example, placeholder value)``: placeholders matched with
    the inputs in order, checked against their shapes (none where that order does not hold); an input nested in
    a container is left out."""
    leaves = [(path, t) for path, t in pytree.tree_flatten_with_path((args, kwargs))[0]
              if isinstance(t, torch.Tensor)]
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    if len(vals) != len(leaves):
        return []
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    out = []
    for (path, t), v in zip(leaves, vals):
        if v.dim() != t.dim() or any(is_concrete_int(d) and int(d) != e for d, e in zip(v.shape, t.shape)):
            return []  # not the order assumed: say nothing rather than something wrong
        if len(path) != 2:
            continue
        top, key = path[0].idx, path[1]
        if top == 0:
            out.append((params[key.idx] if key.idx < len(params) else f"args[{key.idx}]", key.idx, t, v))
        else:
            out.append((str(key.key), None, t, v))
    return out


def fixed_sizes(gm: torch.fx.GraphModule, model: torch.nn.Module, args: tuple[Any, ...],
                kwargs: dict[str, Any], sources: Mapping[int, traceback.FrameSummary] | None = None) -> list[FixedSize]:
    """The axes of the top-level tensor inputs that capture asked to be dynamic but ``gm`` (``ep.module()``)
    holds as constants. ``sources``: constant → the model's frame that pinned a size to it
    (:func:`guard_sources`)."""
    out = []
    for name, position, t, v in _top_inputs(gm, model, args, kwargs):
        for axis in _dynamic_axes(t, None) or {}:
            if is_concrete_int(v.shape[axis]):  # an int, or a SymInt export pinned to a constant
                size = int(v.shape[axis])
                frame = (sources or {}).get(size)
                source = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}" if frame else None
                out.append(FixedSize(name, position, axis, size, source))
    return out


def static_sizes(gm: torch.fx.GraphModule, model: torch.nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> list[FixedSize]:
    """The axes of the top-level tensor inputs that capture never asks to vary (neither batch nor sequence) and
    ``gm`` holds as constants (not tied to a dynamic one): the graph runs only at the example's size there
    (``asked=False``)."""
    return [FixedSize(name, position, axis, int(t.shape[axis]), asked=False)
            for name, position, t, v in _top_inputs(gm, model, args, kwargs)
            for axis in range(t.dim())
            if axis not in (_dynamic_axes(t, None) or {}) and is_concrete_int(v.shape[axis])]


class _GuardSources(logging.Handler):
    """For each constant torch.export pins a symbolic size to (its "[guard added]" record of ``Eq(s, c)``), the
    innermost frame of the model's code on the stack when the guard was added."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.found: dict[int, traceback.FrameSummary] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if "[guard added]" not in str(record.msg) or not isinstance(record.args, tuple) or len(record.args) < 2:
            return
        m = re.fullmatch(r"Eq\((?:s\d+, (\d+)|(\d+), s\d+)\)", str(record.args[1]))
        if m is None:
            return
        frames = [f for f in traceback.extract_stack() if _is_user_file(f.filename)]
        if frames:
            self.found.setdefault(int(m[1] or m[2]), frames[-1])


@contextlib.contextmanager
def guard_sources() -> Iterator[dict[int, traceback.FrameSummary]]:
    """While torch.export runs in the block: constant → the model's frame that pinned a size to it (torch's
    symbolic-shapes INFO records, read here and not passed on)."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    handler = _GuardSources()
    level, propagate, handlers = logger.level, logger.propagate, logger.handlers
    logger.handlers = [handler]  # the records of the block go to this handler alone
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield handler.found
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)


def guard_fixed_sizes(gm: torch.nn.Module, fixed: list[FixedSize]) -> None:
    """Make ``gm`` refuse, with an :class:`~upop_fx.errors.InputError` naming the size, a call at another size
    on an axis its capture fixed (instead of torch's guard failure)."""
    if not fixed:
        return

    def check(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for f in fixed:
            got = f.value(args, kwargs)
            if got is None or got == f.size:
                continue
            if f.asked:
                raise InputError(f"this model runs only at {f.describe()}, got {got}: the model's code fixes that "
                                 "size (a literal in a reshape or a loop over it), so the capture could not keep it "
                                 "dynamic; compress it with inputs of the size you will run it at")
            raise InputError(f"this model was captured at {f.describe()}, got {got}: capture keeps the batch axis "
                             "and a sequence axis dynamic and every other axis at the example's size; compress it "
                             "with example inputs of the size you will run it at")

    gm.register_forward_pre_hook(check, with_kwargs=True, prepend=True)


@dataclass
class Captured:
    """What :func:`capture` returns: the graph module, and (as in ``gm.meta[CAPTURE_KEY]``) how to call it."""

    gm: torch.fx.GraphModule

    @property
    def info(self) -> CaptureInfo:
        return get_capture(self.gm)

    @property
    def args(self) -> tuple[Any, ...]:
        return self.info.args

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.info.kwargs

    @property
    def batch_size(self) -> int:
        return self.info.batch_size


def get_capture(gm: torch.nn.Module) -> CaptureInfo:
    """The :class:`CaptureInfo` of ``gm``; raises ``LookupError`` when ``gm`` was not made by :func:`capture`."""
    info = getattr(gm, "meta", {}).get(CAPTURE_KEY)
    if not isinstance(info, CaptureInfo):
        raise LookupError("this graph carries no capture record (gm.meta['upop_capture']): make it with upop_fx.capture")
    return info


def batch_size_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The batch size (axis 0) shared by the tensor inputs."""
    return next(int(t.shape[0]) for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.dim() > 0)


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn a tensor, a tuple/list of positional args, or a dict of keyword args into ``(args, kwargs)``, with
    every non-contiguous tensor (anywhere in them) replaced by a contiguous copy: torch.export guards the strides
    of its inputs, so a strided example would give a graph that refuses contiguous inputs. The caller's tensors
    are not touched."""
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise InputError(
            f"example_inputs must be a tensor, a tuple of positional args or a dict of keyword args, "
            f"not {type(example_inputs).__name__}"
        )
    tensors = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    if not tensors:
        raise InputError("example_inputs contain no tensor")
    batch = {int(t.shape[0]) for t in tensors if t.dim() > 0}
    if len(batch) != 1:
        raise InputError(f"every tensor input needs the same batch size on axis 0; found sizes {sorted(batch)}")
    if batch.pop() < 2:
        raise InputError("the example batch must hold at least 2 samples, or torch.export specialises the batch size")
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.contiguous, (args, kwargs))


def unknown_keywords(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> tuple[str, bool] | None:
    """``(message, certain)`` when ``kwargs`` has keys ``model.forward`` does not take, else None.

    A forward without ``**kwargs`` takes only its named parameters (``certain``); one whose ``**kwargs`` is typed
    ``Unpack[SomeTypedDict]`` (as in Hugging Face models) also takes that dict's keys, but a wrapper may consume
    more, so there ``certain`` holds only when an unknown key is close to a name the forward takes (a typo). A
    forward with an untyped ``**kwargs`` takes anything: None."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_kw = next((p for p in params.values() if p.kind is p.VAR_KEYWORD), None)
    typed = _typed_kwargs(var_kw.annotation) if var_kw is not None else None
    if var_kw is not None and typed is None:
        return None
    extra = sorted((typed.__required_keys__ | typed.__optional_keys__) - set(names)) if typed is not None else []
    unknown = [k for k in kwargs if k not in names and k not in extra]
    if not unknown:
        return None
    forward = f"{type(model).__name__}.forward"
    close = {k: m[0] for k in unknown if (m := difflib.get_close_matches(k, [*names, *extra], n=1))}
    some = "s" if len(unknown) > 1 else ""
    keys = ", ".join(repr(k) for k in unknown)
    guesses = "; ".join(f"did you mean {m!r}" + (f" for {k!r}" if len(unknown) > 1 else "") + "?"
                        for k, m in close.items())
    takes = ", ".join(names) + (f", and in **kwargs the keys of {typed.__name__}: {', '.join(extra)}" if extra else "")
    message = (f"example_inputs key{some} {keys}: unexpected keyword argument{some} of {forward}"
               + (f" ({guesses})" if guesses else "") + f". {forward} takes {takes}")
    return message, typed is None or bool(close)


def _typed_kwargs(annotation: Any) -> Any:
    """The TypedDict of a ``**kwargs: Unpack[TypedDict]`` annotation (Python 3.11 on), else None."""
    unpack = getattr(typing, "Unpack", None)
    if unpack is None or typing.get_origin(annotation) is not unpack:
        return None
    (inner,) = typing.get_args(annotation)
    return inner if typing.is_typeddict(inner) else None


def run_module(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return module(*args, **kwargs)


def is_sequence(t: torch.Tensor) -> bool:
    """An input whose axis 1 is a sequence: token ids (2-D integers) or a sequence of vectors (3-D floats)."""
    return (not t.is_floating_point() and t.dim() == 2) or (t.is_floating_point() and t.dim() == 3)


#: the inputs of a prompt: a model called with these alone continues a text (its KV cache, its ``generate``)
PROMPT_INPUTS = frozenset({"input_ids", "attention_mask"})


def prompt_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The ``(batch, tokens)`` ids of a call made with a prompt alone (keyword inputs among
    :data:`PROMPT_INPUTS`: no image, no encoder input; ``labels`` for training's sake, which generation does not
    read); None for any other call."""
    ids = kwargs.get("input_ids")
    if args or not set(kwargs) - {"labels"} <= PROMPT_INPUTS or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    return ids


def sequence_lengths(info: CaptureInfo) -> set[int]:
    """The lengths (axis 1) of the captured example's sequence inputs (:func:`is_sequence`); empty for a model
    with none, e.g. an image model."""
    leaves = pytree.tree_leaves((info.args, info.kwargs))
    return {int(t.shape[1]) for t in leaves if isinstance(t, torch.Tensor) and is_sequence(t)}


def _dynamic_axes(t: Any, batch: Any) -> dict[int, Any] | None:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    axes: dict[int, Any] = {0: batch}
    if is_sequence(t) and t.shape[1] > 1:
        axes[1] = Dim.AUTO
    return axes


def dynamic_shapes(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], shared: bool = True) -> Any:
    """Dynamic-shape spec keyed by the forward's parameter names (what torch.export expects for kwargs).

    ``shared``: axis 0 of every input is one ``Dim("batch")``; otherwise each input gets its own ``Dim.AUTO``."""
    batch = Dim("batch") if shared else Dim.AUTO
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise InputError(f"example_inputs do not match {type(model).__name__}.forward: {exc}") from exc
    spec: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = bound.signature.parameters[name]
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(_dynamic_axes(v, batch) for v in value)
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: _dynamic_axes(v, batch) for k, v in value.items()}
        else:
            spec[name] = _dynamic_axes(value, batch)
    return spec


@quietly
def capture(model: torch.nn.Module, example_inputs: Any) -> Captured:
    """Capture ``model`` called on ``example_inputs`` as a GraphModule (the model itself is not touched).

    Raises:
        InputError: the inputs are malformed, have a key the forward does not take, or the model raises on them.
        CaptureError: torch.export fails; the message names the model's source line and carries export's reason.
    """
    with guard_sources() as sources:
        ep, args, kwargs, spec = export_program(model, example_inputs)
    gm = ep.module()
    filled = fill_to_cat(gm)  # a buffer written piece by piece (DeepSeek's key): the cat it computes
    if filled:
        log.debug("capture: %d buffer(s) filled by slice copies rewritten to cat", filled)
    fixed = fixed_sizes(gm, model, args, kwargs, sources)
    static = static_sizes(gm, model, args, kwargs)
    gm.meta[CAPTURE_KEY] = CaptureInfo(args, kwargs, batch_size_of(args, kwargs), spec, type(model).__name__, fixed,
                                       static)
    guard_fixed_sizes(gm, fixed + static)
    log.info("captured %s: %d graph nodes", type(model).__name__, len(gm.graph.nodes))
    for f in fixed:
        log.info("%s runs only at %s: its code fixes that size, so the captured graph cannot vary it",
                 type(model).__name__, f.describe())
    return Captured(gm)


def export_program(
    model: torch.nn.Module, example_inputs: Any
) -> tuple[torch.export.ExportedProgram, tuple[Any, ...], dict[str, Any], Any]:
    """``torch.export`` of a deep copy of ``model`` in eval mode, with dynamic batch and sequence axes:
    ``(program, args, kwargs, dynamic_shapes)``."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    unknown = unknown_keywords(model, kwargs)
    if unknown is not None and unknown[1]:
        raise InputError(unknown[0])
    work = copy.deepcopy(model).eval()
    with cache_off(work, note=True):
        return _export(model, work, args, kwargs, unknown[0] if unknown is not None else None)


def _export(model: torch.nn.Module, work: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            unknown: str | None = None) -> tuple[torch.export.ExportedProgram, tuple[Any, ...], dict[str, Any], Any]:
    try:
        run_module(work, args, kwargs)
    except Exception as exc:  # the model's own error, re-raised with context
        if unknown is not None:
            raise InputError(f"{unknown}\n(the model raises on example_inputs: {type(exc).__name__}: {exc})") from exc
        raise InputError(f"the model raises on example_inputs: {type(exc).__name__}: {exc}") from exc
    if unknown is not None:
        log.warning("%s (the model runs with it: it is passed on in **kwargs, where a wrapper may take it or the "
                    "model ignore it)", unknown)
    dynamic = dynamic_shapes(work, args, kwargs)
    try:
        try:
            ep = torch.export.export(work, args, kwargs, strict=False, dynamic_shapes=dynamic)
        except Exception as exc:  # the batch may be fixed by the model: one automatic dim per input then
            if not _is_constraint_error(exc):
                raise
            log.info("%s fixes its batch size under one shared batch dim (%s); capturing with one automatic "
                     "batch dim per input", type(model).__name__, str(exc).strip().splitlines()[0][:120])
            dynamic = dynamic_shapes(work, args, kwargs, shared=False)
            ep = torch.export.export(work, args, kwargs, strict=False, dynamic_shapes=dynamic)
    except Exception as exc:
        raise CaptureError(capture_failure(type(model).__name__, exc)) from exc
    return ep, args, kwargs, dynamic


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # upop_fx/
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "DataDependentOutputException", "DynamicOutputShapeException")
_DATA_DEPENDENT_HINT = (
    "hint: a Python branch or size taken from a tensor's values (`if`/`while` on a tensor, bool(), int(), "
    ".item()) cannot be captured: "
    "compute both results and pick with torch.where(cond, a, b), or branch with torch.cond(pred, true_fn, "
    "false_fn); or set the model option that avoids the branch."
)
#: Lines of torch's messages that advise torch's own developers (logging switches), left out of the excerpt.
_TORCH_ADVICE = ("consider using", "caused by:", "for more", "for extended", "if you suspect", "for c++", "the error above")


def capture_failure(model_name: str, exc: BaseException) -> str:
    """The message of a failed ``torch.export`` of ``model_name``: where in the model's source it failed (file,
    line and the line's text), a hint for the common cause, and an excerpt of torch's message (the full message
    and traceback stay on the exception chained as ``__cause__``)."""
    chain = _chain(exc)
    frame = _user_frame(chain)
    where = f" at {frame.filename}:{frame.lineno} in {frame.name}" if frame is not None else ""
    lines = [f"torch.export could not capture {model_name}: {type(exc).__name__}{where}"]
    if frame is not None and frame.line:
        lines.append(f"    {frame.line.strip()}")
    if any(type(e).__name__ in _DATA_DEPENDENT or "data-dependent" in str(e) for e in chain):
        lines.append(_DATA_DEPENDENT_HINT)
    first = str(exc).strip().split("\n\n")[0]  # torch's reason; then its debugging advice and the stack
    excerpt = [line.strip() for line in first.splitlines()
               if line.strip() and not line.strip().lower().startswith(_TORCH_ADVICE)]
    if excerpt:
        text = " ".join(excerpt[:3])
        lines.append(f"torch: {text[:500]}{' ...' if len(text) > 500 or len(excerpt) > 3 else ''}")
    return "\n".join(lines)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _user_frame(chain: list[BaseException]) -> traceback.FrameSummary | None:
    """The innermost frame, in the innermost exception that has one, of code outside torch, the standard library
    and this module: the model's line torch.export failed on. Falls back on the ``File "...", line N`` torch
    writes into some messages."""
    for exc in reversed(chain):
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_user_file(f.filename)]
        if frames:
            return frames[-1]
    for exc in chain:
        found = [m for m in re.finditer(r'File "([^"]+)", line (\d+), in (\S+)', str(exc)) if _is_user_file(m[1])]
        if found:
            path, lineno, name = found[-1].groups()
            return traceback.FrameSummary(path, int(lineno), name, line=linecache.getline(path, int(lineno)))
    return None


def _is_user_file(path: str) -> bool:
    """A file of the model's code: not torch's, the standard library's (installed packages are) or upop_fx's."""
    if path.startswith(("<", _TORCH_DIR, _PACKAGE_DIR)):
        return False
    return not path.startswith(_STDLIB_DIR) or "site-packages" in path or "dist-packages" in path


def _is_constraint_error(exc: Exception) -> bool:
    """A dynamic-shape constraint the model breaks (it specialises or restricts a Dim we declared)."""
    return type(exc).__name__ in ("UserError", "ConstraintViolationError") and (
        "Constraints violated" in str(exc) or "specializ" in str(exc) or "batch" in str(exc)
    )


@contextlib.contextmanager
def cache_off(module: torch.nn.Module, note: bool = False) -> Iterator[None]:
    """Run the block with ``config.use_cache`` off on ``module`` and every submodule's config (the text or
    decoder config of a composite model too), restored afterwards: a KV cache is an inference-time output that
    torch.export cannot return and that pruning and retraining do not need. ``note``: say so at INFO, for a
    model that generates (an encoder's config may carry ``use_cache`` too: not worth a line)."""
    configs = {id(c): c for m in module.modules() if (c := getattr(m, "config", None)) is not None}
    turned = []
    for c in configs.values():
        for sub in [c, *(getattr(c, k) for k in ("text_config", "decoder", "language_config") if hasattr(c, k))]:
            if getattr(sub, "use_cache", False) is True:
                sub.use_cache = False
                turned.append(sub)
    can_generate = getattr(module, "can_generate", None)
    if turned and note and callable(can_generate) and can_generate():
        log.info("captured %s with use_cache=False (the KV cache is not part of the pruned function)",
                 type(module).__name__)
    try:
        yield
    finally:
        for sub in turned:
            sub.use_cache = True
