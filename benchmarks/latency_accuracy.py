r"""At equal measured speed, does ``budget="latency"`` keep as much of all-MiniLM-L6-v2 as ``budget="flops"``?

A latency budget removes what costs time on the runtime; a FLOP budget what costs arithmetic. For the same
measured speedup they keep different models: this script compares their accuracy there. Per seed (the
distillation batches and the search's seed):

* ``latency`` — UPop (``method="upop"``) with ``budget="latency", runtime="onnxruntime-cpu",
  latency_shape=(8, 128)`` at ``1 − 1/--speedup`` of the measured latency (calibrated on the runtime);
* ``latency heads+dims`` — the same with ``granularity="heads+dims"``: whole heads compete with head dims in
  the search (a channel's mask is its head's times its dim's);
* ``latency heads+dims per_cost`` — the same with ``allocate="per_cost"``: the walk takes entries in order of
  importance per unit of measured latency saved, not of importance alone;
* ``latency heads+dims layerwise`` — the heads+dims run whose search and retrain also match the residual stream
  after every (cut) layer to the dense model's (``layer_distillation=1.0``, :mod:`upop_fx.training.layerwise`);
* ``latency heads+dims layerwise no retrain`` — the same search and reconstruction, no retrain step;
* ``flops``   — UPop with ``budget="flops"`` at the ratio whose cut runs as fast: found once per run with
  :func:`benchmarks.common.match_speedup` on magnitude cuts (the search's selection differs from magnitude's,
  so every model's own speedup is measured and reported beside its accuracy);
* ``torch-pruning`` (asked for by name) — Torch-Pruning's group-magnitude pruner (q/k/v head dims and MLP neurons
  at one ratio for every layer) at the ratio whose cut runs as fast, found the same way; then the same
  distillation for as many steps as UPop searches and retrains (it has no search; eager, so from the outputs
  alone), with the same guard (the best weights on the check batches kept).

Both search and retrain by the same unlabelled distillation on BBC News bodies and headlines, and are scored as
in :mod:`benchmarks.accuracy_minilm` (headline → body MRR and Recall@1 over all 2,225 articles, the dense
model's fixed logistic-regression probe on the test-split bodies). Every model's speedup is timed against the
dense model interleaved in ONNX Runtime CPU at batch 8, 128 tokens (files exported as deployed — dynamic axes —
as the latency tables' are; ``1 / (1 − s)`` with ``s`` the median per-round saving, as the library's own
check), on a quiet machine (:func:`benchmarks.common.quiet_timing`).

Writes ``benchmarks/results/latency_accuracy.json`` and ``.md`` (mean ± std over the seeds).

    python -m benchmarks.latency_accuracy                     # 3 seeds, about an hour on 2 cores
    python -m benchmarks.latency_accuracy --seeds 0 --steps 20 --quick     # smoke run
    python -m benchmarks.latency_accuracy --variants "latency heads+dims" "latency heads+dims per_cost" \
        --name latency_walk                                   # the two latency walks side by side
    python -m benchmarks.latency_accuracy --steps 150 --variants "latency heads+dims layerwise" torch-pruning \
        --name latency_torch_pruning                          # UPop's default against Torch-Pruning
    python -m benchmarks.latency_accuracy --steps 80 --lr 2e-4 --set retrain_steps=220 \
        --variants "latency heads+dims layerwise" torch-pruning --name latency_torch_pruning_recipe
                                                              # 300 steps spent mostly on the retrain
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import upop_fx
from upop_fx.datasets import load_minilm
from upop_fx.options import Options
from upop_fx.report import count_flops
from upop_fx.runtime.runners import runner
from upop_fx.runtime.timing import saved_interleaved
from upop_fx.training.loop import kept_step
from upop_fx.training.reconstruct import every_fourth

from .accuracy_minilm import Corpus, dense_reference, evaluate, torch_pruning
from .common import RESULTS, machine, markdown_table, match_speedup, quiet_timing, seed_summary, write_results

log = logging.getLogger("benchmarks.latency_accuracy")

BATCH, SEQ = 8, 128
COLUMNS = ["budget", "seed", "ratio", "speedup", "flops_reduction", "mrr", "recall_at_1", "probe_acc", "minutes"]
#: budget label -> the options of its compress; "flops" runs at the matched ratio
#: every variant but ``layerwise`` distils from the outputs alone, as its committed results were measured
_OUTPUTS = {"layer_distillation": 0.0}
_HEADS_DIMS = {"budget": "latency", "granularity": "heads+dims", **_OUTPUTS}
VARIANTS: dict[str, dict[str, Any]] = {
    "latency": {"budget": "latency", "granularity": "upop", **_OUTPUTS},
    "latency heads+dims": _HEADS_DIMS,
    "latency heads+dims per_cost": {**_HEADS_DIMS, "allocate": "per_cost"},
    "latency heads+dims layerwise": {**_HEADS_DIMS, "layer_distillation": 1.0},
    "latency heads+dims layerwise no retrain": {**_HEADS_DIMS, "layer_distillation": 1.0, "retrain_steps": 0},
    "flops": {"budget": "flops", "granularity": "upop", **_OUTPUTS},
}
#: Torch-Pruning's group-magnitude pruner (q/k/v head dims and MLP neurons, one ratio for every layer) at the ratio
#: whose cut runs as fast as asked, found once per run; then the same distillation for search + retrain steps
TORCH_PRUNING = "torch-pruning"
METRICS = ["speedup", "flops_reduction", "mrr", "recall_at_1", "probe_acc"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency_accuracy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--speedup", type=float, default=2.0, help="the speedup asked of the latency budget (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=80, help="search steps, and as many retrain steps (default 80)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--runs", type=int, default=20, help="timed rounds per speed measurement (default 20)")
    p.add_argument("--variants", nargs="+", choices=[*VARIANTS, TORCH_PRUNING], default=list(VARIANTS),
                   help=f"which models to compress per seed (default: every UPop variant; {TORCH_PRUNING!r}: "
                   "Torch-Pruning at the same measured speed)")
    p.add_argument("--set", nargs="+", default=[], metavar="OPTION=VALUE",
                   help="compress options for every UPop variant, over the variant's own (e.g. layer_distillation=4; "
                   "the value read as JSON, else as a string); recorded in the results' setup")
    p.add_argument("--name", default=None, help="results file name (default latency_accuracy, or "
                   "latency_accuracy_quick with --quick)")
    p.add_argument("--quick", action="store_true", help="64 articles, for a smoke run (written as *_quick)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render", action="store_true", help="measure nothing: write the .md again from the results "
                   "file's .json (its summary recomputed), as this version of the script tells it")
    args = p.parse_args(argv)
    try:
        args.set = dict(_option(item) for item in args.set)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _option(item: str) -> tuple[str, Any]:
    """``"name=value"`` as ``(name, value)``, the value read as JSON where it is (numbers, true, null), else kept
    as the string."""
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise ValueError(f"--set takes OPTION=VALUE, not {item!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load_minilm()
    model.eval()
    corpus = Corpus(tokenizer, 64 if args.quick else None)
    dense = dense_reference(model, corpus)
    rows = [{"budget": "dense", "seed": None, "ratio": 0.0, "speedup": 1.0, "flops_reduction": 1.0,
             **evaluate(model, corpus, dense, dense["bodies"]), "minutes": 0.0}]
    timing = {k: v[:BATCH] for k, v in corpus.bodies.items()}  # real articles, 128 tokens
    example = {k: v[:2] for k, v in corpus.bodies.items()}
    flops_dense = count_flops(model, (), timing)
    ratio = 1 - 1 / args.speedup
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        deployed = ((), example)  # every file exported as export_onnx writes it (dynamic axes), timed at `timing`
        dense_call = runner("onnxruntime-cpu", model, ((), timing), work, "dense", deployed)

        loads: list[dict[str, Any]] = []  # each timed group's load before and after, in the order timed

        def speedup(small: torch.nn.Module) -> float:
            call = runner("onnxruntime-cpu", small, ((), timing), work, "probe", deployed)
            (_, (saved,)), load = quiet_timing(lambda: saved_interleaved(dense_call, call, runs=args.runs, warmup=2))
            loads.append(load)
            if load["loaded"]:
                log.warning("a speed measurement ran under load: %s", load)
            return 1 / (1 - saved)  # the median per-round saving, as the library's own check

        flops_ratio, probes = None, []
        if "flops" in args.variants:  # the FLOP-budget ratio that runs as fast as asked, on magnitude cuts
            _, flops_ratio, _, probes = match_speedup(
                lambda r: upop_fx.compress(model, example, r, "magnitude", retrain_steps=0, budget="flops").model,
                speedup, args.speedup, ratio)
            log.info("flops budget: ratio %.3f for %.2fx (probes %s)", flops_ratio, args.speedup, probes)
        tp_ratio, tp_probes = None, []
        if TORCH_PRUNING in args.variants:  # the Torch-Pruning ratio that runs as fast as asked (no retrain)
            _, tp_ratio, _, tp_probes = match_speedup(lambda r: torch_pruning(model, example, r), speedup,
                                                      args.speedup, ratio)
            log.info("torch-pruning: ratio %.3f for %.2fx (probes %s)", tp_ratio, args.speedup, tp_probes)
        for seed in args.seeds:
            data = corpus.batches(2 * args.steps, args.batch_size, seed=seed)
            if TORCH_PRUNING in args.variants:
                rows.append(_torch_pruning_row(model, example, tp_ratio, data, seed, args, speedup, corpus, dense,
                                               flops_dense, timing) | {"load": loads[-1]})
            for label in (v for v in args.variants if v != TORCH_PRUNING):
                options = VARIANTS[label]
                r = flops_ratio if options["budget"] == "flops" else ratio
                extra = {"runtime": "onnxruntime-cpu", "latency_shape": (BATCH, SEQ)} if options["budget"] == "latency" else {}
                t0 = time.perf_counter()
                result = upop_fx.compress(model, example, r, "upop", data=data, search_steps=args.steps, lr=args.lr,
                                          interval=args.interval, seed=seed,
                                          **{"retrain_steps": args.steps, **options, **extra, **args.set})
                minutes = (time.perf_counter() - t0) / 60
                small = result.model
                rows.append({"budget": label, "seed": seed, "ratio": r, "speedup": speedup(small),
                             "flops_reduction": flops_dense / count_flops(small, (), timing),
                             **evaluate(small, corpus, dense), "minutes": round(minutes, 2), "load": loads[-1]})
                if result.report.latency:
                    rows[-1]["reported_speedup"] = result.report.latency["measured_speedup"]
                check = result.report.retrain_check
                if check:  # the retrain's guard: the check loss at the cut, at the end, and the step whose weights were kept
                    rows[-1]["retrain_check"] = {"cut": check[0][1], "end": check[-1][1],
                                                 "kept_step": kept_step(check)}
                log.info("%s", rows[-1])
    return {"machine": machine() | {"load_average_end": list(os.getloadavg()), "timed_groups": loads},
            "setup": {"speedup": args.speedup, "batch": BATCH, "seq": SEQ, "steps": args.steps,
                      "batch_size": args.batch_size, "lr": args.lr, "interval": args.interval,
                      "articles": int(len(corpus.labels)), "flops_ratio_probes": probes,
                      "torch_pruning_probes": tp_probes, "options": args.set},
            "rows": rows, "summary": seed_summary(rows, "budget", METRICS)}


def _torch_pruning_row(model: torch.nn.Module, example: Any, ratio: float, data: list[Any], seed: int,
                       args: argparse.Namespace, speedup: Any, corpus: Corpus, dense: dict[str, Any],
                       flops_dense: float, timing: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Torch-Pruning's cut at ``ratio``, retrained by the same distillation from the dense model for as many steps
    as UPop searches and retrains (it has no search), with the same learning-rate schedule and the same guard: the loss on UPop's check batches (the
    held-out calibration batches after the search) measured along the way and the best weights kept."""
    t0 = time.perf_counter()
    small = torch_pruning(model, example, ratio)
    held = [data[(args.steps + i) % len(data)] for i in sorted(every_fourth(Options().calibration_batches))]
    history: list[tuple[int, float]] = []
    torch.manual_seed(seed)
    steps = args.steps + args.set.get("retrain_steps", args.steps)  # UPop's search + retrain steps
    upop_fx.retrain(small, model, data, None, steps, args.lr, example, check=held, history=history,
                    schedule=args.set.get("retrain_schedule"))
    small.eval()
    row = {"budget": TORCH_PRUNING, "seed": seed, "ratio": ratio, "speedup": speedup(small),
           "flops_reduction": flops_dense / count_flops(small, (), timing), **evaluate(small, corpus, dense),
           "minutes": round((time.perf_counter() - t0) / 60, 2)}
    if history:
        row["retrain_check"] = {"cut": history[0][1], "end": history[-1][1],
                                "kept_step": kept_step(history)}
    log.info("%s", row)
    return row


def render(payload: dict[str, Any]) -> str:
    s, m = payload["setup"], payload["machine"]
    by = {e["budget"]: e for e in payload["summary"]}
    lines = [
        "# Accuracy at equal measured speed: latency budget against FLOP budget (all-MiniLM-L6-v2, BBC News)",
        "",
        f"UPop, {s['steps']} search + {s.get('options', {}).get('retrain_steps', s['steps'])} retrain steps of distillation (batch {s['batch_size']}, lr "
        f"{s['lr']}{''.join(f', {k}={v}' for k, v in s.get('options', {}).items())}); asked {s['speedup']}x of the measured ONNX Runtime CPU latency at batch {s['batch']}, "
        f"{s['seq']} tokens; the FLOP budget at the ratio whose magnitude cut measured as fast "
        f"(probes: {s['flops_ratio_probes'] or 'no FLOP-budget row'}); Torch-Pruning (q/k/v head dims and MLP "
        f"neurons at one ratio, group magnitude) at the ratio whose cut measured as fast (probes: "
        f"{s.get('torch_pruning_probes') or 'no Torch-Pruning row'}), retrained by the same distillation for "
        f"{s['steps'] + s.get('options', {}).get('retrain_steps', s['steps'])} steps with the same guard. Speedups timed against the dense model, interleaved. Machine: "
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}. Mean ± std over seeds.",
        "",
        markdown_table(payload["summary"], ["budget", "seeds", *METRICS]),
        "",
        markdown_table(payload["rows"], COLUMNS),
    ]
    for label in ("latency", "latency heads+dims"):
        if label in by and "flops" in by:
            lat, flo = by[label], by["flops"]
            lines += ["", f"- MRR: {label} {lat['mrr']} against FLOP budget {flo['mrr']} at measured speedups "
                          f"{lat['speedup']} and {flo['speedup']}: {label} {_verdict(lat, flo)}."]
    base = by.get("latency heads+dims")
    for label, what in (("latency heads+dims per_cost", "the per-cost walk"),
                        ("latency heads+dims layerwise", "layer-wise distillation")):
        other = by.get(label)
        if base and other:
            lines += ["", f"- MRR: {what} {other['mrr']} against latency heads+dims {base['mrr']} at measured "
                          f"speedups {other['speedup']} and {base['speedup']}: {what} {_verdict(other, base)}."
                          + _paired(payload["rows"], label, "latency heads+dims")]
    tp = by.get(TORCH_PRUNING)
    for label, other in by.items() if tp else ():
        if label.startswith("latency") and other["seeds"] > 1:
            margin = other["mrr_mean"] - other.get("mrr_std", 0.0) - tp["mrr_mean"]
            lines += ["", f"- MRR: {label} {other['mrr']} against Torch-Pruning {tp['mrr']} at measured speedups "
                          f"{other['speedup']} and {tp['speedup']}: {label} {_verdict(other, tp)}; its mean − std is "
                          f"{abs(margin):.3f} {'above' if margin > 0 else 'BELOW'} Torch-Pruning's mean."
                          + _paired(payload["rows"], label, TORCH_PRUNING)]
    kept = [f"{r['budget']} seed {r['seed']}: step {r['retrain_check']['kept_step']}" for r in payload["rows"]
            if "retrain_check" in r]
    groups = m.get("timed_groups")
    if groups:  # each speed measurement's load average before and after (the group itself raises it)
        lines += ["", "- Timed groups, load average before → after (max before "
                      f"{max(g['load_before'] for g in groups):.2f}; groups flagged as loaded: "
                      f"{sum(g['loaded'] for g in groups)}): "
                      + ", ".join(f"{g['load_before']:.2f} → {g['load_after']:.2f}" for g in groups) + "."]
    if kept:
        lines += ["", "- The retrain's weights kept (the step with the lowest loss on the check batches; 0: the cut): "
                      + "; ".join(kept) + "."]
    return "\n".join(lines) + "\n"


def _verdict(a: dict[str, Any], b: dict[str, Any], metric: str = "mrr") -> str:
    """How ``a``'s mean compares with ``b``'s: tied when they differ by less than the larger standard deviation."""
    gap = a[f"{metric}_mean"] - b[f"{metric}_mean"]
    if abs(gap) < max(a.get(f"{metric}_std", 0.0), b.get(f"{metric}_std", 0.0)):
        return f"tied (they differ by {gap:+.3f}, under one standard deviation)"
    return "ahead" if gap > 0 else "BEHIND"


def _paired(rows: list[dict[str, Any]], a: str, b: str, metric: str = "mrr") -> str:
    """`` Seed by seed ...``: the mean ± std of ``a``'s metric minus ``b``'s over the seeds both ran (the same data
    order and search seed), and on how many ``a`` is ahead; empty with fewer than two such seeds."""
    mine = {r["seed"]: r[metric] for r in rows if r["budget"] == a}
    theirs = {r["seed"]: r[metric] for r in rows if r["budget"] == b}
    gaps = np.array([mine[s] - theirs[s] for s in mine if s in theirs])
    if len(gaps) < 2:
        return ""
    return (f" Seed by seed (same data order and search seed): {gaps.mean():+.3f} ± {gaps.std(ddof=1):.3f}, ahead on "
            f"{int((gaps > 0).sum())} of {len(gaps)}.")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    name = args.name or ("latency_accuracy_quick" if args.quick else "latency_accuracy")
    if args.render:
        payload = json.loads((args.out / f"{name}.json").read_text())
        payload["summary"] = seed_summary(payload["rows"], "budget", METRICS)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        payload = run(args)
    path = write_results(name, payload, COLUMNS, args.out, markdown=render(payload))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
