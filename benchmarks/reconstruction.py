"""At a measured 2x on ONNX Runtime CPU, how much of all-MiniLM-L6-v2 does each ingredient after the cut keep?

Every model is asked ``budget="latency"`` (``runtime="onnxruntime-cpu"``, batch 8, 128 tokens), so every cut
runs about as fast (each one's own speedup is measured beside its accuracy). Rows per seed (the seed orders the
distillation and calibration batches, and seeds the search):

* one-shot cuts with no training at all, with and without reconstruction (``reconstruct=``; the layers re-fitted
  by least squares on ``calibration_batches`` batches): ``magnitude`` (mean |weight|, reads no data) and
  ``activation`` (|weight| x activation norm on the calibration batches), each allocated ``uniform`` (the same
  fraction of every layer) and ``unified`` (one ranking over all layers, the default);
* ``upop``: the search with the defaults (reconstruction after the cut), with no retrain, then the same model
  after the retrain (the pipeline's own :func:`upop_fx.pipeline.retrain_result`, on the same batches and check
  batches ``compress`` would use: the weights with the lowest check loss kept).

Scored as :mod:`benchmarks.accuracy_minilm` (headline -> body MRR and Recall@1 over all 2,225 articles; the
dense model's fixed logistic-regression probe on the test-split bodies). Speedups timed against the dense model
interleaved in ONNX Runtime CPU (:func:`benchmarks.common.quiet_timing`). Writes
``benchmarks/results/reconstruction.json`` and ``.md`` (mean ± std over the seeds).

    python -m benchmarks.reconstruction                      # 3 seeds, about 35 minutes on 2 cores
    python -m benchmarks.reconstruction --seeds 0 --steps 8 --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import upop_fx
from upop_fx.datasets import load_minilm
from upop_fx.pipeline import retrain_result
from upop_fx.runtime.runners import runner
from upop_fx.runtime.timing import saved_interleaved
from upop_fx.training.loop import Batches, kept_step

from .accuracy_minilm import Corpus, dense_reference, evaluate
from .common import RESULTS, machine, markdown_table, quiet_timing, seed_summary, write_results

log = logging.getLogger("benchmarks.reconstruction")

BATCH, SEQ = 8, 128
COLUMNS = ["row", "seed", "speedup", "mrr", "mrr_vs_dense", "recall_at_1", "probe_acc", "minutes"]
METRICS = ["speedup", "mrr", "mrr_vs_dense", "recall_at_1", "probe_acc"]
#: one-shot rows: label -> (method, allocate, reconstruct)
ONE_SHOT = {
    "magnitude uniform": ("magnitude", "uniform", False),
    "magnitude uniform + reconstruction": ("magnitude", "uniform", True),
    "activation uniform + reconstruction": ("activation", "uniform", True),
    "activation unified + reconstruction": ("activation", "unified", True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reconstruction", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--speedup", type=float, default=2.0, help="the speedup asked (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=80, help="search steps, and as many retrain steps (default 80)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--calibration", type=int, default=16, help="calibration batches (default 16)")
    p.add_argument("--runs", type=int, default=20, help="timed rounds per speed measurement (default 20)")
    p.add_argument("--quick", action="store_true", help="64 articles, for a smoke run (written as *_quick)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load_minilm()
    model.eval()
    corpus = Corpus(tokenizer, 64 if args.quick else None)
    dense = dense_reference(model, corpus)
    base = evaluate(model, corpus, dense, dense["bodies"])
    rows = [{"row": "dense", "seed": None, "speedup": 1.0, **base, "mrr_vs_dense": 1.0, "minutes": 0.0}]
    timing = {k: v[:BATCH] for k, v in corpus.bodies.items()}
    example = {k: v[:2] for k, v in corpus.bodies.items()}
    latency = dict(ratio=1 - 1 / args.speedup, budget="latency", runtime="onnxruntime-cpu", latency_shape=(BATCH, SEQ))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        deployed = ((), example)
        dense_call = runner("onnxruntime-cpu", model, ((), timing), work, "dense", deployed)

        def speedup(small: torch.nn.Module) -> tuple[float, dict[str, Any]]:
            call = runner("onnxruntime-cpu", small, ((), timing), work, "probe", deployed)
            (_, (saved,)), load = quiet_timing(lambda: saved_interleaved(dense_call, call, runs=args.runs, warmup=2))
            if load["loaded"]:
                log.warning("a speed measurement ran under load: %s", load)
            return 1 / (1 - saved), load

        def row(label: str, seed: int, small: torch.nn.Module, minutes: float) -> dict[str, Any]:
            scores = evaluate(small, corpus, dense)
            measured, load = speedup(small)
            out = {"row": label, "seed": seed, "speedup": measured, **scores,
                   "mrr_vs_dense": scores["mrr"] / base["mrr"], "minutes": round(minutes, 2),
                   "load_before": load["load_before"], "load_after": load["load_after"], "timing_loaded": load["loaded"]}
            log.info("%s", out)
            return out

        for seed in args.seeds:
            data = corpus.batches(2 * args.steps, args.batch_size, seed=seed)
            for label, (method, allocate, reconstruct) in ONE_SHOT.items():
                if method == "magnitude" and not reconstruct and seed != args.seeds[0]:
                    continue  # reads no data: the same cut for every seed
                t0 = time.perf_counter()
                result = upop_fx.compress(model, example, method=method, allocate=allocate, data=data,
                                          reconstruct=reconstruct, calibration_batches=args.calibration,
                                          retrain_steps=0, seed=seed, **latency)
                rows.append(row(label, seed, result.model, (time.perf_counter() - t0) / 60))
            t0 = time.perf_counter()
            result = upop_fx.compress(model, example, method="upop", data=data, search_steps=args.steps,
                                      calibration_batches=args.calibration, retrain_steps=0, seed=seed, **latency)
            searched = (time.perf_counter() - t0) / 60
            rows.append(row("upop + reconstruction, no retrain", seed, result.model, searched))
            t0 = time.perf_counter()
            retrained = copy.deepcopy(result)
            teacher = upop_fx.capture(model, example).gm
            check = data[: args.calibration]  # what compress holds: the batches read right after the search
            with upop_fx.pipeline.seeded(seed):
                retrain_result(retrained, teacher, Batches(data, example), None, args.steps, 1e-4, example,
                               check=check)
            rows.append(row("upop + reconstruction + retrain", seed, retrained.model,
                            searched + (time.perf_counter() - t0) / 60))
            rows[-1]["kept_step"] = kept_step(retrained.report.retrain_check)
    return {"machine": machine() | {"load_average_end": list(os.getloadavg())},
            "setup": {"speedup": args.speedup, "batch": BATCH, "seq": SEQ, "steps": args.steps,
                      "batch_size": args.batch_size, "calibration_batches": args.calibration, "lr": 1e-4,
                      "articles": int(len(corpus.labels))},
            "rows": rows, "summary": seed_summary(rows, "row", METRICS)}


def render(payload: dict[str, Any]) -> str:
    s, m = payload["setup"], payload["machine"]
    lines = [
        "# What each ingredient after the cut keeps at a measured 2x (all-MiniLM-L6-v2, BBC News, ONNX Runtime CPU)",
        "",
        f"Asked {s['speedup']}x of the measured ONNX Runtime CPU latency at batch {s['batch']}, {s['seq']} tokens. "
        f"Reconstruction on {s['calibration_batches']} calibration batches of {s['batch_size']}; UPop: "
        f"{s['steps']} search steps, then {s['steps']} retrain steps of distillation (lr {s['lr']}), the weights "
        f"with the lowest check loss kept. One-shot rows: no training at all. Machine: {m['cpu']}, {m['cores']} "
        "cores, torch " + f"{m['torch']}. Mean ± std over seeds (the magnitude cut without reconstruction reads no "
        "data: one run).",
        "",
        markdown_table(payload["summary"], ["row", "seeds", *METRICS]),
        "",
        markdown_table(payload["rows"], COLUMNS),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    payload = run(args)
    name = "reconstruction_quick" if args.quick else "reconstruction"
    path = write_results(name, payload, COLUMNS, args.out, markdown=render(payload))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
