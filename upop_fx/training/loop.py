"""Training shared by the UPop search and the retrain: streamed batches, the loss, the loops.

A *batch* is what ``data`` yields. The loss (:func:`make_objective`) is, in this order of precedence:

* ``loss_fn(outputs, target)`` when a ``loss_fn`` is given; each batch is then an ``(inputs, target)`` pair;
* the model's own loss, when the example inputs carry ``labels`` and the model's output has a ``.loss``
  (Hugging Face models): batches are model inputs with their labels, taken as they come; with a
  ``task_weight`` (``Options.task_loss_weight``) > 0, distillation (below) plus that weight times the own loss;
* otherwise distillation from the dense model (:func:`distillation_loss`): KL divergence on ``logits``, and on
  every other floating-point output the squared error of each feature over the teacher's variance of it.

``data`` is streamed (:class:`Batches`): a re-iterable (a list, a ``DataLoader``) is iterated afresh for each
phase and each epoch and never held in memory; a one-shot iterator (a generator) is read once, the search and
the retrain continuing where the other stopped, and when it cannot give the batches a run needs an
:class:`~upop_fx.errors.InputError` says so — before the first step when its length is known.

Example:
    >>> import torch
    >>> from upop_fx.training.loop import Batches
    >>> batches = Batches(iter([torch.ones(2, 3)] * 5), example_inputs=None)
    >>> batches.require(4)
    >>> len(list(batches.take(3))), len(list(batches.take(1)))
    (3, 1)
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..capture.program import normalize_inputs
from ..errors import InputError
from ..logs import progress_bar
from ..options import PRECISIONS, SCHEDULES, Options, check_choice
from . import distributed
from .checkpoint import Checkpointer, rng_state, set_rng_state

__all__ = [
    "Batches", "Objective", "Training", "PhaseState", "AfterStep", "call", "distillation_loss", "Distillation",
    "make_objective", "feature_loss", "to_device", "train_steps", "retrain", "BestWeights", "kept_step", "guard_reading",
    "lr_factor", "attention_mask", "real_rows", "masked_rows", "token_mask",
    "VARIANCE_FLOOR",
]

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]
#: ``objective(model, batch) -> scalar loss``
Objective = Callable[[torch.nn.Module, Any], torch.Tensor]
_NONE = object()


def call(model: torch.nn.Module, inputs: Any) -> Any:
    """``model`` on a batch of inputs given as a tensor, a tuple of positional args or a dict of keyword args."""
    args, kwargs = normalize_inputs(inputs) if not isinstance(inputs, dict) else ((), inputs)
    return model(*args, **kwargs)


#: a dimension's variance is floored at this fraction of the mean variance of its output (a dimension constant
#: over the batch must not weigh without bound)
VARIANCE_FLOOR = 1e-2


def attention_mask(batch: Any) -> torch.Tensor | None:
    """A dict batch's ``attention_mask`` tensor (1 at real tokens, 0 at padding); None where it has none."""
    given = batch.get("attention_mask") if isinstance(batch, dict) else None
    return given if isinstance(given, torch.Tensor) else None


def token_mask(batch: Any, shape: torch.Size | tuple[int, ...]) -> torch.Tensor | None:
    """Which of the ``shape`` positions (a value's axes before its features) hold real tokens: the batch's
    ``attention_mask`` (a dict batch's) as booleans where it has that shape; None where there is none."""
    given = attention_mask(batch)
    return given.bool() if given is not None and tuple(given.shape) == tuple(shape) else None


def real_rows(batch: Any, v: torch.Tensor) -> torch.Tensor:
    """``v`` (``(..., features)``, the value of a layer run on ``batch``) as 2-D rows of features, padded positions
    left out: those the batch's attention mask marks where ``v`` has the mask's token axes, or holds them
    flattened into one (a 2-D ``addmm``'s input). Padding is no token to fit or to rank by."""
    return masked_rows(attention_mask(batch), v)


def masked_rows(mask: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """``v`` as 2-D rows of features, the rows where ``mask`` (``(batch, tokens)``, 0 at padding) is 0 left out
    when ``v`` has the mask's token axes or holds them flattened into one; every row otherwise."""
    rows = v.reshape(-1, v.shape[-1])
    if mask is None or mask.dim() < 2:
        return rows
    if tuple(v.shape[:-1]) == tuple(mask.shape) or (v.dim() == 2 and v.shape[0] == mask.numel()):
        return rows[mask.reshape(-1).bool().to(v.device)]
    return rows


def distillation_loss(student: Any, teacher: Any, real: torch.Tensor | None = None) -> torch.Tensor:
    """The distillation loss of a student's outputs against the teacher's: a sum of one term per floating-point
    output, each scale-free so that outputs of different scales weigh alike.

    * An output named ``logits`` (a Hugging Face head): the KL divergence from the teacher's token (or class)
      distribution to the student's, averaged over positions.
    * Any other output of at least two rows (``(..., features)``): the squared error of each feature divided by
      the teacher's variance of that feature over the batch's rows (samples × positions), floored at
      :data:`VARIANCE_FLOOR` of the mean variance; i.e. the error measured against what tells the inputs apart,
      not against a large component all inputs share (which a plain MSE over ``mean(teacher²)`` is dominated by,
      so that matching it rewards collapsing onto it).
    * A scalar or one row: ``mse / mean(teacher²)``.

    ``real``: which positions hold real tokens (a batch's ``attention_mask``); an output whose axes before its
    features are the mask's counts those positions alone, so that padding neither adds to the loss nor widens the
    variances. None: every position.

    Example:
        >>> t = torch.tensor([[[0.0, 1.0], [2.0, 3.0], [9.0, 9.0]]])
        >>> s = torch.tensor([[[0.0, 1.0], [2.0, 3.0], [0.0, 0.0]]])  # wrong at the padded third position only
        >>> float(distillation_loss(s, t, real=torch.tensor([[1, 1, 0]])))
        0.0
    """
    s_leaves = torch.utils._pytree.tree_leaves(student)
    t_paths, _ = torch.utils._pytree.tree_flatten_with_path(teacher)
    terms = []
    for s, (path, t) in zip(s_leaves, t_paths):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        s, t = s.float(), t.float()
        if real is not None and t.dim() >= 2:
            s, t = masked_rows(real, s), masked_rows(real, t)
        if _named(path, "logits") and t.dim() >= 2:
            flat_t, flat_s = t.reshape(-1, t.shape[-1]), s.reshape(-1, s.shape[-1])
            terms.append(torch.nn.functional.kl_div(flat_s.log_softmax(-1), flat_t.log_softmax(-1), log_target=True,
                                                    reduction="batchmean"))
        elif t.dim() >= 2 and t.numel() // t.shape[-1] >= 2:
            terms.append(feature_loss(s, t))
        else:
            terms.append(torch.nn.functional.mse_loss(s, t) / (t.pow(2).mean() + 1e-8))
    if not terms:
        raise InputError("distillation needs at least one floating-point model output; pass a loss_fn")
    return torch.stack(terms).sum()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The squared error of each feature (last axis) of ``student`` against ``teacher``, divided by the teacher's
    variance of that feature over its rows (every other axis), floored at :data:`VARIANCE_FLOOR` of the mean
    variance; averaged. ``teacher`` needs at least two rows."""
    rows = teacher.reshape(-1, teacher.shape[-1])
    var = rows.var(0, unbiased=False)
    var = var.clamp_min(VARIANCE_FLOOR * float(var.mean()) + 1e-12)
    return ((student.reshape(-1, teacher.shape[-1]) - rows).pow(2) / var).mean()


def _named(path: tuple[Any, ...], name: str) -> bool:
    """Whether a pytree key path ends at a field or key called ``name`` (a ``ModelOutput``'s ``.logits``)."""
    if not path:
        return False
    key = path[-1]
    return getattr(key, "key", getattr(key, "name", None)) == name


def has_task_loss(model: torch.nn.Module, example_inputs: Any) -> bool:
    """Hugging Face style: the inputs carry ``labels`` and ``model``'s output a tensor ``.loss`` (the model is
    run only when there are labels)."""
    if not (isinstance(example_inputs, dict) and "labels" in example_inputs):
        return False
    with torch.no_grad():
        return isinstance(getattr(call(model, example_inputs), "loss", None), torch.Tensor)


def make_objective(loss_fn: LossFn | None, teacher: torch.nn.Module | None, task_loss: bool = False,
                   task_weight: float = 0.0) -> Objective:
    """The loss of one batch (see the module docstring for which one applies)."""
    if loss_fn is not None:

        def user(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise InputError("with a loss_fn, every batch must be an (inputs, target) pair")
            inputs, target = batch
            return loss_fn(call(model, inputs), target)

        return user
    if task_loss and not task_weight > 0:

        def own(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            loss = getattr(call(model, batch), "loss", None)
            if not isinstance(loss, torch.Tensor):
                raise InputError("the model returned no .loss for this batch (does it carry 'labels'?)")
            return loss

        return own
    if teacher is None:
        raise InputError("distillation needs the dense model as a teacher")
    return Distillation(teacher, task_weight if task_loss else 0.0)


class Distillation:
    """The default objective: :func:`distillation_loss` of the model's outputs against ``teacher``'s on the
    same batch (the teacher run without gradients; a ``loss`` output is no output to match), plus ``task_weight``
    times the model's own ``.loss`` when that is > 0 (the batches then carry labels). A search may swap in a
    teacher that computes the same function with the student's own arithmetic (:attr:`teacher`), so that the
    distillation starts at exactly zero."""

    def __init__(self, teacher: torch.nn.Module, task_weight: float = 0.0) -> None:
        self.teacher = teacher
        self.task_weight = task_weight

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            reference = call(self.teacher, batch)
        return self.output_loss(call(model, batch), reference, batch)

    def output_loss(self, outputs: Any, reference: Any, batch: Any) -> torch.Tensor:
        """The loss of the model's ``outputs`` on ``batch`` against the teacher's ``reference``."""
        loss = distillation_loss(_matched(outputs), _matched(reference), attention_mask(batch))
        if not self.task_weight > 0:
            return loss
        own = getattr(outputs, "loss", None)
        if not isinstance(own, torch.Tensor):
            raise InputError("task_loss_weight > 0, but the model returned no .loss for this batch (does it carry "
                             "'labels'?)")
        return loss + self.task_weight * own


def _matched(outputs: Any) -> Any:
    """A model's outputs as distillation matches them: a mapping's (a ``ModelOutput``'s) ``loss`` left out."""
    if isinstance(outputs, Mapping) and "loss" in outputs:
        return {k: v for k, v in outputs.items() if k != "loss"}
    return outputs


class Batches:
    """The training batches of one run, streamed from ``data`` (see the module docstring).

    ``data=None`` repeats ``example_inputs``.
    """

    def __init__(self, data: Iterable[Any] | None, example_inputs: Any) -> None:
        if data is not None and not isinstance(data, Iterable):
            raise InputError(f"data must be an iterable of batches, not {type(data).__name__}")
        self.data, self.example = data, example_inputs
        self.one_shot = data is not None and iter(data) is data
        self._peeked: Any = _NONE  # one-shot: a batch read ahead by require()
        self._pending: tuple[Iterator[Any], Any] | None = None  # re-iterable: an epoch begun by require()
        self.read = 0  # batches handed out so far

    def require(self, steps: int) -> None:
        """Raise :class:`InputError` now, before any training, when ``data`` cannot give ``steps`` batches:
        it is empty, or it is a one-shot iterator whose known length is shorter."""
        if self.data is None or steps <= 0:
            return
        if self.one_shot:
            left = operator.length_hint(self.data, -1)
            if 0 < left + (self._peeked is not _NONE) < steps:
                raise InputError(
                    f"data is a one-shot iterator with {left + (self._peeked is not _NONE)} batches left, but "
                    f"{steps} are needed; pass a re-iterable (a list, a DataLoader) or more batches"
                )
            if self._peeked is _NONE:
                self._peeked = next(self.data, _NONE)
            empty = self._peeked is _NONE
        else:
            if self._pending is None:
                it = iter(self.data)
                self._pending = (it, next(it, _NONE))
            empty = self._pending[1] is _NONE
        if empty:
            raise InputError("data is empty" if self.read == 0 else f"data ran out after {self.read} batches")

    def take(self, steps: int, skip: int = 0) -> Iterator[Any]:
        """The next ``steps`` batches: a re-iterable starts a fresh epoch, a one-shot iterator continues.

        ``skip``: the first ``skip`` of them are read and dropped (a resumed phase continues where its
        checkpoint stopped: the same batches as an uninterrupted run, provided ``data`` gives them in the same
        order). A phase resumed complete (``skip == steps``) reads nothing from a re-iterable, and its
        ``steps`` batches from a one-shot iterator.
        """
        if skip:
            if skip >= steps and not self.one_shot:
                return
            it = self.take(steps)
            for _ in itertools.islice(it, skip):
                pass
            yield from it
            return
        if self.data is None:
            yield from itertools.repeat(self.example, steps)
            return
        if self.one_shot:
            for i in range(steps):
                if self._peeked is not _NONE:
                    batch, self._peeked = self._peeked, _NONE
                else:
                    batch = next(self.data, _NONE)
                if batch is _NONE:
                    raise InputError(
                        f"data ran out after {self.read} batches ({i} of this phase's {steps}); a one-shot "
                        f"iterator is read once across the search and the retrain: pass a re-iterable "
                        f"(a list, a DataLoader) or enough batches"
                    )
                self.read += 1
                yield batch
            return
        done = 0
        while done < steps:
            epoch = 0
            for batch in self._epoch():
                self.read += 1
                done += 1
                epoch += 1
                yield batch
                if done == steps:
                    return
            if epoch == 0:
                raise InputError("data is empty")

    def _epoch(self) -> Iterator[Any]:
        """One pass over a re-iterable, continuing the one :meth:`require` began (its first batch read ahead)."""
        if self._pending is None:
            yield from self.data
            return
        it, first = self._pending
        self._pending = None
        if first is _NONE:
            return
        yield first
        yield from it


@dataclass
class Training:
    """How the training phases of a run go: ``precision`` (one of :data:`PRECISIONS`) and, optionally, a
    :class:`~upop_fx.training.checkpoint.Checkpointer`. Inside an initialised process group the model trains under
    ``DistributedDataParallel`` (:mod:`upop_fx.training.distributed`)."""

    precision: str = "fp32"
    checkpoint: Checkpointer | None = None

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)


#: ``"fp32"``; ``"bf16"``: autocast to bfloat16; ``"fp16"``: autocast to float16 with a gradient scaler.
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PhaseState(Protocol):
    """What a phase keeps beside the model and optimizer in its checkpoint (UPop: scores, selection, π_t)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: ``after_step(i, grad_scale) -> note``: runs after each optimizer step; ``grad_scale`` is the factor the
#: gradients of that step were multiplied by (the fp16 loss scale; 1.0 otherwise).
AfterStep = Callable[[int, float], str]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested in dicts, lists and tuples) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The factor on the learning rate at ``step`` (0-based) of ``steps``: 1 throughout (``"constant"``), or
    (``"cosine"``) a linear warm-up over the first tenth of the steps, then a cosine decay that reaches 0 after the
    last step — a fresh optimizer's first normalised steps are the largest it takes, and the weights it ends on
    are those of a small step.

    Example:
        >>> [round(lr_factor("cosine", i, 10), 3) for i in range(10)]
        [1.0, 0.97, 0.883, 0.75, 0.587, 0.413, 0.25, 0.117, 0.03, 0.0]
    """
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "constant":
        return 1.0
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step + 1 - warm) / max(1, steps - warm)))


def train_steps(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    objective: Objective,
    batches: Batches,
    steps: int,
    lr: float,
    desc: str,
    after_step: AfterStep | None = None,
    log_every: int | None = None,
    *,
    training: Training | None = None,
    phase: str | None = None,
    state: PhaseState | None = None,
    schedule: str = "constant",
) -> list[float]:
    """``steps`` AdamW steps of ``objective`` on ``steps`` batches of ``batches``; returns the step losses.
    ``schedule``: the learning rate of each step (:func:`lr_factor`).

    Runs where ``model`` is (batches are moved to its device), in ``training.precision``, under
    ``DistributedDataParallel`` inside a process group (losses then averaged over ranks). With a checkpointer,
    the phase named ``phase`` resumes from its last checkpoint (model, optimizer, scaler, ``state``, RNG, data
    position) and writes one every ``training.checkpoint.every`` steps. Losses are read from the device only
    when they are logged or checkpointed. A progress bar on a terminal of rank 0 only; the same progress at
    INFO in logs.
    """
    training = training or Training()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type) if training.precision == "fp16" else None
    ckpt = training.checkpoint if phase is not None else None
    losses: list[float] = []
    start = 0
    saved = ckpt.load(phase) if ckpt is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        if state is not None:
            state.load_state_dict(saved["state"])
        set_rng_state(saved["rng"])
        losses, start = list(saved["losses"]), int(saved["step"])
    if start >= steps:
        for _ in batches.take(steps, skip=steps):  # a one-shot iterator moves past this phase's batches
            pass
        return losses
    net = distributed.wrap(model)
    every = log_every or max(1, steps // 5)
    autocast = _AUTOCAST.get(training.precision)
    pending: list[torch.Tensor] = []
    bar = progress_bar(steps, desc, initial=start, enabled=distributed.is_main())
    note = ""
    for i, batch in enumerate(batches.take(steps, skip=start), start):
        batch = to_device(batch, device)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(schedule, i, steps)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = objective(net, batch)
        grad_scale = 1.0
        if scaler is not None:
            scaler.scale(loss).backward()
            grad_scale = float(scaler.get_scale())
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        pending.append(loss.detach().float())
        note = after_step(i, grad_scale) if after_step is not None else ""
        bar.update(1)
        done = i + 1
        save = ckpt is not None and ckpt.due(done, steps)
        if done % every == 0 or done == steps or save:
            losses += _gathered(pending)
            pending.clear()
            bar.set_postfix_str(f"loss={losses[-1]:.4f} {note}".strip(), refresh=False)
            if done % every == 0 or done == steps:
                log.info("%s step %d/%d: loss=%.5f %s", desc, done, steps, losses[-1], note)
        if save:
            ckpt.save(phase, {  # type: ignore[union-attr]
                "step": done, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "state": state.state_dict() if state is not None else None, "rng": rng_state(), "losses": losses,
            })  # fmt: skip
    bar.close()
    return losses


def _gathered(pending: list[torch.Tensor]) -> list[float]:
    """The pending step losses as floats (one device read), averaged over ranks inside a process group."""
    if not pending:
        return []
    values = torch.stack(pending)
    if distributed.active():
        values = distributed.all_reduce_sum(values) / distributed.world_size()
    return values.tolist()


#: the retrain's check reads at most this many of the batches it is given
CHECK_BATCHES = 8


def guard_reading(scored: bool) -> tuple[int, str]:
    """How to read a retrain guard's measurements: ``(sign, what)`` — a history entry times ``sign`` is ``what``
    (minus the caller's score when the guard follows one, else the check loss itself)."""
    return (-1, "score") if scored else (1, "check loss")


def kept_step(history: Sequence[Sequence[float]]) -> int:
    """Of a retrain guard's measurements ``(steps done, check loss)`` (``report.retrain_check``), the steps done
    where the check loss was lowest: the weights kept (the first such; 0 before any measurement)."""
    return int(min(history, key=lambda h: h[1])[0]) if history else 0


class BestWeights:
    """The retrain's guard (a :class:`PhaseState`): the objective on fixed check batches — or, given ``score``,
    minus ``score(model)`` (a quality, higher is better) — measured before the first step and every ``every``
    steps, and the weights where it was lowest, put back at the end — so a retrain never ends worse, on those
    batches or by that score, than the cut it started from."""

    def __init__(self, model: torch.nn.Module, objective: Objective, check: list[Any], every: int,
                 score: Callable[[torch.nn.Module], float] | None = None) -> None:
        self.model, self.objective, self.check, self.every = model, objective, check, max(1, every)
        self.score = score
        self.history: list[tuple[int, float]] = []  # (steps done, check loss or minus the score)
        self.best: dict[str, torch.Tensor] | None = None  # a copy of the weights at the lowest check loss

    @property
    def best_step(self) -> int:
        """The steps done where the check loss was lowest (:func:`kept_step`)."""
        return kept_step(self.history)

    def measure(self, done: int) -> str:
        """Measure the check loss after ``done`` steps; keep a copy of the weights when it is the lowest yet."""
        was_training = self.model.training
        self.model.eval()
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            if self.score is not None:
                loss = -float(self.score(self.model))
            else:
                loss = sum(float(self.objective(self.model, to_device(b, device))) for b in self.check) / len(self.check)
        self.model.train(was_training)
        if distributed.active():
            loss = _gathered([torch.tensor(loss, device=device)])[0]
        if not self.history or loss < min(v for _, v in self.history):
            self.best = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.history.append((done, loss))
        return f"score={-loss:.4f}" if self.score is not None else f"check={loss:.4f}"

    def after_step(self, i: int, grad_scale: float) -> str:
        done = i + 1
        return self.measure(done) if done % self.every == 0 else ""

    def restore(self) -> None:
        """Put the best weights back (when the last measurement was not the best)."""
        if self.best is not None and self.history and self.best_step != self.history[-1][0]:
            self.model.load_state_dict(self.best)
            sign, what = guard_reading(self.score is not None)
            log.info("retrain: kept the weights after %d steps (%s %.5f; %.5f at the end)", self.best_step, what,
                     sign * min(v for _, v in self.history), sign * self.history[-1][1])
        self.best = None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state["history"]]  # type: ignore[misc]
        self.best = state["best"]


def retrain(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    data: Iterable[Any] | Batches | None,
    loss_fn: LossFn | None,
    steps: int,
    lr: float,
    example_inputs: Any,
    *,
    training: Training | None = None,
    check: list[Any] | None = None,
    history: list[tuple[int, float]] | None = None,
    objective: Objective | None = None,
    schedule: str | None = None,
    score: Callable[[torch.nn.Module], float] | None = None,
    task_weight: float | None = None,
) -> list[float]:
    """Fine-tune the dense small ``model`` in place for ``steps`` AdamW steps; returns the losses.

    The loss is ``loss_fn`` when given, else the model's own ``.loss`` when ``example_inputs`` carry ``labels``,
    else distillation from ``teacher``. ``data`` as in :class:`Batches` (or a :class:`Batches` to continue).
    ``training``: precision and checkpoints (phase ``"retrain"``), see :func:`train_steps`.
    ``check``: batches (as ``data`` yields them; the first :data:`CHECK_BATCHES`) on which the loss is measured
    before the first step and every ``steps // 5`` steps; the weights where it was lowest are the ones kept (:class:`BestWeights`); the
    measurements are appended to ``history`` as ``(steps done, loss)``. ``objective``: the loss to use instead
    (a :class:`~upop_fx.training.layerwise.LayerwiseDistillation`). ``schedule``: the learning rate's
    (:func:`lr_factor`; None: ``Options.retrain_schedule``'s default). ``score``: a quality of ``model``
    (higher is better) that the guard follows instead of the check loss (``Options.retrain_score``; the history
    then holds minus the score); it needs no ``check`` batches. ``task_weight``: with labels, the weight of the
    model's own loss added to distillation (:func:`make_objective`; None: ``Options.task_loss_weight``'s default).
    """
    batches = data if isinstance(data, Batches) else Batches(data, example_inputs)
    batches.require(steps)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = to_device(example_inputs, device)
    if objective is None:
        weight = Options().task_loss_weight if task_weight is None else task_weight
        objective = make_objective(loss_fn, teacher, loss_fn is None and has_task_loss(model, example), weight)
    params = [p for p in model.parameters() if p.requires_grad]
    every = max(1, steps // 5)
    guard = (BestWeights(model, objective, [], every, score) if score is not None
             else BestWeights(model, objective, check[:CHECK_BATCHES], every) if check else None)
    resumed = training is not None and training.checkpoint is not None and training.checkpoint.path("retrain").is_file()
    if guard is not None and not resumed:  # a resumed phase has its measurements in its checkpoint
        guard.measure(0)
    losses = train_steps(model, params, objective, batches, steps, lr, "retrain",
                         guard.after_step if guard is not None else None, training=training, phase="retrain",
                         state=guard, schedule=schedule if schedule is not None else Options().retrain_schedule)
    if guard is not None:
        if not guard.history or guard.history[-1][0] != steps:
            guard.measure(steps)
        guard.restore()
        if history is not None:
            history.extend(guard.history)
    return losses
