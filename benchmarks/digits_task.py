"""The seeded runner every digits task shares: per seed, train the dense model from scratch, compress it by each
method, and write one results file with mean ± std over the seeds.

A task (``caption_digits``, ``vqa_digits``, …) says what its model is, how a training batch is drawn, its loss
and how a model is scored (:class:`Setup`), and the name of its metric. The runner does the rest the same way
for every task:

* **seed** = the data split (:func:`~benchmarks.digits_data.load_digits_split`), the model's initialisation,
  the training batches and the search (``compress(seed=...)``): three seeds are three independent runs;
* **dense**: the task's pretraining stage if it has one (``--pretrain-steps``), then ``--train-steps`` of AdamW
  (warm-up + cosine) on the task's loss;
* **methods**, at ``--ratio`` of the prunable parameters, each through :func:`~benchmarks.digits_data.compress_run`
  (search or one-shot ranking → cut → score → the same retrain → score; the retrain is the library's own, and
  keeps its best weights by the loss on batches it never trains on, or with ``--guard metric`` by the task's
  metric on a fixed sample of training images): ``unified`` (UPop's one ranking over
  every tower, ranked by ``--score``), ``uniform`` (the same search, every structure of every tower pruned by the
  same fraction), ``magnitude`` (one-shot mean-|weight| ranking), and ``unified_<score>`` for the other ranking
  scores (the evidence for the default score: ``benchmarks.score_default`` reads these rows);
* **objective** (``--distill``): the task's loss on its targets (default), or distillation from the dense model
  (its outputs and every layer's residual stream) on the training inputs alone, for the search and the retrain;
* **rows**: ``{"method", "seed", "score", METRIC, METRIC + "_cut", "kept_<tower>", "layers", "params", "minutes"}``
  (``METRIC_cut``: right after the cut; ``METRIC``: after the retrain; ``layers``: the kept fraction per layer of
  every tower; ``retrain_step_kept``: the step whose weights the retrain kept), and a summary per method (mean ±
  std over the seeds) checked against the targets: ``unified`` within 2 points of dense after the retrain, and
  ahead of ``uniform`` right after the cut; and on how many rows the retrain ended at or above the cut.

Example (a task module's ``main`` is ``run_main(TASK, argv)``)::

    python -m benchmarks.caption_digits --seeds 0 --quick     # a smoke run, nothing written
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from upop_fx import SCORES
from upop_fx.options import SCHEDULES, Options
from upop_fx.training.loop import CHECK_BATCHES, kept_step

from .common import RESULTS, machine, markdown_table
from .digits_data import Digits, compress_run, load_digits_split, towers_summary, train_loop

log = logging.getLogger("benchmarks.digits_task")

TASK_METHODS = ("unified", "uniform", "magnitude", *(f"unified_{s}" for s in SCORES))
#: the targets every task is checked against (points of the task's metric)
WITHIN_DENSE = 2.0


@dataclass
class Setup:
    """One seed of a task: the untrained model and how to train and score it."""

    model: torch.nn.Module
    #: ``make_batch(gen) -> (inputs, target)``: one training batch drawn with ``gen``; ``model(**inputs)`` runs it
    make_batch: Callable[[torch.Generator], tuple[dict[str, torch.Tensor], Any]]
    #: ``loss_fn(outputs, target) -> scalar`` (what ``upop_fx.compress`` and ``upop_fx.retrain`` are given)
    loss_fn: Callable[[Any, Any], torch.Tensor]
    #: ``evaluate(model) -> {metric: points, ...}`` on the held-out split (the dense model, a pruned graph alike)
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    #: extra keyword arguments for ``upop_fx.compress`` (``granularity``, …); the tasks measure the paper's cut,
    #: the graph-only one (``own_class=False``: a class such as BLIP's vision attention would keep layers whole)
    compress: dict[str, Any] = field(default_factory=lambda: {"own_class": False})
    #: ``pretrain(gen)``: a stage before the task's training, counted in the dense minutes (the BLIP tasks
    #: pretrain the vision tower on digit classification, as BLIP starts from a pretrained ViT)
    pretrain: Callable[[torch.Generator], None] | None = None
    #: ``guard(model) -> points``: the task's metric on a fixed sample of *training* images (never the held-out
    #: split), what the retrain's guard follows with ``--guard metric``; None: the task offers none
    guard: Callable[[torch.nn.Module], float] | None = None


@dataclass
class Task:
    """A digits task: its name (the results file), its metric, its description and the paper's figure at 2×."""

    name: str
    metric: str
    describe: dict[str, str]  #: "model", "data", "loss", "metric": one line each, for the results file
    paper: str  #: the UPop paper's dense → 2× figure for this task (for scale, not a comparison)
    setup: Callable[[Digits, int, argparse.Namespace], Setup]
    defaults: dict[str, Any] = field(default_factory=dict)  #: this task's values of the runner's options


def parse_args(task: Task, argv: list[str] | None = None, doc: str | None = None) -> argparse.Namespace:
    """The options every digits task takes, with ``task.defaults`` as their defaults."""
    d = {"pretrain_steps": 0, "train_steps": 1500, "train_lr": 2e-3, "batch_size": 64, "search_steps": 300, "retrain_steps": 300,
         "lr": 3e-4, "interval": 10} | task.defaults  # fmt: skip
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{task.name}", description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed (default 0 1 2)")
    p.add_argument("--methods", nargs="+", default=None, choices=TASK_METHODS,
                   help="rows to run (default: unified, uniform, magnitude and unified_<score> for every other "
                        "score; unified_<score> is unified ranked by that score)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of the prunable parameters removed (default 0.5)")
    p.add_argument("--score", default="gradient", choices=SCORES, help="UPop's ranking score (default gradient)")
    p.add_argument("--pretrain-steps", type=int, default=d["pretrain_steps"],
                   help="steps of the task's pretraining stage, if it has one")
    p.add_argument("--train-steps", type=int, default=d["train_steps"], help="steps of dense training")
    p.add_argument("--train-lr", type=float, default=d["train_lr"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--search-steps", type=int, default=d["search_steps"])
    p.add_argument("--retrain-steps", type=int, default=d["retrain_steps"])
    p.add_argument("--lr", type=float, default=d["lr"], help="AdamW lr of the search and the retrain")
    p.add_argument("--interval", type=int, default=d["interval"], help="UPop's mask-update interval")
    p.add_argument("--distill", action="store_true",
                   help="search and retrain by distillation from the dense model (its outputs and every layer's, "
                        "on the training inputs alone) instead of on the task's loss and targets")
    p.add_argument("--retrain-schedule", default=Options().retrain_schedule, choices=SCHEDULES,
                   help="the retrain's learning rate: constant, or a warm-up then a cosine decay to 0 (default: the "
                        "library's)")
    p.add_argument("--guard", default="loss", choices=("loss", "metric"),
                   help="what the retrain's guard keeps the best weights by: the loss on held batches (default), or "
                        "the task's metric on a fixed sample of training images (never the test split; for a task "
                        "whose loss does not follow its metric)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps, two calibration batches, nothing written unless --out")
    p.add_argument("--out", default=None, help=f"results name under benchmarks/results (default {task.name})")
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = ["unified", "uniform", "magnitude", *(f"unified_{s}" for s in SCORES if s != args.score)]
    if args.quick:
        args.train_steps, args.search_steps, args.retrain_steps, args.interval = 20, 6, 3, 3
        args.pretrain_steps = min(args.pretrain_steps, 10)
    return args


def run_seed(task: Task, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train the dense model of ``seed``, then compress it by every method: one row each (dense first)."""
    digits = load_digits_split(seed=seed)
    torch.manual_seed(seed)
    setup = task.setup(digits, seed, args)
    if args.guard == "metric" and setup.guard is None:
        raise SystemExit(f"{task.name} offers no metric on training images for --guard metric")
    gen = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    if setup.pretrain is not None and args.pretrain_steps:
        setup.pretrain(gen)
    train_loop(setup.model, lambda _: setup.make_batch(gen), setup.loss_fn, args.train_steps, args.train_lr,
               warmup=max(1, min(50, args.train_steps // 10)), log_every=max(1, args.train_steps // 4), log=log.info)
    train_minutes = (time.perf_counter() - t) / 60
    dense = setup.evaluate(setup.model)
    log.info("%s seed %d: dense %s (%.1f min)", task.name, seed, dense, train_minutes)
    gen.manual_seed(10_000 + seed)  # the compression batches: the same for every method of this seed
    data = [setup.make_batch(gen) for _ in range(max(args.search_steps, args.retrain_steps, 1))]
    check = [setup.make_batch(gen) for _ in range(CHECK_BATCHES)]  # the retrain's guard: batches it never trains on
    rows = [{"method": "dense", "seed": seed, "score": None, **dense, f"{task.metric}_cut": dense[task.metric],
             "params": sum(p.numel() for p in setup.model.parameters()), "minutes": round(train_minutes, 2)}]
    smoke = {"calibration_batches": 2} if args.quick else {}  # a smoke run re-fits on two batches, not sixteen
    guard = setup.guard if args.guard == "metric" else None
    for method in args.methods:
        base, _, score = method.partition("_")
        score = score or args.score
        out = compress_run(base, setup.model, data[0][0], data, setup.loss_fn, setup.evaluate, ratio=args.ratio,
                           search_steps=args.search_steps, retrain_steps=args.retrain_steps, lr=args.lr,
                           interval=args.interval, seed=seed, score=score, check=check, distill=args.distill,
                           retrain_schedule=args.retrain_schedule, retrain_score=guard, **setup.compress, **smoke)
        towers = towers_summary(out.result.report)
        rows.append({
            "method": method, "seed": seed, "score": score if base != "magnitude" else None, **out.metrics,
            f"{task.metric}_cut": out.metrics_cut[task.metric],
            **{f"kept_{name}": t["kept_fraction"] for name, t in towers.items()},
            "layers": {name: t["layers"] for name, t in towers.items()},
            "params": out.result.report.params_after, "minutes": round(out.minutes, 2),
            **({"retrain_step_kept": kept_step(out.result.report.retrain_check)}
               if out.result.report.retrain_check else {}),
        })  # fmt: skip
        log.info("%s seed %d %s: %s %.2f right after the cut, %.2f after the retrain (%.1f min)", task.name, seed,
                 method, task.metric, rows[-1][f"{task.metric}_cut"], rows[-1][task.metric], out.minutes)
    return rows


def summarize(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per method, mean ± std over the seeds of the metric (after the retrain and right after the cut), of
    every kept fraction, and of the minutes."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        keys = [metric, f"{metric}_cut", *sorted({k for r in mine for k in r if k.startswith("kept_")}), "minutes"]
        row: dict[str, Any] = {"method": method, "seeds": len(mine)}
        for k in keys:
            v = np.array([r[k] for r in mine if k in r], dtype=float)
            row[k] = float(v.mean())
            row[f"{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append(row)
    return out


def verdict(summary: list[dict[str, Any]], metric: str, rows: list[dict[str, Any]] | None = None) -> list[str]:
    """The targets, checked on the means: unified within :data:`WITHIN_DENSE` points of dense after the retrain,
    and ahead of uniform right after the cut; with ``rows``, on how many compressed rows the retrain ended at or
    above the cut it started from."""
    by = {r["method"]: r for r in summary}
    lines = []
    pruned = [r for r in rows or [] if r["method"] != "dense"]
    if pruned:
        worse = [f"{r['method']} seed {r['seed']} ({r[f'{metric}_cut']:.2f} → {r[metric]:.2f})" for r in pruned
                 if r[metric] < r[f"{metric}_cut"]]
        lines.append(f"after the retrain ≥ right after the cut on {len(pruned) - len(worse)} of {len(pruned)} rows"
                     + (f"; below on {', '.join(worse)}" if worse else ""))
    if "dense" in by and "unified" in by:
        gap = by["dense"][metric] - by["unified"][metric]
        lines.append(f"unified after the retrain: {by['unified'][metric]:.2f} ± {by['unified'][metric + '_std']:.2f} "
                     f"against dense {by['dense'][metric]:.2f} ± {by['dense'][metric + '_std']:.2f}: "
                     f"{gap:.2f} points behind — target (≤ {WITHIN_DENSE:g}) {'met' if gap <= WITHIN_DENSE else 'NOT met'}")
    if "unified" in by and "uniform" in by:
        u, f = by["unified"][f"{metric}_cut"], by["uniform"][f"{metric}_cut"]
        lines.append(f"right after the cut: unified {u:.2f} ± {by['unified'][metric + '_cut_std']:.2f}, uniform "
                     f"{f:.2f} ± {by['uniform'][metric + '_cut_std']:.2f} — target (unified ahead) "
                     f"{'met' if u > f else 'NOT met'}")
    return lines


def _pm(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    return [{"method": r["method"], "seeds": r["seeds"],
             **{k: f"{r[k]:.2f} ± {r[k + '_std']:.2f}" if k in r else "" for k in keys}} for r in rows]


def render(task: Task, payload: dict[str, Any]) -> str:
    """The readable results: description, the summary (mean ± std), the targets, every seed's row, per layer."""
    metric = task.metric
    summary, rows = payload["summary"], payload["rows"]
    kept = sorted({k for r in summary for k in r if k.startswith("kept_") and not k.endswith("_std")})
    cfg = payload["config"]
    m = payload["machine"]
    lines = [f"# {task.name}", ""]
    lines += [f"- {k}: {v}" for k, v in task.describe.items()]
    lines += [f"- the UPop paper at 2×, for scale (not a comparison): {task.paper}",
              "- config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()),
              f"- machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}; minutes are wall-clock "
              f"(dense: training; methods: search + cut + retrain); total {payload['total_minutes']} min", ""]
    lines += [f"## Mean ± std over seeds {cfg['seeds']}", "",
              markdown_table(_pm(summary, [metric, f"{metric}_cut", *kept, "minutes"]),
                             ["method", "seeds", metric, f"{metric}_cut", *kept, "minutes"]), ""]
    lines += [f"- {v}" for v in payload["verdict"]] + ["", "## Every run", ""]
    cols = ["method", "seed", "score", metric, f"{metric}_cut", *kept, "params", "retrain_step_kept", "minutes"]
    lines += [markdown_table(rows, cols), "", "## Kept per layer (first to last)", ""]
    for r in rows:
        for tower, layers in r.get("layers", {}).items():
            lines.append(f"- seed {r['seed']} {r['method']} {tower}: " + " ".join(f"{v:.2f}" for v in layers.values()))
    return "\n".join(lines) + "\n"


def run_main(task: Task, argv: list[str] | None = None, doc: str | None = None) -> dict[str, Any]:
    """Parse the options, run every seed, write ``benchmarks/results/<name>.json`` and ``.md`` (not for
    ``--quick`` without ``--out``) and return the payload."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("upop_fx").setLevel(logging.WARNING)
    args = parse_args(task, argv, doc)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [r for seed in args.seeds for r in run_seed(task, seed, args)]
    summary = summarize(rows, task.metric)
    payload = {"task": task.name, "metric": task.metric, "about": task.describe, "paper": task.paper,
               "config": {k: v for k, v in vars(args).items() if k not in ("out", "quick")},
               "machine": machine(), "rows": rows, "summary": summary, "verdict": verdict(summary, task.metric, rows),
               "total_minutes": round((time.perf_counter() - start) / 60, 2)}  # fmt: skip
    for line in payload["verdict"]:
        log.info("%s", line)
    name = args.out or (None if args.quick else task.name)
    if name:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
        (RESULTS / f"{name}.md").write_text(render(task, payload))
        log.info("wrote %s", Path(RESULTS / f"{name}.json"))
    return payload
