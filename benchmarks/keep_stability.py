"""How much does UPop's choice depend on the order of the data? The Jaccard overlap of the entries two searches
keep, on all-MiniLM-L6-v2 with BBC News distillation batches in different orders, for three first markings:

* ``magnitude`` — the default: the first marking (step 0) ranked by weight magnitude, because distilling from
  the dense model the step-0 mask gradients are zero up to rounding (:mod:`upop_fx.search.upop`);
* ``activation`` — ``first_marking="activation"``: ranked by |weight| × the norm of the activation it multiplies
  on the calibration batches (:mod:`upop_fx.search.activation`);
* ``step-0 gradient`` — the paper's ranking from step 0 on: the first marking made from the one (zero) gradient
  accumulated so far, so rounding noise and index order decide where the search starts.

Per data order (``--seeds``: the batches' order and the search's seed), one search of ``--steps`` steps at
``--ratio`` of the FLOPs (no latency budget: nothing here is timed), no retrain; its kept entries (heads, head dims,
neurons) are compared pairwise between the orders: Jaccard ``|A ∩ B| / |A ∪ B|`` of the kept (group, channel)
pairs (:func:`upop_fx.ir.entries.keep_jaccard`), mean over the pairs. Each cut's quality right after the search (and the reconstruction) is scored as in
:mod:`benchmarks.accuracy_minilm` (headline → body MRR over all 2,225 articles). Writes
``benchmarks/results/keep_stability.json`` and ``.md``.

    python -m benchmarks.keep_stability                      # 3 first markings x 3 orders, about 15 minutes
    python -m benchmarks.keep_stability --quick --steps 4 --seeds 0 1 --out /tmp   # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from upop_fx import pipeline
from upop_fx.datasets import load_minilm
from upop_fx.ir.entries import keep_jaccard
from upop_fx.search.strategy import Prepared
from upop_fx.search.upop import UPopSearch, UPopState

from .accuracy_minilm import Corpus, dense_reference, evaluate
from .common import RESULTS, machine, markdown_table, write_results

log = logging.getLogger("benchmarks.keep_stability")

COLUMNS = ["first", "seed", "kept", "channels", "mrr", "recall_at_1", "minutes"]


class _GradientFirstState(UPopState):
    """The search with its first marking ranked by the scores accumulated at step 0, as every later one."""

    def _importance(self) -> np.ndarray:
        scores = torch.cat(self.scores).cpu().numpy()
        return scores if self.score == "sensitivity" else -scores


class _GradientFirst(UPopSearch):
    """UPop's search with its first marking ranked by the step-0 gradient."""

    def start(self, prepared: Prepared) -> UPopState:
        return _GradientFirstState(prepared, self)


#: per first marking: the search, and the options it runs with
FIRSTS = {"magnitude": (UPopSearch, {}), "activation": (UPopSearch, {"first_marking": "activation"}),
          "step-0 gradient": (_GradientFirst, {})}


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load_minilm()
    model.eval()
    corpus = Corpus(tokenizer, 64 if args.quick else None)
    dense = dense_reference(model, corpus)
    example = {k: v[:2] for k, v in corpus.bodies.items()}
    rows, kept = [], {}
    for first in args.firsts:
        search, options = FIRSTS[first]
        for seed in args.seeds:
            data = corpus.batches(args.steps + 16, args.batch_size, seed=seed)
            t0 = time.perf_counter()
            result = pipeline.run(model, example, search(), data=data, ratio=args.ratio, method="upop",
                                  budget="flops", search_steps=args.steps, retrain_steps=0, lr=args.lr,
                                  interval=args.interval, seed=seed, **options)
            kept[first, seed] = result.keep
            rows.append({"first": first, "seed": seed, "kept": sum(map(len, result.keep.values())),
                         "channels": sum(g.width for g in result.analysis.prunable), **evaluate(result.model, corpus, dense),
                         "minutes": round((time.perf_counter() - t0) / 60, 2)})
            log.info("%s", rows[-1])
    summary = []
    for first in args.firsts:
        pairs = [keep_jaccard(kept[first, a], kept[first, b]) for a, b in itertools.combinations(args.seeds, 2)]
        mrr = [r["mrr"] for r in rows if r["first"] == first]
        summary.append({"first": first, "orders": len(args.seeds), "jaccard_kept": float(np.mean(pairs)),
                        "jaccard_min": float(np.min(pairs)), "pairs": [round(p, 3) for p in pairs],
                        "mrr_mean": float(np.mean(mrr)), "mrr_std": float(np.std(mrr, ddof=1)) if len(mrr) > 1 else 0.0})
    return {"machine": machine(),
            "setup": {"steps": args.steps, "ratio": args.ratio, "budget": "flops", "interval": args.interval,
                      "lr": args.lr, "batch_size": args.batch_size, "seeds": args.seeds,
                      "articles": int(len(corpus.labels))},
            "rows": rows, "summary": summary}


def render(payload: dict[str, Any]) -> str:
    s, m = payload["setup"], payload["machine"]
    table = [{**e, "mrr": f"{e['mrr_mean']:.3f} ± {e['mrr_std']:.3f}"} for e in payload["summary"]]
    return "\n".join([
        "# Keep-set stability of the UPop search across data orders (all-MiniLM-L6-v2, BBC News)",
        "",
        f"{s['steps']} search steps (interval {s['interval']}, lr {s['lr']}, batch {s['batch_size']}) at {s['ratio']} "
        f"of the FLOPs, no retrain; data orders (and search seeds) {s['seeds']}. Jaccard of the kept entries, mean "
        f"(and minimum) over the pairs of orders; MRR right after the cut, mean ± std over the orders. Machine: "
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}.",
        "",
        markdown_table(table, ["first", "orders", "jaccard_kept", "jaccard_min", "pairs", "mrr"]),
        "",
        markdown_table(payload["rows"], COLUMNS),
    ]) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.keep_stability", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data orders (default 0 1 2)")
    p.add_argument("--firsts", nargs="+", default=list(FIRSTS), choices=list(FIRSTS),
                   help="the first markings to compare (default: all)")
    p.add_argument("--steps", type=int, default=40, help="search steps (default 40)")
    p.add_argument("--ratio", type=float, default=0.5, help="the fraction of the FLOPs to remove (default 0.5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="64 articles, for a smoke run (written as *_quick)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("--seeds needs at least two data orders to compare")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    payload = run(args)
    name = "keep_stability_quick" if args.quick else "keep_stability"
    path = write_results(name, payload, COLUMNS, args.out, markdown=render(payload))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
