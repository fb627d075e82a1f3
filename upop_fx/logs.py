"""Quiet by default: a few INFO lines from upop_fx per run, nothing from the libraries it drives.

* :func:`quiet` — inside upop_fx's own calls (compress, capture, ONNX export, ...), the notes that torch's ONNX
  exporter, onnxscript and onnx_ir log at INFO (hundreds per export), the exporter's "torchvision is not
  installed" warnings, and torch's ``isinstance(treespec, LeafSpec)`` FutureWarning are held back. Outside those
  calls, nothing is changed: the levels and warning filters are restored on the way out.
* :func:`verbosity` — ``compress(verbose=True)`` shows upop_fx's INFO lines (one per phase) on stderr even when
  the application configured no logging; ``verbose=False`` keeps only warnings; ``None`` leaves upop_fx's
  logger as the application set it.

* :func:`progress_bar` — every long phase's bar (tqdm): on a terminal only, never in a log file, and not at all
  after :func:`show_progress(False) <show_progress>` (``upop-fx --quiet``).
* :func:`phase` — the wall-clock seconds of each phase of a run, for ``report.seconds``: where a long compress
  spent its time.

Example:
    >>> import logging
    >>> from upop_fx.logs import quiet
    >>> with quiet():
    ...     logging.getLogger("onnx_ir.passes").isEnabledFor(logging.INFO)
    False
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["quiet", "quietly", "verbosity", "progress_bar", "show_progress", "phase", "THIRD_PARTY"]

#: logger → the lowest level let through inside :func:`quiet`
THIRD_PARTY = {
    "onnx_ir": logging.WARNING,
    "onnxscript": logging.WARNING,
    "onnx": logging.WARNING,
    "torch.onnx": logging.ERROR,  # "torchvision is not installed. Skipping torchvision::nms", four per export
    "torch._export": logging.WARNING,
    "torch.fx.experimental.symbolic_shapes": logging.WARNING,  # guards added while exporting (read by capture)
    "torch.export": logging.WARNING,
}
#: (message regex, category) of the warnings held back inside :func:`quiet`
WARNINGS = [
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning),
    (r".*torchvision is not installed", UserWarning),
]

_depth = 0
_bars = True

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hold back the third-party noise listed in :data:`THIRD_PARTY` and :data:`WARNINGS` (re-entrant)."""
    global _depth
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    saved = {}
    for name, level in THIRD_PARTY.items():
        logger = logging.getLogger(name)
        saved[name] = logger.level
        if logger.getEffectiveLevel() < level:
            logger.setLevel(level)
    _depth = 1
    try:
        with warnings.catch_warnings():
            for message, category in WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        _depth = 0
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def quietly(fn: F) -> F:
    """``fn`` run inside :func:`quiet`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with quiet():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def verbosity(verbose: bool | None) -> Iterator[None]:
    """upop_fx's logger at INFO (``True``; with a stderr handler when nothing would print it) or WARNING
    (``False``) for the block; ``None``: unchanged."""
    if verbose is None:
        yield
        return
    logger = logging.getLogger("upop_fx")
    level = logger.level
    handler = None
    if verbose and not logger.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("upop_fx: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)


def show_progress(on: bool) -> None:
    """Turn every progress bar of upop_fx on (the default: on a terminal only) or off."""
    global _bars
    _bars = bool(on)


def progress_bar(total: int, desc: str, *, initial: int = 0, enabled: bool = True) -> Any:
    """A tqdm bar for a phase of ``total`` steps: shown on a terminal only (``enabled=False``, e.g. on ranks
    other than 0, or after :func:`show_progress(False) <show_progress>`: never); it leaves no line behind."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, disable=None if enabled and _bars else True)


@contextlib.contextmanager
def phase(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall-clock seconds the block takes to ``seconds[name]`` (also when it raises).

    Example:
        >>> seconds: dict[str, float] = {}
        >>> with phase(seconds, "capture"):
        ...     pass
        >>> list(seconds), seconds["capture"] >= 0
        (['capture'], True)
    """
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
