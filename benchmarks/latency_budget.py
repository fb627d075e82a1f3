"""Does ``budget="latency"`` deliver the speedup asked for, on the runtime it was measured on?

For each model (all-MiniLM-L6-v2 with its real weights and BBC News text; a BERT-base-sized and a
ViT-B/16-sized config with random weights), each batch size and each asked speedup ``S`` (ratio ``1 − 1/S`` of
the measured latency), the script compresses with ``method="magnitude"`` twice:

* ``latency`` — ``budget="latency", runtime="onnxruntime-cpu", latency_shape=(batch, seq)``;
* ``latency heads+dims`` — the same with ``granularity="heads+dims"`` (whole heads compete with head dims;
  the tables then also time head counts);
* ``flops``   — ``budget="flops"`` at the same ratio (what a FLOP budget gives for the same request),

and, to compare at equal speed, two models pruned to the speedup the ``latency`` model measured (the ratio found
by :func:`benchmarks.common.match_speedup`: a few probes, each timed against the dense model as ONNX files
exported as deployed, at the latency shape):

* ``flops@speed``          — ``budget="flops"``;
* ``torch-pruning@speed``  — Torch-Pruning (:func:`benchmarks.latency.tp_prune`: whole heads and MLP widths,
  uniform per layer; needs ``pip install -e '.[bench]'``),

exports every model with :func:`upop_fx.runtime.export.export_onnx` and times them and the dense model interleaved in
ONNX Runtime CPU (:func:`upop_fx.runtime.timing.saved_interleaved`, order reversed every other round, ``--runs`` rounds:
a model's speedup is ``1 / (1 − s)`` with ``s`` the median over the rounds of the fraction of that round's dense
time it saves — the protocol of the library's own check, which a slowdown lasting a few rounds cannot bias).
A row gives the measured speedup, the speedup ``report.latency`` predicted and the one the library's
own check measured (``check_speedup``, timed during ``compress``), the prediction error
(predicted ÷ measured − 1), the FLOPs reduction, the parameters left, (``floor_summed``, ``floor_measured``, in
the JSON) what the tables sum to with every structure at its narrowest beside what that cut measured, and
(``table_seconds``) how long the latency model took (the first asked speedup of a batch measures every table;
the later ones read them from the run's cache and time only the dense model). The load average is recorded before and after each timed
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
from benchmarks.common import machine, markdown_table, match_speedup, quiet_timing, write_results  # noqa: E402
from benchmarks.latency import build, tp_prune  # noqa: E402
from upop_fx.options import RUNTIMES, check_runtime  # noqa: E402
from upop_fx.report import count_flops  # noqa: E402
from upop_fx.runtime.export import export_onnx  # noqa: E402
from upop_fx.runtime.runners import ort_providers, runner  # noqa: E402
from upop_fx.runtime.sessions import ort_feeds, ort_session  # noqa: E402
from upop_fx.runtime.timing import saved_interleaved  # noqa: E402

log = logging.getLogger("latency_budget")

#: the latency-budget rows: label -> granularity
VARIANTS = {"latency": "upop", "latency heads+dims": "heads+dims"}
COLUMNS = ["model", "runtime", "batch", "seq", "asked", "budget", "ratio", "measured_speedup", "predicted_speedup",
           "check_speedup",
           "prediction_error", "flops_reduction", "params", "dense_ms", "ms", "table_seconds", "load_before",
           "load_after", "others"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base", "vit-b16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--seq", type=int, default=128, help="tokens per text example (the ViT has 197)")
    p.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    p.add_argument("--runtime", default="onnxruntime-cpu", choices=RUNTIMES,
                   help="the runtime of the latency budget and of every timing (default onnxruntime-cpu)")
    p.add_argument("--runs", type=int, default=30, help="timed rounds per group (default 30)")
    p.add_argument("--no-match", dest="match", action="store_false",
                   help="skip the rows matched to the latency budget's measured speedup (flops@speed, torch-pruning@speed)")
    p.add_argument("--probe-runs", type=int, default=10, help="timed rounds per probe of the speed match (default 10)")
    p.add_argument("--max-load", type=float, default=1.5, help="a group timed under a higher load is rerun")
    p.add_argument("--tries", type=int, default=3, help="times to try a group before keeping it as loaded")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of <out>/latency_budget.json that this run does not measure again")
    p.add_argument("--cache", type=Path, default=None,
                   help="latency-table cache to use (default: a fresh one for this run, so every table is measured)")
    return p.parse_args(argv)


def _session(model: torch.nn.Module, example: dict[str, torch.Tensor], timing: dict[str, torch.Tensor], path: Path,
             runtime: str) -> Any:
    """What the user deploys, ready to time at ``timing``: for ONNX Runtime the file :func:`export_onnx` writes
    (dynamic axes); for PyTorch the module itself on the runtime's device."""
    if runtime.startswith("torch"):
        return runner(runtime, model, ((), timing), path.parent, path.stem)
    onnx = export_onnx(model, example, path, optimize=False).path
    session = ort_session(onnx, providers=ort_providers(runtime), spinning=False)  # timed in turn: no spinning
    feeds = ort_feeds(session, (), timing)
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
            work = Path(d)
            dense = _session(spec.model, example, timing, work / "dense.onnx", args.runtime)
            dense_probe = runner(args.runtime, spec.model, ((), timing), work, "dense-probe",
                                 _as_deployed(example, args.runtime))
            for asked in args.speedups:
                ratio = 1 - 1 / asked
                models, info = {}, {}
                for budget in (*VARIANTS, "flops"):
                    extra = {"runtime": args.runtime, "latency_shape": (batch, seq)} if budget != "flops" else {}
                    t0 = time.perf_counter()
                    try:
                        result = upop_fx.compress(spec.model, example, ratio, method="magnitude", retrain_steps=0,
                                                  budget=budget.split()[0], granularity=VARIANTS.get(budget, "upop"),
                                                  **extra)  # fmt: skip
                    except upop_fx.ConfigError as exc:  # more than the prunable structures can save
                        log.warning("%s b%d %.1fx %s: %s", name, batch, asked, budget, exc)
                        continue
                    log.info("%s b%d asked %.1fx budget %s: compressed in %.0f s", name, batch, asked, budget,
                             time.perf_counter() - t0)
                    models[budget] = result.model
                    info[budget] = {"ratio": ratio, "compress_seconds": time.perf_counter() - t0}
                    if result.report.latency:
                        lat = result.report.latency
                        info[budget] |= {"predicted_speedup": lat["predicted_speedup"],
                                         "check_speedup": lat["measured_speedup"],
                                         "table_seconds": lat["table_seconds"],
                                         "floor_summed": lat["floor_summed"], "floor_measured": lat["floor_measured"],
                                         "reselections": len(lat["rounds"]) - 1}
                if "latency" not in models:
                    continue
                if args.match:  # the flops budget and Torch-Pruning at the latency budget's measured speedup
                    for label, (model, extra) in _matched(spec, example, timing, work, dense_probe,
                                                          models["latency"], ratio, args).items():
                        models[label], info[label] = model, extra
                calls = [dense] + [_session(m, example, timing, work / f"{b}.onnx", args.runtime)
                                   for b, m in models.items()]
                (dense_ms, saved), load = quiet_timing(
                    lambda c=calls: saved_interleaved(*c, runs=args.runs, warmup=3), args.max_load, args.tries)
                for (budget, model), f in zip(models.items(), saved):
                    measured, t = 1 / (1 - f), dense_ms * (1 - f)  # per-round saving, as the library's check
                    pred = info[budget].get("predicted_speedup")
                    rows.append({
                        "model": name, "runtime": args.runtime, "batch": batch, "seq": args.seq if spec.text else 197, "asked": asked,
                        "budget": budget, **info[budget], "measured_speedup": measured,
                        "prediction_error": pred / measured - 1 if pred else None,
                        "flops_reduction": flops_dense / count_flops(model, (), timing),
                        "params": sum(p.numel() for p in model.parameters()),
                        "dense_ms": dense_ms, "ms": t, **load,
                    })  # fmt: skip
                    log.info("%s", {k: rows[-1].get(k) for k in COLUMNS})
    return rows


def _matched(spec: Any, example: dict[str, torch.Tensor], timing: dict[str, torch.Tensor], work: Path,
             dense_probe: Any, latency_model: torch.nn.Module, ratio: float, args: argparse.Namespace
             ) -> dict[str, tuple[torch.nn.Module, dict[str, Any]]]:
    """``flops@speed`` and ``torch-pruning@speed``: pruned to the speedup ``latency_model`` measures."""
    def speedup(model: torch.nn.Module) -> float:
        return _speedup(dense_probe, example, model, timing, work, args)

    target = speedup(latency_model)
    makers = {"flops@speed": lambda r: upop_fx.compress(spec.model, example, r, method="magnitude", retrain_steps=0,
                                                        budget="flops").model}
    if _has_torch_pruning():
        makers["torch-pruning@speed"] = lambda r: tp_prune(spec, example, r)
    out = {}
    for label, make in makers.items():
        model, r, _, probes = match_speedup(make, speedup, target, ratio)
        out[label] = model, {"ratio": r, "target_speedup": target, "probes": probes}
    return out


def _has_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        log.warning("torch-pruning is not installed (pip install -e '.[bench]'): no Torch-Pruning rows")
        return False
    return True


def _as_deployed(example: dict[str, torch.Tensor], runtime: str) -> tuple[tuple[()], dict[str, torch.Tensor]] | None:
    """What a timed ONNX file is exported at (as ``export_onnx`` writes it: dynamic axes); None for PyTorch."""
    return ((), example) if runtime.startswith("onnxruntime") else None


def _speedup(dense: Any, example: dict[str, torch.Tensor], model: torch.nn.Module, timing: dict[str, torch.Tensor],
             work: Path, args: argparse.Namespace) -> float:
    """Dense over ``model``, timed interleaved at the latency shape (ONNX files exported as deployed, as the
    latency tables are)."""
    call = runner(args.runtime, model, ((), timing), work, "probe", _as_deployed(example, args.runtime))
    (_, (saved,)), _ = quiet_timing(lambda: saved_interleaved(dense, call, runs=args.probe_runs, warmup=2),
                                    args.max_load, args.tries)
    return 1 / (1 - saved)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    check_runtime("--runtime", args.runtime)  # a CUDA runtime on a machine without one fails here, before anything is built
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
            return r.get("runtime", "onnxruntime-cpu"), r["model"], r["batch"], r["asked"], r["budget"]

        new = {key(r) for r in rows}
        previous = json.loads(old.read_text())
        rows = [r for r in previous["rows"] if key(r) not in new] + rows
        info = {"runs": [*previous.get("machine", {}).get("runs", [previous.get("machine", {})]), info]}
    quiet = [r for r in rows if not r["loaded"]]
    md = "\n\n".join([
        f"# Latency budget: asked against measured speedup ({', '.join(sorted({r.get('runtime', 'onnxruntime-cpu') for r in rows}))})",
        f"Machine: {info}. Dense and both cuts timed interleaved per group; groups timed with a load average above "
        f"{args.max_load} before, or with other processes using more than half a core during the group (*others*, in "
        f"cores), are left out of this table ({len(rows) - len(quiet)} of {len(rows)}; they are in the JSON). "
        "*predicted*: `report.latency['predicted_speedup']` of the final selection (after any re-selection); "
        "*check*: `report.latency['measured_speedup']`, the library's own measurement during `compress`. "
        "*latency* and *flops* answer the same request (ratio 1 − 1/asked); *flops@speed* and *torch-pruning@speed* "
        "are pruned to the speedup the *latency* model measured (their ratio found by timing probes), so the FLOPs "
        "and parameters they keep compare at equal speed. *table_seconds*: the latency model's measurement time.",
        markdown_table(quiet, COLUMNS),
        *([] if any(r.get("runtime", "").endswith("cuda") for r in rows) else [
            "GPU rows (`--runtime torch-cuda`, `--runtime onnxruntime-cuda`) are still to be measured: no GPU was "
            "available to these runs."]),
    ])  # fmt: skip
    write_results("latency_budget", {"machine": info, "rows": rows}, COLUMNS, args.out, markdown=md)
    print(markdown_table(quiet, COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
