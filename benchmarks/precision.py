"""How close are the channels a bf16 (or fp16) UPop search keeps to those an fp32 search keeps?

The real all-MiniLM-L6-v2 on real BBC News bodies (128 tokens, batch 8, read in sorted order and shuffled by
the seed), ratio 0.5, the UPop search with the default objective (distillation from the dense model), no
retrain; the same seed, data and settings for every precision. For each seed: the Jaccard index of the kept
(group, channel) pairs of each precision against fp32, and how many structures keep a different width. As a
yardstick, the Jaccard index between fp32 searches of two seeds (other data order): what the keep-set's
run-to-run spread is anyway.

Writes ``benchmarks/results/precision.json`` and ``.md``; records the load average before and after each
timed search (the wall times are reported, not compared, so the load does not void the result).

    python -m benchmarks.precision                 # 3 seeds, fp32 / bf16 / fp16, 40 search steps
    python -m benchmarks.precision --quick         # 1 seed, 8 steps (a smoke run)
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import time
from typing import Any

import torch

import upop_fx
from benchmarks.common import machine, markdown_table, write_results
from upop_fx.datasets import bbc_news, load_minilm
from upop_fx.ir.entries import keep_jaccard

log = logging.getLogger("benchmarks.precision")


def batches(tokenizer: Any, seed: int, steps: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    bodies = [a.body for a in bbc_news()]
    random.Random(seed).shuffle(bodies)
    out = []
    for i in range(steps):
        t = tokenizer(bodies[i * batch:(i + 1) * batch], padding="max_length", truncation=True, max_length=seq,
                      return_tensors="pt")
        out.append({"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=upop_fx.PRECISIONS)
    p.add_argument("--search-steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="one seed, 8 steps, interval 2")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.seeds, args.search_steps, args.interval = args.seeds[:1], 8, 2
    if "fp32" not in args.precisions:
        args.precisions = ["fp32", *args.precisions]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_minilm()
    rows: list[dict[str, Any]] = []
    keeps: dict[tuple[int, str], dict[int, list[int]]] = {}
    for seed in args.seeds:
        data = batches(tokenizer, seed, args.search_steps, args.batch_size, args.seq)
        for precision in args.precisions:
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            result = upop_fx.compress(model, data[0], 0.5, data=data, search_steps=args.search_steps,
                                      interval=args.interval, retrain_steps=0, seed=seed, precision=precision)
            minutes = (time.perf_counter() - t0) / 60
            keeps[(seed, precision)] = result.keep
            row = {"seed": seed, "precision": precision, "minutes": round(minutes, 2),
                   "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
                   "removed": round(result.report.prunable_cost_removed, 4),
                   "final_loss": round(result.losses["search"][-1], 5)}
            if precision != "fp32":
                ref = keeps[(seed, "fp32")]
                row["jaccard_vs_fp32"] = round(keep_jaccard(result.keep, ref), 4)
                row["widths_differing"] = sum(len(result.keep[g]) != len(ref[g]) for g in ref)
                row["structures"] = len(ref)
            rows.append(row)
            log.info("seed %d %s: %s", seed, precision, row)
    spread = [keep_jaccard(keeps[(a, "fp32")], keeps[(b, "fp32")]) for a in args.seeds for b in args.seeds if a < b]
    summary = {}
    for precision in args.precisions[1:]:
        js = [r["jaccard_vs_fp32"] for r in rows if r["precision"] == precision]
        summary[precision] = {"jaccard_vs_fp32_mean": round(statistics.mean(js), 4),
                              "jaccard_vs_fp32_min": round(min(js), 4)}
    if spread:
        summary["fp32_seed_vs_seed"] = {"jaccard_mean": round(statistics.mean(spread), 4),
                                        "jaccard_min": round(min(spread), 4)}
    setup = {"model": "all-MiniLM-L6-v2", "data": "BBC News bodies", "ratio": 0.5, "batch": args.batch_size,
             "seq": args.seq, "search_steps": args.search_steps, "interval": args.interval, "retrain_steps": 0,
             "threads": args.threads}
    columns = ["seed", "precision", "jaccard_vs_fp32", "widths_differing", "structures", "removed", "final_loss",
               "minutes", "load_before", "load_after"]
    md = (f"# Keep-sets of a mixed-precision UPop search against fp32\n\nSetup: {setup}\n\nMachine: {machine()}\n\n"
          f"{markdown_table(rows, columns)}\n\nSummary: {summary}\n")
    name = "precision_quick" if args.quick else "precision"
    path = write_results(name, {"machine": machine(), "setup": setup, "rows": rows, "summary": summary},
                         columns, markdown=md)
    log.info("summary: %s; wrote %s", summary, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
