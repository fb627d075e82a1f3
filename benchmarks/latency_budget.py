"""Does ``budget="latency"`` deliver the speedup asked for, on the runtime it was measured on?

For each model (all-MiniLM-L6-v2 with its real weights and BBC News text; a BERT-base-sized and a
ViT-B/16-sized config with random weights), each batch size and each asked speedup ``S`` (ratio ``1 − 1/S`` of
the measured latency), the script compresses with ``method="magnitude"`` twice:

* ``latency`` — ``budget="latency", runtime="onnxruntime-cpu", latency_shape=(batch, seq)``;
* ``flops``   — ``budget="flops"`` at the same ratio (what a FLOP budget gives for the same request),

exports both with :func:`upop_fx.export.export_onnx` and times dense, ``latency`` and ``flops`` interleaved in
ONNX Runtime CPU (:func:`upop_fx.timing.time_interleaved`, order reversed every other round, median of
``--runs``). A row gives the measured speedup, the speedup ``report.latency`` predicted, the prediction error
(predicted ÷ measured − 1) and the FLOPs reduction. The load average is recorded before and after each timed
group; a group timed under a load above ``--max-load`` is timed again (up to ``--tries``), and one that never
ran quiet is kept in the JSON with ``"loaded": true`` but left out of the table (the guard:
:func:`benchmarks.common.quiet_timing`). The latency tables are measured afresh in every run (a temporary
cache shared by the run's asked speedups) unless ``--cache`` names one.

Writes ``benchmarks/results/latency_budget.json`` and ``.md``.

    python -m benchmarks.latency_budget --models minilm --batches 8 --speedups 2     # one row, minutes
    python -m benchmarks.latency_budget                                              # the whole grid
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import upop_fx  # noqa: E402
from benchmarks.common import machine, markdown_table, quiet_timing, write_results  # noqa: E402
from benchmarks.latency import build  # noqa: E402
from upop_fx.export import export_onnx  # noqa: E402
from upop_fx.ort import ort_feeds, ort_session  # noqa: E402
from upop_fx.report import count_flops  # noqa: E402
from upop_fx.timing import time_interleaved  # noqa: E402

log = logging.getLogger("latency_budget")

COLUMNS = ["model", "batch", "seq", "asked", "budget", "measured_speedup", "predicted_speedup", "prediction_error",
           "flops_reduction", "dense_ms", "ms", "load_before", "load_after", "others"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base", "vit-b16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--seq", type=int, default=128, help="tokens per text example (the ViT has 197)")
    p.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    p.add_argument("--runs", type=int, default=30, help="timed rounds per group (default 30)")
    p.add_argument("--max-load", type=float, default=1.5, help="a group timed under a higher load is rerun")
    p.add_argument("--tries", type=int, default=3, help="times to try a group before keeping it as loaded")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of <out>/latency_budget.json that this run does not measure again")
    p.add_argument("--cache", type=Path, default=None,
                   help="latency-table cache to use (default: a fresh one for this run, so every table is measured)")
    return p.parse_args(argv)


def _session(model: torch.nn.Module, example: dict[str, torch.Tensor], path: Path) -> Any:
    onnx = export_onnx(model, example, path, optimize=False).path
    session = ort_session(onnx, spinning=False)  # timed in turn: spinning threads would slow the next session
    feeds = ort_feeds(session, (), example)
    return lambda: session.run(None, feeds)


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    spec = build(name)
    rows = []
    for batch in args.batches:
        example = spec.make_inputs(max(batch, 2), args.seq)  # capture needs a batch of 2; timing uses `batch`
        timing = {k: v[:batch] for k, v in example.items()}
        seq = args.seq if spec.text else None
        flops_dense = count_flops(spec.model, (), timing)
        with tempfile.TemporaryDirectory() as d:
            dense = _session(spec.model, example, Path(d) / "dense.onnx")
            for asked in args.speedups:
                ratio = 1 - 1 / asked
                models, predicted = {}, {}
                for budget in ("latency", "flops"):
                    extra = {"runtime": "onnxruntime-cpu", "latency_shape": (batch, seq)} if budget == "latency" else {}
                    t0 = time.perf_counter()
                    try:
                        result = upop_fx.compress(spec.model, example, ratio, method="magnitude", retrain_steps=0,
                                                  budget=budget, **extra)
                    except upop_fx.ConfigError as exc:  # more than the prunable structures can save
                        log.warning("%s b%d %.1fx %s: %s", name, batch, asked, budget, exc)
                        continue
                    log.info("%s b%d asked %.1fx budget %s: compressed in %.0f s", name, batch, asked, budget,
                             time.perf_counter() - t0)
                    models[budget] = result.model
                    if result.report.latency:
                        predicted[budget] = result.report.latency["predicted_speedup"]
                if not models:
                    continue
                calls = [dense] + [_session(m, example, Path(d) / f"{b}.onnx") for b, m in models.items()]
                ms, load = quiet_timing(lambda c=calls: time_interleaved(*c, runs=args.runs, warmup=3, alternate=True),
                                        args.max_load, args.tries)
                for (budget, model), t in zip(models.items(), ms[1:]):
                    measured = ms[0] / t
                    pred = predicted.get(budget)
                    rows.append({
                        "model": name, "batch": batch, "seq": args.seq if spec.text else 197, "asked": asked,
                        "budget": budget, "ratio": ratio, "measured_speedup": measured, "predicted_speedup": pred,
                        "prediction_error": pred / measured - 1 if pred else None,
                        "flops_reduction": flops_dense / count_flops(model, (), timing),
                        "dense_ms": ms[0], "ms": t, **load,
                    })  # fmt: skip
                    log.info("%s", {k: rows[-1][k] for k in COLUMNS})
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.cache is None:  # tables measured afresh in this run (shared by its asked speedups), not an old cache
        tmp = tempfile.TemporaryDirectory()
        os.environ["UPOP_FX_CACHE"] = tmp.name
    else:
        os.environ["UPOP_FX_CACHE"] = str(args.cache)
    info = machine() | {"load_average_start": list(os.getloadavg())}
    rows = [r for name in args.models for r in run_model(name, args)]
    info["load_average_end"] = list(os.getloadavg())
    old = args.out / "latency_budget.json"
    if args.append and old.is_file():
        def key(r: dict[str, Any]) -> tuple[Any, ...]:
            return r["model"], r["batch"], r["asked"], r["budget"]

        new = {key(r) for r in rows}
        previous = json.loads(old.read_text())
        rows = [r for r in previous["rows"] if key(r) not in new] + rows
        info = {"runs": [*previous.get("machine", {}).get("runs", [previous.get("machine", {})]), info]}
    quiet = [r for r in rows if not r["loaded"]]
    md = "\n\n".join([
        "# Latency budget: asked against measured speedup (ONNX Runtime CPU)",
        f"Machine: {info}. Dense and both cuts timed interleaved per group; groups timed with a load average above "
        f"{args.max_load} before, or with other processes using more than half a core during the group (*others*, in "
        f"cores), are left out of this table ({len(rows) - len(quiet)} of {len(rows)}; they are in the JSON). "
        "*predicted*: `report.latency['predicted_speedup']` of the final selection (after any re-selection).",
        markdown_table(quiet, COLUMNS),
    ])  # fmt: skip
    write_results("latency_budget", {"machine": info, "rows": rows}, COLUMNS, args.out, markdown=md)
    print(markdown_table(quiet, COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
