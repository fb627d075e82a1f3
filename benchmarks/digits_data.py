"""Shared pieces of the digits benchmarks (``vit_digits``, ``clip_digits``).

* **Data**: scikit-learn's ``load_digits`` (1,797 8×8 grey images, shipped with scikit-learn: nothing is
  downloaded), a fixed stratified 80/20 split (seed 0), ±1 px shift augmentation.
* **Training**: a plain AdamW loop with warm-up + cosine decay for training the dense models from scratch.
* **Compression runs**: every method goes through the same steps — search (or one-shot ranking) → cut →
  the same retrain — and is measured before and after the retrain:

  - ``unified``: UPop's unified progressive search (``upop_fx.UPop``; the loop is ``upop_fx.compress``'s);
  - ``uniform``: the same search, the same accumulated-gradient scores, but every structure (an attention
    layer's head dims, an MLP's neurons) of every layer and tower prunes the same fraction π_t of its entries;
  - ``magnitude``: ``upop_fx.compress(method="magnitude")`` — global one-shot ranking by mean |weight|;
  - ``uniform_magnitude``: mean |weight| ranking, the same fraction in every structure.

  Every row is one ``upop_fx.compress`` call (``retrain_steps=0``) followed by ``upop_fx.retrain``; the uniform
  rows pass ``allocate="uniform"`` (``upop_fx.uniform``): the search loop, the scores, the schedule and the
  mask updates stay UPop's (or magnitude's), only the allocation of the cut changes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import upop_fx

__all__ = [
    "Digits",
    "load_digits_split",
    "shift",
    "train_loop",
    "compress_run",
    "RunOutcome",
    "METHODS",
    "plan",
    "Job",
    "jobs",
    "write_markdown",
    "unified_vs_uniform",
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
    **compress_kwargs: Any,
) -> RunOutcome:
    """One method: search/rank → cut → evaluate → the same retrain for every method → evaluate.
    ``compress_kwargs`` go to ``upop_fx.compress`` as they are (``own_class``, ``loss`` options, …)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
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
        retrain_losses = upop_fx.retrain(result.model, None, data, loss_fn, retrain_steps,
                                         retrain_lr if retrain_lr is not None else lr, example)
    minutes = (t_cut + time.perf_counter() - t1) / 60
    return RunOutcome(method, result, metrics_cut, evaluate(result.model), minutes, search_losses, retrain_losses)


def plan(methods: Sequence[str], search_steps: int, retrain_steps: int, equal_budget: bool) -> list[tuple[str, str, int]]:
    """``(label, method, retrain steps)`` per row: every method gets ``retrain_steps``; with ``equal_budget`` the
    one-shot methods (no search, so no training during it) get one more row whose retrain is
    ``search_steps + retrain_steps`` long — the same number of training steps as the searched methods."""
    rows = [(m, m, retrain_steps) for m in methods]
    if equal_budget:
        rows += [(f"{m} (retrain {search_steps + retrain_steps})", m, search_steps + retrain_steps)
                 for m in methods if m in ("magnitude", "uniform_magnitude")]
    return rows


@dataclass
class Job:
    """One compression run of a benchmark: a row of the main table or of the sweep table."""

    label: str
    method: str
    search_steps: int
    retrain_steps: int
    lr: float
    interval: int
    table: str = "main"


def jobs(args: Any) -> list[Job]:
    """The main rows (``plan``) with the script's settings, then for every ``--sweep`` spec
    ``SEARCH:LR:INTERVAL:RETRAIN`` a unified and a uniform row with those settings."""
    out = [Job(label, m, args.search_steps, r, args.lr, args.interval)
           for label, m, r in plan(args.methods, args.search_steps, args.retrain_steps, args.equal_budget)]
    for spec in args.sweep:
        s, lr, i, r = spec.split(":")
        for m in ("unified", "uniform"):
            out.append(Job(f"{m} search={s} lr={float(lr):g} interval={i} retrain={r}", m, int(s), int(r), float(lr),
                           int(i), "sweep"))
    return out


def unified_vs_uniform(payload: dict[str, Any], cut: str, after: str) -> list[dict[str, Any]]:
    """Every unified/uniform pair of the run (the main table's, then the sweep's), with its settings and the
    metric ``cut`` (right after the cut) and ``after`` (after the retrain) of both."""
    cfg = payload["config"]
    main = {r["method"]: r for r in payload["rows"]}
    pairs = []
    if "unified" in main and "uniform" in main:
        pairs.append(({"search": cfg["search_steps"], "lr": cfg["lr"], "interval": cfg["interval"],
                       "retrain": cfg["retrain_steps"], "main": True}, main["unified"], main["uniform"]))
    sweep = payload.get("sweep", [])
    for u in (r for r in sweep if r["method"] == "unified"):
        key = (u["search"], u["lr"], u["interval"], u["retrain"])
        f = next((r for r in sweep if r["method"] == "uniform" and (r["search"], r["lr"], r["interval"], r["retrain"]) == key), None)
        if f is not None:
            pairs.append(({"search": key[0], "lr": key[1], "interval": key[2], "retrain": key[3], "main": False}, u, f))
    return [{**s, "unified_cut": u[cut], "uniform_cut": f[cut], "unified": u[after], "uniform": f[after]}
            for s, u, f in pairs]


def towers_summary(report: upop_fx.Report) -> dict[str, dict[str, Any]]:
    """``report.towers()`` with short tower names and rounded fractions (for the JSON and the table)."""
    out = {}
    for name, t in report.towers().items():
        out[name] = {
            "kept_fraction": round(t["kept_fraction"], 4),
            "layers": {str(k): round(v, 4) for k, v in t["layers"].items()},
        }
    return out


def write_markdown(path: Any, payload: dict[str, Any], sweep_columns: Sequence[str] = ()) -> None:
    """Put the run's description (model, data, loss, metrics, config, machine) above the table that
    ``common.write_results`` wrote, and the verdict / notes below it."""
    from pathlib import Path

    path = Path(path)
    table = path.read_text()
    head = [f"# {path.stem}", ""]
    for key in ("model", "data", "loss", "metric"):
        if key in payload:
            head.append(f"- {key}: {payload[key]}")
    for key, text in payload.get("metrics", {}).items():
        head.append(f"- `{key}`: {text}")
    cfg = payload.get("config", {})
    head.append("- config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    m = payload.get("machine", {})
    head.append(f"- machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')} "
                f"({m.get('torch_threads')} thread(s)); minutes are wall-clock; total {payload.get('total_minutes')} min")
    tail = [f"- {line}" for line in payload.get("verdict", []) + payload.get("notes", [])]
    text = "\n".join(head) + "\n\n" + table + ("\n" + "\n".join(tail) + "\n" if tail else "")
    if payload.get("sweep"):
        from .common import markdown_table

        text += ("\n## Sweep: unified vs uniform under other search settings\n\n"
                 + markdown_table(payload["sweep"], list(sweep_columns)) + "\n")
    path.write_text(text)
