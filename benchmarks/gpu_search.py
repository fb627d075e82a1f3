"""Does the UPop search + retrain run end to end on CUDA, does the fused Triton attention give the same
keep-sets as the unfused masked graph, and how close are bf16 keep-sets to fp32?

A BERT-base-sized ``transformers.BertModel`` (hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 30522,
SDPA attention, random weights, ``torch.manual_seed(0)``) goes through the public pipeline,
``upop_fx.pipeline.run(model, example, UPopSearch(fuse=...), ratio=0.5, data=batches, precision=...)``,
on batch 8 × sequence 128 random token ids (a fixed ``torch.Generator`` seed; half the rows of each batch end
in padding, so the kernels' key-padding path runs too). The objective is the pipeline's default: distillation
from the dense model. One row per run:

* ``fused-fp32``    — ``fuse=True``: on CUDA the masked attention sites run in upop_fx's Triton kernel;
* ``unfused-fp32``  — ``fuse=False``: the masked graph as it is (masks multiplied in, then SDPA);
* ``fused-bf16``    — ``fuse=True`` under ``precision="bf16"`` (autocast);
* ``unfused-bf16``  — and, time allowing (``--budget-s``), ``fused-fp32-repeat``: the first row again, to
  tell a kernel difference from run-to-run noise.

Each row reports wall seconds (``torch.cuda.synchronize()`` on both sides), peak CUDA memory
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), how many attention sites were fused,
the first and last losses of each phase, and params / FLOPs before and after. The comparisons are the Jaccard
index of the keep-sets, taken over (group id, kept channel) pairs, and whether they are identical: fused vs
unfused fp32 (the target is identical), bf16 vs fp32 (how close). The latency rows time, right after the
first row, the original module, the dense captured graph (``result.dense``) and the compressed
``result.model`` at the same batch, in fp32 and under bf16 autocast: medians of interleaved runs
(``upop_fx.runtime.speed.time_interleaved``), each call followed by ``torch.cuda.synchronize()``.

Writes ``--out`` (JSON: ``{"machine": {...}, "config": {...}, "rows": [...], "comparisons": [...],
"latency": [...]}``, rewritten after every row so a run cut short keeps what it measured) and a markdown
report with the same stem (``.md``). Exits 1 when a row failed (the others still run), 0 otherwise.

Without CUDA it measures nothing: it says so, writes ``{"skipped": "no CUDA device", "machine": {...}}`` and
exits 0. ``--cpu-smoke`` runs the same code on the CPU with a tiny config, so CI can test the code path; the
fusion is a no-op off CUDA, so there the fused rows compute exactly what the unfused rows do.

    python -m benchmarks.gpu_search                      # BERT-base, S=40, R=20 (≤ 4 minutes on an H200)
    python -m benchmarks.gpu_search --quick              # a small BERT, a few steps
    python -m benchmarks.gpu_search --cpu-smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine, markdown_table, write_results  # noqa: E402

log = logging.getLogger("gpu_search")

QUESTION = __doc__.split("\n\n")[0].replace("\n", " ")
OUT = RESULTS / "gpu_search.json"
# name: (fuse, precision); the first three always run, the others when the time budget allows
ROWS: dict[str, tuple[bool, str]] = {
    "fused-fp32": (True, "fp32"),
    "unfused-fp32": (False, "fp32"),
    "fused-bf16": (True, "bf16"),
    "unfused-bf16": (False, "bf16"),
    "fused-fp32-repeat": (True, "fp32"),
}
REQUIRED = ("fused-fp32", "unfused-fp32", "fused-bf16")
# (a, b, what it answers): Jaccard of a's keep-set against b's
COMPARISONS = (
    ("fused-fp32", "unfused-fp32", "fused vs unfused, fp32 (target: identical)"),
    ("fused-bf16", "fused-fp32", "bf16 vs fp32, fused"),
    ("unfused-bf16", "unfused-fp32", "bf16 vs fp32, unfused"),
    ("fused-bf16", "unfused-bf16", "fused vs unfused, bf16"),
    ("fused-fp32-repeat", "fused-fp32", "run-to-run, fused fp32 (determinism)"),
)


@dataclass
class Config:
    """Model and run sizes."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab: int = 30522
    batch: int = 8
    seq: int = 128
    n_batches: int = 40
    search_steps: int = 40
    retrain_steps: int = 20
    interval: int = 10
    ratio: float = 0.5
    lr: float = 1e-4
    latency_runs: int = 30
    latency_warmup: int = 5


QUICK = dict(hidden=256, layers=4, heads=4, intermediate=1024, n_batches=16, search_steps=10, retrain_steps=4,
             interval=5, latency_runs=20, latency_warmup=3)
CPU_SMOKE = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=1000, batch=2, seq=16, n_batches=6,
                 search_steps=4, retrain_steps=2, interval=2, latency_runs=3, latency_warmup=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="CUDA, a small BERT (hidden 256, 4 layers), S=10, R=4: checks the code path in seconds")
    mode.add_argument("--cpu-smoke", action="store_true",
                      help="run on the CPU with a tiny BERT (hidden 64, 2 layers), S=4, R=2 (for CI; fusion is a "
                           "no-op off CUDA, so fused rows equal unfused rows)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, metavar="ROW",
                   help=f"rows to run (default: {' '.join(ROWS)}; the last two only within --budget-s)")
    p.add_argument("--search-steps", type=int, default=None, help="S, UPop search steps (default 40)")
    p.add_argument("--retrain-steps", type=int, default=None, help="R, retraining steps (default 20)")
    p.add_argument("--interval", type=int, default=None, help="UPop re-selection interval (default 10)")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="run an optional row only if the time so far plus the slowest row so far fits in this "
                        "many seconds (default 200)")
    p.add_argument("--out", type=Path, default=OUT, help=f"JSON output; the .md goes next to it (default {OUT})")
    p.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging of upop_fx")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    cfg = Config(**(CPU_SMOKE if args.cpu_smoke else QUICK if args.quick else {}))
    for field, value in (("search_steps", args.search_steps), ("retrain_steps", args.retrain_steps),
                         ("interval", args.interval)):
        if value is not None:
            setattr(cfg, field, value)
    return cfg


# ---------------------------------------------------------------------------------------------- machine

def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def nvidia_smi() -> list[dict[str, str]] | str | None:
    """One dict per GPU from ``nvidia-smi --query-gpu`` (None when there is no nvidia-smi)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    fields = ["name", "driver_version", "memory.total", "memory.used", "utilization.gpu", "temperature.gpu",
              "power.draw", "clocks.sm", "clocks.max.sm", "mig.mode.current"]
    try:
        run = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {e}"
    if run.returncode != 0:
        return f"nvidia-smi exited {run.returncode}: {run.stderr.strip()[-300:]}"
    return [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in run.stdout.strip().splitlines()]


def machine_info(smi: bool = False) -> dict[str, Any]:
    """:func:`benchmarks.common.machine` plus the library versions, the CUDA device and the load average."""
    from importlib import metadata

    info = machine()
    for name in ("triton", "transformers", "onnxruntime"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a broken install is worth reporting, not raising
            info[name] = f"not importable: {type(e).__name__}: {e}"
    info["packages"] = {}  # what upop_fx and the checks use, installed or not (nothing imported)
    for name in ("numpy", "networkx", "tqdm", "onnx", "onnxscript", "pytest", "matplotlib"):
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["packages"][name] = None
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    info["env"] = {k: os.environ[k] for k in ("TRITON_INTERPRET", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
                   if k in os.environ}
    info["load_average"] = load_average()
    if smi:
        info["nvidia_smi"] = nvidia_smi()
    return info


# ---------------------------------------------------------------------------------------------- model, data

def build(cfg: Config, device: torch.device) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                      num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                      max_position_embeddings=512, attn_implementation="sdpa")
    return BertModel(bert).eval().to(device)


def make_batches(cfg: Config, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Random token ids; in every batch the second half of the rows ends in padding (lengths ≥ seq/2)."""
    g = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(cfg.n_batches):
        ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
        mask = torch.ones(cfg.batch, cfg.seq, dtype=torch.long)
        for row in range(cfg.batch // 2, cfg.batch):
            length = int(torch.randint(cfg.seq // 2, cfg.seq + 1, (1,), generator=g))
            mask[row, length:] = 0
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return batches


# ---------------------------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def recording_fusion() -> Iterator[list[Any]]:
    """The reports of every ``FuseMaskedAttention`` the UPop search applies (how many sites it fused, and why
    not the others); an empty list if upop_fx no longer has that hook."""
    import upop_fx.search.upop as upop_mod

    reports: list[Any] = []
    original = getattr(upop_mod, "FuseMaskedAttention", None)
    if original is None:
        yield reports
        return

    class Recording(original):  # type: ignore[misc, valid-type]
        def __call__(self, gm: torch.fx.GraphModule) -> Any:
            result = super().__call__(gm)
            reports.append(result.value)
            return result

    Recording.__name__ = Recording.__qualname__ = original.__name__  # as the pass names itself in errors
    upop_mod.FuseMaskedAttention = Recording
    try:
        yield reports
    finally:
        upop_mod.FuseMaskedAttention = original


def keep_pairs(keep: dict[int, list[int]]) -> set[tuple[int, int]]:
    return {(int(gid), int(c)) for gid, channels in keep.items() for c in channels}


def jaccard(a: set[tuple[int, int]], b: set[tuple[int, int]]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _first_last(values: list[float]) -> tuple[float | None, float | None]:
    return (values[0], values[-1]) if values else (None, None)


def run_row(name: str, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], cfg: Config,
            device: torch.device) -> tuple[dict[str, Any], Any]:
    """One pipeline run; returns the row and the Result (None if it raised)."""
    import upop_fx
    from upop_fx.search.upop import UPopSearch

    fuse, precision = ROWS[name]
    row: dict[str, Any] = {"row": name, "fuse": fuse, "precision": precision, "load_before": load_average()}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    log.info("row %s: fuse=%s precision=%s S=%d R=%d", name, fuse, precision, cfg.search_steps, cfg.retrain_steps)
    sync(device)
    t0 = time.perf_counter()
    result = None
    try:
        with recording_fusion() as reports:
            search = UPopSearch(fuse=fuse)
            result = upop_fx.pipeline.run(
                model, batches[0], search, ratio=cfg.ratio, data=batches, search_steps=cfg.search_steps,
                retrain_steps=cfg.retrain_steps, lr=cfg.lr, interval=cfg.interval, precision=precision, seed=0,
            )  # fmt: skip
        sync(device)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one failing row is a result; the other rows still run
        sync(device)
        row["status"] = "failed"
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        row["traceback"] = traceback.format_exc()[-4000:]
        log.error("row %s failed: %s", name, row["error"].splitlines()[0] if row["error"] else type(e).__name__)
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    row["peak_mem_gib"] = (round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                           if device.type == "cuda" else None)
    row["load_after"] = load_average()
    if reports:
        rep = reports[-1]
        row["fused_sites"] = len(rep.fused)
        row["unfused_sites"] = len(rep.skipped)
        if rep.skipped:
            row["unfused_reasons"] = sorted(set(rep.skipped.values()))
        if rep.reason:
            row["fusion_note"] = rep.reason
    elif fuse:
        row["fusion_note"] = "FuseMaskedAttention was not called (or upop_fx moved it): fused sites unknown"
    if result is not None:
        pairs = keep_pairs(result.keep)
        search_losses = list(result.losses.get("search", []))
        retrain_losses = list(result.losses.get("retrain", []))
        rep = result.report
        row.update({
            "search_loss_first": _first_last(search_losses)[0], "search_loss_last": _first_last(search_losses)[1],
            "retrain_loss_first": _first_last(retrain_losses)[0],
            "retrain_loss_last": _first_last(retrain_losses)[1],
            "finite_losses": all(map(_finite, search_losses + retrain_losses)),
            "kept_channels": len(pairs),
            "keep_sha256": hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()[:16],
            "params_before": rep.params_before, "params_after": rep.params_after,
            "flops_before": rep.flops_before, "flops_after": rep.flops_after,
            "flops_reduction": rep.flops_before / rep.flops_after if rep.flops_after else None,
            "losses": {"search": search_losses, "retrain": retrain_losses},
        })  # fmt: skip
        log.info("row %s: %.1f s, peak %s GiB, fused sites %s, loss search %s -> %s, retrain -> %s, kept %d",
                 name, row["wall_s"], row["peak_mem_gib"], row.get("fused_sites"), _fmt(row["search_loss_first"]),
                 _fmt(row["search_loss_last"]), _fmt(row["retrain_loss_last"]), len(pairs))
    return row, result


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def time_latency(model: torch.nn.Module, result: Any, example: dict[str, torch.Tensor], cfg: Config,
                 device: torch.device) -> list[dict[str, Any]]:
    """Original module, dense captured graph and compressed graph, interleaved, in fp32 and bf16 autocast."""
    from upop_fx.runtime.timing import time_interleaved

    def call(m: torch.nn.Module, autocast: torch.dtype | None) -> Callable[[], None]:
        def f() -> None:
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                m(**example)
            sync(device)

        return f

    runtime = f"torch-{device.type}"
    rows = []
    small, dense = result.model.eval(), result.dense.eval()
    for precision, autocast in (("fp32", None), ("bf16", torch.bfloat16)):
        load_before = load_average()
        with torch.inference_mode():
            ms_module, ms_dense, ms_small = time_interleaved(
                call(model, autocast), call(dense, autocast), call(small, autocast),
                runs=cfg.latency_runs, warmup=cfg.latency_warmup, alternate=True)
        rows.append({
            "runtime": runtime, "precision": precision, "batch": cfg.batch, "seq": cfg.seq,
            "ms_module": ms_module, "ms_dense_gm": ms_dense, "ms_pruned": ms_small,
            "speedup": ms_dense / ms_small, "speedup_vs_module": ms_module / ms_small,
            "flops_reduction": result.report.flops_before / result.report.flops_after,
            "runs": cfg.latency_runs, "load_before": load_before, "load_after": load_average(),
        })  # fmt: skip
        log.info("latency %s %s: module %.2f ms, dense graph %.2f ms, pruned %.2f ms (speedup %.2f×)", runtime,
                 precision, ms_module, ms_dense, ms_small, ms_dense / ms_small)
    return rows


def compare(keeps: dict[str, set[tuple[int, int]]]) -> list[dict[str, Any]]:
    out = []
    for a, b, what in COMPARISONS:
        if a in keeps and b in keeps:
            inter, union = keeps[a] & keeps[b], keeps[a] | keeps[b]
            out.append({"a": a, "b": b, "what": what, "jaccard": jaccard(keeps[a], keeps[b]),
                        "identical": keeps[a] == keeps[b], "only_a": len(keeps[a] - keeps[b]),
                        "only_b": len(keeps[b] - keeps[a]), "common": len(inter), "union": len(union)})
    return out


# ---------------------------------------------------------------------------------------------- output

ROW_COLUMNS = ["row", "status", "wall_s", "peak_mem_gib", "fused_sites", "search_loss_first", "search_loss_last",
               "retrain_loss_last", "kept_channels", "params_before", "params_after", "flops_reduction"]
CMP_COLUMNS = ["what", "a", "b", "jaccard", "identical", "only_a", "only_b", "union"]
LAT_COLUMNS = ["runtime", "precision", "batch", "seq", "ms_module", "ms_dense_gm", "ms_pruned", "speedup",
               "speedup_vs_module", "flops_reduction"]


def _cells(rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """Rows for :func:`markdown_table`: booleans as yes/no, small floats in 4 significant digits."""

    def cell(v: Any) -> Any:
        if isinstance(v, bool):
            return "yes" if v else "**no**"
        if v is None:
            return "–"
        if isinstance(v, float) and abs(v) < 1000:
            return f"{v:.4g}"
        return v

    return [{c: cell(r.get(c)) for c in columns} for r in rows]


def markdown(payload: dict[str, Any]) -> str:
    m, cfg = payload["machine"], payload["config"]
    where = m.get("gpu") or f"CPU ({m.get('cpu')})"
    lines = [f"# UPop search on {where}", "", f"**Question.** {QUESTION}", "",
             f"torch {m.get('torch')}, triton {m.get('triton')}, transformers {m.get('transformers')}; "
             f"BERT hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, intermediate "
             f"{cfg['intermediate']}, vocab {cfg['vocab']}; batch {cfg['batch']} × {cfg['seq']}; S={cfg['search_steps']}, "
             f"R={cfg['retrain_steps']}, interval {cfg['interval']}, ratio {cfg['ratio']}, lr {cfg['lr']}; "
             f"load average at start {m.get('load_average')}, at end {m.get('load_average_end')}.", ""]
    lines += [f"> {note}" for note in payload.get("notes", [])]
    lines += ["", "## Runs", "", markdown_table(_cells(payload["rows"], ROW_COLUMNS), ROW_COLUMNS), ""]
    for r in payload["rows"]:
        if r.get("status") != "ok":
            lines.append(f"* **{r['row']} failed**: `{r.get('error', '').splitlines()[0] if r.get('error') else ''}`")
        for key in ("fusion_note", "unfused_reasons"):
            if r.get(key):
                lines.append(f"* {r['row']} {key.replace('_', ' ')}: {r[key]}")
    if payload.get("skipped_rows"):
        lines.append(f"* not run (time budget): {', '.join(payload['skipped_rows'])}")
    lines += ["", "## Keep-sets (Jaccard over (group, channel) pairs)", "",
              markdown_table(_cells(payload["comparisons"], CMP_COLUMNS), CMP_COLUMNS) if payload["comparisons"] else "none to compare",
              "", "## Latency (median ms of interleaved runs; on CUDA each call synchronised)", "",
              markdown_table(_cells(payload["latency"], LAT_COLUMNS), LAT_COLUMNS) if payload["latency"] else "not measured", ""]
    return "\n".join(lines)


def write(payload: dict[str, Any], out: Path) -> Path:
    return write_results(out.stem, payload, [], out.parent, markdown=markdown(payload))


def skipped(out: Path, info: dict[str, Any]) -> int:
    reason = "no CUDA device"
    log.warning("benchmarks/gpu_search.py needs a CUDA GPU and found none (torch.cuda.is_available() is False): "
                "nothing was measured. --cpu-smoke runs the code path on the CPU with a tiny model.")
    payload = {"skipped": reason, "question": QUESTION, "machine": info}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# UPop search on CUDA\n\n**Question.** {QUESTION}\n\nSkipped: {reason} "
                                      f"(torch {info.get('torch')}).\n")
    log.info("wrote %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    logging.getLogger("upop_fx").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    info = machine_info()
    if not args.cpu_smoke and not torch.cuda.is_available():
        return skipped(args.out, info)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    cfg = make_config(args)
    start = time.perf_counter()
    model = build(cfg, device)
    batches = make_batches(cfg, device)
    notes = []
    if device.type != "cuda":
        notes.append("CPU smoke run: the fusion is a no-op off CUDA (FuseMaskedAttention only fuses on CUDA), so the "
                     "fused rows run the same masked graph as the unfused rows; their keep-sets are identical by "
                     "construction and say nothing about the Triton kernel.")
    notes.append("Objective: distillation from the dense model itself, so the loss is 0 until the first masks drop "
                 "below 1; the first selection ranks on (near-)zero gradients.")
    payload: dict[str, Any] = {
        "question": QUESTION, "machine": info, "config": asdict(cfg) | {"device": str(device)},
        "rows": [], "comparisons": [], "latency": [], "notes": notes, "skipped_rows": [], "complete": False,
    }  # fmt: skip
    log.info("machine: %s", {k: info.get(k) for k in ("gpu", "torch", "triton", "transformers", "load_average")})
    wanted = args.rows or list(ROWS)
    keeps: dict[str, set[tuple[int, int]]] = {}
    slowest = 0.0
    failed = False
    for name in wanted:
        elapsed = time.perf_counter() - start
        if args.rows is None and name not in REQUIRED and elapsed + slowest > args.budget_s:
            log.info("row %s not run: %.0f s so far + %.0f s for a row > budget %.0f s", name, elapsed, slowest,
                     args.budget_s)
            payload["skipped_rows"].append(name)
            continue
        row, result = run_row(name, model, batches, cfg, device)
        slowest = max(slowest, row["wall_s"])
        payload["rows"].append(row)
        failed |= row["status"] != "ok"
        if result is not None:
            keeps[name] = keep_pairs(result.keep)
            if not payload["latency"] and row["precision"] == "fp32":
                try:
                    payload["latency"] = time_latency(model, result, batches[0], cfg, device)
                except Exception as e:  # noqa: BLE001
                    failed = True
                    payload["latency_error"] = f"{type(e).__name__}: {e}"[:2000]
                    log.error("latency failed: %s", payload["latency_error"])
        del result
        payload["comparisons"] = compare(keeps)
        write(payload, args.out)
    by_pair = {(c["a"], c["b"]): c for c in payload["comparisons"]}
    for key, pair in (("fused_vs_unfused_fp32", ("fused-fp32", "unfused-fp32")),
                      ("bf16_vs_fp32", ("fused-bf16", "fused-fp32"))):
        c = by_pair.get(pair)
        payload[f"jaccard_{key}"] = c["jaccard"] if c else None
        payload[f"identical_{key}"] = c["identical"] if c else None
    payload["machine"]["load_average_end"] = load_average()
    payload["total_s"] = round(time.perf_counter() - start, 1)
    payload["complete"] = True
    path = write(payload, args.out)
    for c in payload["comparisons"]:
        log.info("keep-sets %s: Jaccard %.4f%s", c["what"], c["jaccard"], " (identical)" if c["identical"] else "")
    log.info("wrote %s and %s (%.0f s)", path, path.with_suffix(".md"), payload["total_s"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
