"""Training loops shared by the UPop search and the retrain: batches, losses, distillation.

A *batch* is what ``data`` yields. Without a ``loss_fn`` a batch is model inputs (a tensor, a tuple of
positional args or a dict of keyword args, like ``example_inputs``) and the loss is distillation from the dense
model: the mean squared error of every floating-point output, each divided by the teacher's mean square so
that outputs of different scales weigh alike. With a ``loss_fn`` a batch is ``(inputs, target)`` and the loss
is ``loss_fn(outputs, target)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ..capture import normalize_inputs
from ..errors import InputError

__all__ = ["distillation_loss", "cycle_batches", "call", "batch_loss"]

LossFn = Callable[[Any, Any], torch.Tensor]


def call(model: torch.nn.Module, inputs: Any) -> Any:
    args, kwargs = normalize_inputs(inputs) if not isinstance(inputs, dict) else ((), inputs)
    return model(*args, **kwargs)


def distillation_loss(student: Any, teacher: Any) -> torch.Tensor:
    s_leaves, _ = torch.utils._pytree.tree_flatten(student)
    t_leaves, _ = torch.utils._pytree.tree_flatten(teacher)
    terms = [
        torch.nn.functional.mse_loss(s.float(), t.float()) / (t.float().pow(2).mean() + 1e-8)
        for s, t in zip(s_leaves, t_leaves)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    if not terms:
        raise InputError("distillation needs at least one floating-point model output; pass a loss_fn")
    return torch.stack(terms).sum()


def cycle_batches(data: Iterable[Any] | None, example_inputs: Any, steps: int) -> Iterator[Any]:
    """``steps`` batches from ``data`` (cycled), or the example inputs repeated when ``data`` is None."""
    if data is None:
        return itertools.repeat(example_inputs, steps)
    batches = data if isinstance(data, (list, tuple)) else list(data)
    if not batches:
        raise InputError("data is empty")
    return itertools.islice(itertools.cycle(batches), steps)


def batch_loss(model: torch.nn.Module, teacher: torch.nn.Module | None, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise InputError("with a loss_fn, every batch must be an (inputs, target) pair")
        inputs, target = batch
        return loss_fn(call(model, inputs), target)
    assert teacher is not None
    with torch.no_grad():
        reference = call(teacher, batch)
    return distillation_loss(call(model, batch), reference)
