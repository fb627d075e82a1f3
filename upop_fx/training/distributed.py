"""Data-parallel training with ``torch.distributed``: what the search and the retrain need of it, and no more.

When ``compress`` runs inside an initialised process group of more than one rank (``torchrun``, or your own
``init_process_group``), every rank runs the same pipeline on its own shard of the data:

* the model being trained is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap`), so
  the weight gradients *and the mask gradients* are averaged across ranks before the optimizer step and before
  UPop accumulates its scores — every rank accumulates the same scores;
* every re-selection checks that all ranks chose the same entries (:func:`check_same`: one all-reduce of a
  checksum; a mismatch raises), and at the start the dense model is checked to be the same on every rank;
* rank 0 alone logs (at INFO and below), shows progress and writes files (:func:`is_main`, :func:`quiet_ranks`);
* what must be one measurement, not one per rank — a latency budget's tables and timed cuts — is measured on
  rank 0 alone while the others wait, and sent to every rank (:func:`on_main`).

gloo on CPU, NCCL on GPU — whatever backend the process group was created with. Shard the data yourself, e.g.
with a ``DistributedSampler``: each rank's batches are its share of the global batch.

Under ``torchrun`` without a process group (``WORLD_SIZE`` > 1 in the environment, nothing initialised),
``compress`` creates one from torchrun's environment, as Accelerate does (:func:`init_from_environment`: NCCL
when CUDA is present, else gloo) and leaves it initialised: the ranks search together, never each on its own.

Outside a process group (or with one rank) every other function here is a no-op.

Example:
    >>> from upop_fx.training.distributed import active, is_main, world_size
    >>> active(), is_main(), world_size()
    (False, True, 1)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError, DistributedMismatchError

__all__ = ["init_from_environment", "active", "rank", "world_size", "is_main", "wrap", "unwrap", "check_same", "checksum", "comm_device",
           "quiet_ranks", "on_main", "all_reduce_sum",
           "DistributedMismatchError"]

T = TypeVar("T")


def init_from_environment() -> bool:
    """Create the process group torchrun's environment describes, where ``WORLD_SIZE`` > 1 and none exists yet
    (NCCL when CUDA is present, on ``cuda:LOCAL_RANK``; else gloo). Returns True when it created one."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} says this process is one of {world} ranks, but {', '.join(missing)} "
                          "is not set: start it with torchrun, or call torch.distributed.init_process_group first")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend)
    except Exception as exc:  # noqa: BLE001 - any failure to join the group stops the run: never search alone
        raise ConfigError(f"WORLD_SIZE={world}: could not create the {backend} process group torchrun describes "
                          f"({type(exc).__name__}: {exc}); the ranks must search together") from exc
    logging.getLogger(__name__).info("created the %s process group of %d ranks from torchrun's environment",
                                     backend, world)
    return True


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0, and outside a process group."""
    return rank() == 0


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` when :func:`active`, else ``model``.

    The graph is static (a captured graph has no control flow), so DDP runs with ``static_graph=True``: the
    parameters a loss never reaches (an output the task loss ignores) are found in the first step, with no
    graph traversal on later ones. On CUDA the model's device is the DDP device."""
    if not active():
        return model
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def checksum(arrays: list[np.ndarray | torch.Tensor]) -> float:
    """A number that differs, with overwhelming probability, when any of ``arrays`` differs (bit-exact):
    the first 6 bytes of their SHA-256, as an integer exactly representable in float64."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, torch.Tensor):  # any dtype (bf16 too): hash the raw bytes
            h.update(str((a.dtype, tuple(a.shape))).encode())
            a = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        else:
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return float(int.from_bytes(h.digest()[:6], "big"))


def check_same(value: float, what: str) -> None:
    """Raise :class:`DistributedMismatchError` unless every rank passes the same ``value``: one all-reduce of
    ``(value, -value)`` with MAX. A no-op outside a process group."""
    if not active():
        return
    t = torch.tensor([value, -value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = float(t[0]), -float(t[1])
    if hi != value or lo != value:
        raise DistributedMismatchError(
            f"rank {rank()} of {world_size()}: the ranks disagree on {what} (checksums from {lo:.0f} to {hi:.0f})"
        )


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (a new tensor on ``t``'s device); ``t`` itself outside a process group."""
    if not active():
        return t
    out = t.detach().to(comm_device()).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone and its (picklable) result sent to every rank; ``fn()`` itself outside a
    process group. For a measurement that decides the cut: a timing taken on every rank differs from rank to rank
    (and ranks timing at once on one machine slow each other down), so the ranks would cut differently. The other
    ranks wait in the broadcast meanwhile. An exception on rank 0 is raised on every rank."""
    if not active():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, fn())
        except Exception as exc:
            box[0] = (False, _picklable(exc))
            dist.broadcast_object_list(box, src=0, device=comm_device())
            raise
    dist.broadcast_object_list(box, src=0, device=comm_device())
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _picklable(exc: Exception) -> Exception:
    """``exc`` itself where it pickles, else a RuntimeError that names it (for the ranks that did not raise it)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception type: only its name and message travel
        return RuntimeError(f"on rank 0: {type(exc).__name__}: {exc}")


def comm_device() -> torch.device:
    """Where tensors for a collective must live: the current CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def quiet_ranks() -> Iterator[None]:
    """Within the block, ranks other than 0 log only warnings and errors (the ``upop_fx`` loggers)."""
    if is_main():
        yield
        return
    logger = logging.getLogger("upop_fx")
    level = logger.level
    logger.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        logger.setLevel(level)
