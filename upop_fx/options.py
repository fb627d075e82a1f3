"""Every option of a run, defined once: :class:`Options`.

``compress(**options)``, ``UPop(**options)``, ``pipeline.run``, the checkpoint's record of a run and the
``upop-fx compress`` flags are all built from the fields below. A field's ``doc`` is the one place the option is
explained; its ``check`` is the one place it is validated, when an :class:`Options` is made — before anything
slow runs. Adding an option is adding one field.

Example:
    >>> from upop_fx.options import Options
    >>> opts = Options(ratio=0.3, budget="latency")
    >>> opts.resolved_runtime, opts.resolved_granularity    # None: the budget's default
    ('onnxruntime-cpu', 'heads+dims')
    >>> Options.make(None, serch_steps=10)
    Traceback (most recent call last):
    ...
    upop_fx.errors.ConfigError: unknown option 'serch_steps' (did you mean 'search_steps'?); the options are the fields of upop_fx.Options
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnxruntime
import torch

from .errors import ConfigError

__all__ = [
    "cache_root",
    "Options", "GROUPS", "METHODS", "BUDGETS", "GRANULARITIES", "SCORES", "FIRST_MARKINGS", "ALLOCATIONS", "PRECISIONS",
    "SCHEDULES",
    "RUNTIMES", "LATENCY_PHASES", "check_choice", "check_int", "check_runtime", "check_latency_shape", "resolve_granularity",
]  # fmt: skip


def cache_root() -> str:
    """Where upop_fx keeps what it measures or converts once (latency tables, a model's plain copy):
    ``$UPOP_FX_CACHE``, else ``~/.cache/upop_fx``."""
    return os.environ.get("UPOP_FX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "upop_fx")


METHODS = ("upop", "magnitude", "activation")
BUDGETS = ("params", "flops", "latency")
GRANULARITIES = ("upop", "qk_v", "heads", "heads+dims")
SCORES = ("gradient", "sensitivity")
#: how UPop's first marking (step 0, before any mask gradient carries a signal) ranks the entries
FIRST_MARKINGS = ("magnitude", "activation")
#: the allocations selectable by name (their functions: :data:`upop_fx.search.strategy.ALLOCATORS`)
ALLOCATIONS = ("unified", "uniform", "per_cost")
PRECISIONS = ("fp32", "bf16", "fp16")
#: the retrain's learning-rate schedules (:func:`upop_fx.training.loop.lr_factor`)
SCHEDULES = ("constant", "cosine")
RUNTIMES = ("onnxruntime-cpu", "torch-cpu", "torch-cuda", "onnxruntime-cuda")
#: what a latency budget times: one call of the model ("forward": an encoder's call, a decoder's prefill) or one
#: generated token per sequence ("decode")
LATENCY_PHASES = ("forward", "decode")
#: the sections of :class:`Options` (the CLI's argument groups, in this order)
GROUPS = ("search", "training", "latency", "outputs")


# ------------------------------------------------------------------ checks (one per kind of value)
def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise :class:`~upop_fx.errors.ConfigError` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


_KIND = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}


def check_int(name: str, value: object, minimum: int | None = None) -> None:
    """Raise :class:`~upop_fx.errors.ConfigError` unless ``value`` is an int (not a bool) ``>= minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        kind = _KIND.get(minimum, f"an integer >= {minimum}")
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


def _ratio(name: str, value: object) -> None:
    if not 0.0 <= _number(name, value) < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")


def _non_negative(name: str, value: object) -> None:
    if not _number(name, value) >= 0:
        raise ConfigError(f"{name} must be a non-negative number, got {value!r}")


def _allocate(name: str, value: object) -> None:
    if value is None or callable(value):
        return
    if not isinstance(value, str) or value not in ALLOCATIONS:
        raise ConfigError(f"{name} must be one of {', '.join(ALLOCATIONS)} or a callable; got {value!r}")


_allocate.choices = ALLOCATIONS  # type: ignore[attr-defined]  # the CLI offers the names


def _optional_callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise ConfigError(f"{name} must be a callable or None, got {value!r}")


def _path(name: str, value: object) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def _optional_bool(name: str, value: object) -> None:
    if value is not None:
        _bool(name, value)


def check_runtime(name: str, value: object) -> None:
    """A runtime of :data:`RUNTIMES` that this machine has (None: the latency budget's default)."""
    if value is None:
        return
    check_choice(name, value, RUNTIMES)
    assert isinstance(value, str)
    if value.endswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{name} {value!r} needs a CUDA GPU, and torch sees none on this machine")
    if value == "onnxruntime-cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ConfigError(f"{name} 'onnxruntime-cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available)")


def check_latency_shape(name: str, value: object) -> None:
    """``None`` or ``(batch, seq)`` of positive ints (``seq`` may be None: the inputs' own length)."""
    if value is None:
        return

    def positive(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    ok = isinstance(value, (tuple, list)) and len(value) == 2 and positive(value[0])
    if not (ok and (value[1] is None or positive(value[1]))):  # type: ignore[index]
        raise ConfigError(f"{name} must be (batch, seq) with positive ints (seq may be None), got {value!r}")


def _parse_shape(text: str) -> tuple[int, int | None]:
    """``"8,128"`` → ``(8, 128)``; ``"8"`` or ``"8,none"`` → ``(8, None)`` (the CLI's form of latency_shape)."""
    batch, _, seq = text.partition(",")
    try:
        return int(batch), None if seq.strip().lower() in ("", "none") else int(seq)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"BATCH,SEQ expected (e.g. 8,128, or 8 for the inputs' own length), "
                                         f"got {text!r}") from exc


def _parse_callable(text: str) -> Callable[..., Any]:
    """``"package.module:function"`` → that function (the CLI's form of a callable option)."""
    module, _, name = text.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name) if module and name else None
    except (ImportError, AttributeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot import {text!r}: {exc}") from exc
    if not callable(fn):
        raise argparse.ArgumentTypeError(f"MODULE:FUNCTION naming a callable expected, got {text!r}")
    return fn


def resolve_granularity(granularity: str | None, budget: str) -> str:
    """The granularity a run uses: ``granularity``, or where it is None ``"heads+dims"`` under a latency budget
    (removing a head is what removes its softmax and score work) and ``"upop"`` under any other."""
    if granularity is not None:
        return granularity
    return "heads+dims" if budget == "latency" else "upop"


def _option(default: Any, group: str, doc: str, check: Callable[[str, Any], None], *, cli: bool = True,
            parse: Callable[[str], Any] | None = None, metavar: str | None = None, recorded: bool = True) -> Any:
    """A field of :class:`Options`: its default, section, explanation and check (and how the CLI reads it;
    ``recorded=False``: it changes nothing of the result, so a checkpoint's run record leaves it out)."""
    assert group in GROUPS, group
    meta = {"group": group, "doc": doc, "check": check, "cli": cli, "parse": parse, "metavar": metavar,
            "recorded": recorded}
    return field(default=default, metadata=meta)


def _choice(choices: tuple[str, ...], optional: bool = False) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not (optional and value is None):
            check_choice(name, value, choices)

    check.choices = choices  # type: ignore[attr-defined]  # the CLI offers them
    return check


def _int(minimum: int | None) -> Callable[[str, Any], None]:
    return lambda name, value: check_int(name, value, minimum)


@dataclass(frozen=True)
class Options:
    # (the class docstring is written from the fields' docs below, after the class)

    # ---------------------------------------------------------------- search: what goes, and how it is chosen
    ratio: float = _option(0.5, "search", "fraction of the prunable cost to remove, in [0, 1) (with "
                           "budget='latency': of the dense model's measured latency, so 0.5 asks for 2x)", _ratio)
    method: str = _option("upop", "search", "'upop': the unified progressive search (masks scored by their "
                          "accumulated gradients while the weights train); 'magnitude': a one-shot ranking by mean "
                          "|weight| that reads no data; 'activation': a one-shot ranking by |weight| x the norm of the "
                          "activation it multiplies, on the calibration batches", _choice(METHODS))
    budget: str = _option("params", "search", "the unit of cost: 'params', 'flops' (per sample, attention's T×T "
                          "terms included) or 'latency' (measured on `runtime`: see docs/latency.md)",
                          _choice(BUDGETS))
    granularity: str | None = _option(
        None, "search", "what one ranking entry removes: 'upop' (one head dim across every head and q/k/v), "
        "'qk_v' (q/k and v apart), 'heads' (whole heads) or 'heads+dims' (a layer's heads and head dims in one "
        "ranking). Default: 'heads+dims' with budget='latency', else 'upop'", _choice(GRANULARITIES, True))
    round_to: int = _option(1, "search", "keep head dims and MLP widths at multiples of this (the budget is still "
                            "met)", _int(1), metavar="N")
    allocate: Any = _option(
        None, "search", "how the ranking becomes a cut: 'unified' (one ranking over every layer and tower; "
        "default), 'uniform' (the same fraction of every layer), 'per_cost' (the unified ranking with each "
        "entry's importance divided by what removing it saves relative to its kind's average: under "
        "budget='latency' on the measured tables), or a "
        "callable "
        "allocate(importance, entries, structures, fraction) -> prune mask", _allocate)
    score: str = _option("gradient", "search", "how the UPop search ranks: 'gradient' (the signed accumulated mask "
                         "gradient, the paper's) or 'sensitivity' (accumulated |gradient|: prunes what the loss "
                         "never sees first)", _choice(SCORES))
    first_marking: str = _option(
        "magnitude", "search", "how the UPop search ranks its first marking (step 0, when distillation's mask "
        "gradients are still zero): 'magnitude' (mean |weight|) or 'activation' (|weight| x the norm of the "
        "activation it multiplies, on the calibration batches, which are then read before the search instead of "
        "after it; on the example inputs without data)", _choice(FIRST_MARKINGS))
    search_steps: int = _option(100, "search", "training steps of the UPop search (a data-free method reads none)",
                                _int(1), metavar="N")
    interval: int = _option(10, "search", "the UPop search re-selects the entries to prune every this many steps",
                            _int(1), metavar="N")
    seed: int = _option(0, "search", "results are deterministic for a seed and the same data; the caller's RNG "
                        "state is left as it was", _int(None))

    # ---------------------------------------------------------------- training: the search's and the retrain's
    lr: float = _option(1e-4, "training", "AdamW learning rate of the search and the retrain", _non_negative)
    retrain_steps: int = _option(100, "training", "fine-tuning steps of the dense small model after the cut "
                                 "(0: none)", _int(0), metavar="N")
    retrain_schedule: str = _option(
        "constant", "training", "the retrain's learning rate: 'constant' (lr throughout) or 'cosine' (a linear "
        "warm-up over the first tenth of the steps, then a cosine decay to 0)", _choice(SCHEDULES))
    layer_distillation: float = _option(
        1.0, "training", "weight of the layer-wise term of the search's and the retrain's distillation (when they "
        "distil: no loss_fn, no labels): the mean, over the residual stream right after each layer that may be (in "
        "the search) or was (in the retrain) cut, of each feature's squared error against the dense model's over "
        "the dense model's variance of it, added to the output distillation (upop_fx.training.layerwise); the default "
        "is what benchmarks/results/latency_layerwise says. 0: the outputs alone", _non_negative)
    task_loss_weight: float = _option(
        0.0, "training", "when the batches carry labels and the model returns its own .loss (a Hugging Face model): "
        "0 trains on that loss alone; w > 0 distils from the dense model (as without labels) and adds w times that "
        "loss, so that the data's own signal adds to the dense model's distributions instead of replacing them "
        "(benchmarks/results/decoder_smollm2_mix says what it does on SmolLM2). No effect without labels or with a "
        "loss_fn", _non_negative)
    reconstruct: bool = _option(
        True, "training", "with data: after the cut (before any retrain), re-fit each cut layer's output "
        "projection and bias by ridge least squares so that the residual stream matches the dense model's on "
        "`calibration_batches` batches, layer by layer (upop_fx.training.reconstruct); each layer's error before "
        "and after is in report.reconstruction. Without data, nothing is re-fitted", _bool)
    calibration_batches: int = _option(
        16, "training", "batches of `data` read after the search: the reconstruction's calibration batches, and the "
        "retrain's check batches (the loss on them is measured along the retrain, and the weights where it was "
        "lowest are kept: a retrain never ends worse on them than the cut); with both, every fourth batch is a check "
        "batch that the reconstruction does not fit on. 0: none (no reconstruction, no check)",
        _int(0), metavar="N")
    retrain_score: Any = _option(
        None, "training", "a callable score(model) -> float, higher is better (accuracy, CIDEr, ... on a split of "
        "yours that is not your test set), that the retrain's guard follows instead of the loss on the check "
        "batches: measured at the cut and every fifth of the retrain, the weights with the best score kept. It is "
        "given result.module where there is one, else the graph, in eval mode and without gradients. Use it where "
        "the loss does not follow the quality (a captioner whose greedy text is judged, not its token loss). "
        "None: the check loss. On the command line: MODULE:FUNCTION", _optional_callable, parse=_parse_callable,
        metavar="MODULE:FUNCTION")
    precision: str = _option("fp32", "training", "'fp32', 'bf16' (autocast) or 'fp16' (autocast and a gradient "
                             "scaler); mask gradients are accumulated in float64 either way", _choice(PRECISIONS))
    checkpoint_dir: str | os.PathLike[str] | None = _option(
        None, "training", "write the training state there every `checkpoint_every` steps (atomically); the same "
        "call again resumes where it stopped and gives what an uninterrupted run gives; a directory of another "
        "run is refused (a directory moved elsewhere is the same run)", _path, metavar="DIR", recorded=False)
    checkpoint_every: int = _option(50, "training", "steps between checkpoints (and one at the end of each phase)",
                                    _int(1), metavar="N")

    # ---------------------------------------------------------------- latency: with budget="latency"
    runtime: str | None = _option(
        None, "latency", "where latency is measured: 'onnxruntime-cpu' (default), 'torch-cpu', 'torch-cuda' or "
        "'onnxruntime-cuda' (the last two need a GPU)", check_runtime)
    latency_shape: tuple[int, int | None] | None = _option(
        None, "latency", "(batch, seq) to time at (seq None: the inputs' own length); default: the example "
        "inputs' shape. With latency_phase='decode': (batch, context), batch default 1", check_latency_shape,
        parse=_parse_shape, metavar="BATCH,SEQ")
    latency_phase: str = _option(
        "forward", "latency", "what the budget's latency is: 'forward', one call at latency_shape (an encoder's "
        "forward, a decoder's prefill); 'decode', one generated token per sequence (a decoder's cost per token "
        "with the KV cache: the graph is timed on one token; the attention over the cache, small beside the weights "
        "each token reads, is not in it). Either way, a cut whose module can generate() on a torch runtime "
        "has its prefill and decode measured with the KV cache in report.latency['generate']",
        _choice(LATENCY_PHASES))

    # ---------------------------------------------------------------- outputs
    own_class: bool = _option(
        True, "outputs", "prune only what the model's own class can express, so that result.module exists: "
        "attention whose code fixes the head size loses whole heads, other layers that fix a size stay whole "
        "(listed in report.class_limits); False: the wider graph-only cut (result.model, for ONNX)", _bool)
    shared_rotary: bool = _option(
        False, "outputs", "with own_class, where the class computes one rotary cos/sin table for every layer "
        "(Llama's rotary_emb): keep the same rotary pairs in every layer, ranked jointly, with the class's inv_freq "
        "sliced to them, instead of whole heads; not with allocate='uniform' (its stock config cannot state sliced "
        "frequencies)", _bool)
    verbose: bool | None = _option(
        None, "outputs", "True: one INFO line per phase on stderr (even with no logging configured); False: "
        "warnings only; None: upop_fx's logger as the application set it. Progress bars show on a terminal "
        "either way", _optional_bool, cli=False, recorded=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            f.metadata["check"](f.name, getattr(self, f.name))
        latency_set = self.runtime is not None or self.latency_shape is not None or self.latency_phase != "forward"
        if self.budget != "latency" and latency_set:
            raise ConfigError("runtime=, latency_shape= and latency_phase= belong to budget='latency' (got "
                              f"budget={self.budget!r})")
        if isinstance(self.latency_shape, list):
            object.__setattr__(self, "latency_shape", tuple(self.latency_shape))

    @classmethod
    def make(cls, options: Options | None = None, **changes: Any) -> Options:
        """``options`` (default: all defaults) with ``changes``; an unknown name raises
        :class:`~upop_fx.errors.ConfigError` naming it and the closest option."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in changes:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown option {key!r}{hint}; the options are the fields of upop_fx.Options")
        if options is not None and not isinstance(options, cls):
            raise ConfigError(f"options must be an upop_fx.Options, not {type(options).__name__}")
        return dataclasses.replace(options if options is not None else cls(), **changes)

    @property
    def resolved_granularity(self) -> str:
        """``granularity``, or the budget's default where it is None (:func:`resolve_granularity`)."""
        return resolve_granularity(self.granularity, self.budget)

    @property
    def resolved_runtime(self) -> str | None:
        """``runtime``, or ``"onnxruntime-cpu"`` where it is None under a latency budget (None under others)."""
        return (self.runtime or RUNTIMES[0]) if self.budget == "latency" else None

    @property
    def timed_shape(self) -> tuple[int, int | None] | None:
        """The ``(batch, seq)`` the latency tables time: ``latency_shape`` (None: the example inputs'), or with
        ``latency_phase="decode"`` one token at its batch (default 1)."""
        if self.latency_phase != "decode":
            return self.latency_shape
        return (self.latency_shape[0] if self.latency_shape is not None else 1, 1)

    def group(self, name: str) -> dict[str, Any]:
        """The options of one section of :data:`GROUPS`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["group"] == name}

    def record(self) -> dict[str, Any]:
        """Every option as plain JSON values (a callable ``allocate`` by its qualified name): what a checkpoint
        records of its run."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.metadata["recorded"]:
                continue
            v = getattr(self, f.name)
            if callable(v):
                v = f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', '?')}"
            elif isinstance(v, os.PathLike):
                v = os.fspath(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def _describe() -> str:
    lines = ["The options of a run (``compress``, ``UPop``, ``pipeline.run``, ``upop-fx compress``), checked when "
             "made.", "", "Build one with keywords, or :meth:`Options.make` to change another; every field "
             "explained below is validated in ``__post_init__`` and raises ConfigError naming the option.", ""]
    for group in GROUPS:
        lines.append(f"{group.capitalize()}:")
        for f in dataclasses.fields(Options):
            if f.metadata["group"] == group:
                lines.append(f"    {f.name} (default {f.default!r}): {f.metadata['doc']}.")
        lines.append("")
    return "\n".join(lines)


Options.__doc__ = _describe()
