"""Checkpoints of a run's training phases: written atomically, refused when they belong to another run.

A :class:`Checkpointer` owns one directory. ``run.json`` records the run's *fingerprint* (the model's graph and
weights, the settings, the number of ranks); each training phase (``"search"``, ``"retrain"``) keeps one file,
``<phase>.pt``, holding everything needed to continue it exactly: the step, the model and optimizer state (the
masks are model parameters), the loss scaler, the phase's own state (UPop's accumulated scores, selection, π_t),
the RNG states and the losses so far. A phase that ran to the end keeps its last checkpoint, so a run resumed
after the search skips it.

Files are written to a temporary name in the same directory, flushed to disk, then renamed over the old one
(``os.replace``): a run killed at any instant leaves either the previous checkpoint or the new one, never a
half-written file. Only rank 0 writes; every rank reads.

Example:
    >>> import tempfile, torch
    >>> from upop_fx.training.checkpoint import Checkpointer
    >>> d = tempfile.mkdtemp()
    >>> ckpt = Checkpointer(d, every=2, fingerprint={"model": "abc", "ratio": 0.5})
    >>> ckpt.load("search") is None
    True
    >>> ckpt.save("search", {"step": 2, "w": torch.ones(3)})
    >>> Checkpointer(d, every=2, fingerprint={"model": "abc", "ratio": 0.5}).load("search")["step"]
    2
    >>> Checkpointer(d, every=2, fingerprint={"model": "abc", "ratio": 0.3})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    upop_fx.errors.CheckpointError: ... was written by another run: ratio differs (0.5 there, 0.3 here); ...
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..options import check_int
from . import distributed

__all__ = ["Checkpointer", "FINGERPRINT_FILE", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "run.json"


class Checkpointer:
    """Checkpoints of one run under ``directory`` (created if missing), every ``every`` steps of each phase and at
    its last step. ``fingerprint``: a JSON-serialisable dict that identifies the run; a directory written with
    another fingerprint raises :class:`~upop_fx.errors.CheckpointError` naming the keys that differ."""

    def __init__(self, directory: str | os.PathLike[str], every: int, fingerprint: dict[str, Any]) -> None:
        check_int("checkpoint_every", every, 1)
        self.dir, self.every, self.fingerprint = Path(directory), every, fingerprint
        if self.dir.exists() and not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.dir} exists and is not a directory")
        recorded = self.dir / FINGERPRINT_FILE
        if recorded.is_file():
            try:
                old = json.loads(recorded.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{recorded} is unreadable ({exc}); remove the directory to start afresh") from exc
            _require_same(old, fingerprint, self.dir)
        elif self.dir.is_dir() and any(self.dir.glob("*.pt")):
            raise CheckpointError(f"{self.dir} holds checkpoints but no {FINGERPRINT_FILE}: not written by upop_fx")
        elif distributed.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(recorded, lambda f: f.write(json.dumps(fingerprint, indent=1, sort_keys=True).encode()))

    def path(self, phase: str) -> Path:
        return self.dir / f"{phase}.pt"

    def due(self, step: int, total: int) -> bool:
        """Whether to write after ``step`` steps (1-based) of ``total``."""
        return step % self.every == 0 or step == total

    def load(self, phase: str) -> dict[str, Any] | None:
        """The last checkpoint of ``phase``, or None when there is none."""
        path = self.path(phase)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a file that is not a checkpoint of ours
            raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{path} was not written by this run (its fingerprint differs from {FINGERPRINT_FILE})")
        log.info("resuming %s from %s (step %s)", phase, path, state.get("step"))
        return state

    def save(self, phase: str, state: dict[str, Any]) -> None:
        """Write ``state`` as the checkpoint of ``phase``, atomically; only rank 0 writes."""
        if not distributed.is_main():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path(phase), lambda f: torch.save({**state, "fingerprint": self.fingerprint}, f))
        log.debug("checkpoint %s written (step %s)", self.path(phase), state.get("step"))


def _require_same(old: dict[str, Any], new: dict[str, Any], where: Path) -> None:
    if old == new:
        return
    flat_old, flat_new = _flat(old), _flat(new)
    keys = sorted(k for k in {*flat_old, *flat_new} if flat_old.get(k) != flat_new.get(k))
    detail = "; ".join(f"{k} differs ({_short(flat_old.get(k))} there, {_short(flat_new.get(k))} here)" for k in keys[:4])
    raise CheckpointError(
        f"checkpoint directory {where} was written by another run: {detail}; use another directory or remove it"
    )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU, and every CUDA device when CUDA is initialised)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
