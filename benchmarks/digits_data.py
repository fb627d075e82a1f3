"""Shared pieces of the digits benchmarks (every task run by :mod:`benchmarks.digits_task`).

* **Data**: scikit-learn's ``load_digits`` (1,797 8×8 grey images, shipped with scikit-learn: nothing is
  downloaded), a stratified 80/20 split (per seed), ±1 px shift augmentation.
* **Training**: a plain AdamW loop with warm-up + cosine decay for training the dense models from scratch.
* **Compression runs**: every method goes through the same steps — search (or one-shot ranking) → cut →
  the same retrain — and is measured before and after the retrain:

  - ``unified``: UPop's unified progressive search (``upop_fx.UPop``; the loop is ``upop_fx.compress``'s);
  - ``uniform``: the same search, the same accumulated-gradient scores, but every structure (an attention
    layer's head dims, an MLP's neurons) of every layer and tower prunes the same fraction π_t of its entries;
  - ``magnitude``: ``upop_fx.compress(method="magnitude")`` — global one-shot ranking by mean |weight|;
  - ``uniform_magnitude``: mean |weight| ranking, the same fraction in every structure.

  Every row is one ``upop_fx.compress`` call (``retrain_steps=0``) followed by the library's retrain with its
  best-weights guard on held-out batches (:func:`~upop_fx.pipeline.retrain_result`); the uniform
  rows pass ``allocate="uniform"`` (``upop_fx.uniform``): the search loop, the scores, the schedule and the
  mask updates stay UPop's (or magnitude's), only the allocation of the cut changes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import upop_fx
from upop_fx.pipeline import retrain_result
from upop_fx.training.loop import Batches

__all__ = [
    "Digits",
    "load_digits_split",
    "shift",
    "train_loop",
    "compress_run",
    "RunOutcome",
    "METHODS",
]

METHODS = ("unified", "uniform", "magnitude", "uniform_magnitude")


# ---------------------------------------------------------------------------------------------- data

@dataclass
class Digits:
    """The fixed split: images in [0, 1], shape (N, 1, 8, 8); labels 0..9."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values standardised with the train-split statistics."""
        return (x - self.mean) / self.std


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=d.target)
    tr, te = np.sort(tr), np.sort(te)
    xt = x[tr]
    return Digits(xt, y[tr], x[te], y[te], float(xt.mean()), float(xt.std()))


def shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift every image by a random (dy, dx) in [-max_shift, max_shift]², filling with 0 (background)."""
    n, c, h, w = x.shape
    p = max_shift
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offs = torch.randint(0, 2 * p + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):  # n is a batch; 8×8 images: the loop is cheap
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


# ---------------------------------------------------------------------------------------------- training

def train_loop(
    model: torch.nn.Module,
    make_batch: Callable[[int], tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    steps: int,
    lr: float,
    weight_decay: float = 0.05,
    warmup: int = 50,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> list[float]:
    """AdamW, linear warm-up then cosine decay to 0; ``make_batch(step) -> (kwargs, target)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    losses = []
    for s in range(steps):
        inputs, target = make_batch(s)
        loss = loss_fn(model(**inputs), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (s + 1) % log_every == 0:
            log(f"  step {s + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f}")
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------- one method, end to end

@dataclass
class RunOutcome:
    method: str
    result: upop_fx.Result
    metrics_cut: dict[str, float]  # right after the cut (before the retrain)
    metrics: dict[str, float]  # after the retrain
    minutes: float  # search (or ranking) + cut + retrain, evaluation excluded
    search_losses: list[float] = field(default_factory=list)
    retrain_losses: list[float] = field(default_factory=list)


def compress_run(
    method: str,
    model: torch.nn.Module,
    example: Any,
    data: list[Any],
    loss_fn: Any,
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    *,
    ratio: float = 0.5,
    search_steps: int = 200,
    retrain_steps: int = 200,
    lr: float = 1e-4,
    retrain_lr: float | None = None,
    interval: int = 10,
    budget: str = "params",
    granularity: str = "upop",
    seed: int = 0,
    score: str = "gradient",
    check: list[Any] | None = None,
    distill: bool = False,
    retrain_schedule: str | None = None,
    retrain_score: Callable[[torch.nn.Module], float] | None = None,
    **compress_kwargs: Any,
) -> RunOutcome:
    """One method: search/rank → cut → evaluate → the same retrain for every method → evaluate.

    ``data`` and ``check`` are ``(inputs, target)`` batches. The retrain is the library's own
    (:func:`upop_fx.pipeline.retrain_result`, what ``compress(retrain_steps=...)`` runs): with ``check``, its loss
    is measured on those batches along the way and the best weights are kept. ``distill``: the search and the
    retrain learn from the dense model (its outputs, and layer by layer) on the inputs alone instead of from
    ``loss_fn`` and the targets. ``retrain_schedule``: the retrain's learning rate (None: ``Options.retrain_schedule``).
    ``retrain_score``: what the retrain's guard follows instead of the loss on ``check`` (``Options.retrain_score``).
    ``compress_kwargs`` go to ``upop_fx.compress`` as they are (``own_class``, …)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if distill:
        data, check, loss_fn = [x for x, _ in data], [x for x, _ in check or []], None
    t0 = time.perf_counter()
    searched = method in ("unified", "uniform")
    result = upop_fx.compress(
        model, example, ratio, "upop" if searched else "magnitude", data=data, loss_fn=loss_fn,
        search_steps=search_steps, retrain_steps=0, lr=lr, interval=interval, budget=budget,
        granularity=granularity, seed=seed, score=score,
        allocate="uniform" if method in ("uniform", "uniform_magnitude") else "unified", **compress_kwargs,
    )  # fmt: skip
    result.report.method = method  # the row's label
    search_losses = result.losses.get("search", [])
    t_cut = time.perf_counter() - t0
    metrics_cut = evaluate(result.model)
    t1 = time.perf_counter()
    retrain_losses = []
    if retrain_steps:
        teacher = upop_fx.capture(model, example).gm if distill else None
        torch.manual_seed(seed)
        retrain_losses = retrain_result(result, teacher, Batches(data, example), loss_fn, retrain_steps,
                                        retrain_lr if retrain_lr is not None else lr, example, check=check or None,
                                        schedule=retrain_schedule, score=retrain_score)
    minutes = (t_cut + time.perf_counter() - t1) / 60
    return RunOutcome(method, result, metrics_cut, evaluate(result.model), minutes, search_losses, retrain_losses)


def towers_summary(report: upop_fx.Report) -> dict[str, dict[str, Any]]:
    """``report.towers()`` with short tower names and rounded fractions (for the JSON and the table)."""
    out = {}
    for name, t in report.towers().items():
        out[name] = {
            "kept_fraction": round(t["kept_fraction"], 4),
            "layers": {str(k): round(v, 4) for k, v in t["layers"].items()},
        }
    return out
