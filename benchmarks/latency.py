"""Does a model pruned by upop_fx run faster where it is deployed? Dense against pruned, measured.

For each model — all-MiniLM-L6-v2 (real pretrained weights, real BBC News text), a BERT-base-sized config and a
ViT-B/16-sized config (random weights) — the script prunes at each ratio with

* ``upop_fx``        — ``upop_fx.compress(model, x, ratio, method="magnitude")`` (UPop granularity: every head
  keeps its count and gets a smaller head dim; MLP widths shrink);
* ``torch-pruning``  — Torch-Pruning's ``MetaPruner`` with ``GroupMagnitudeImportance`` on the Hugging Face model:
  whole attention heads (``head_pruning_ratio=ratio``) and MLP hidden dims (``pruning_ratio=ratio``), uniform per
  layer, the residual stream (embeddings, attention output and MLP output projections, pooler) left alone — the
  same structures upop_fx prunes, so both remove about the same fraction of the encoder's parameters (the rows
  carry the parameter counts);
* ``upop_fx-r8``     — (MiniLM, ratio 0.5, ONNX Runtime CPU) ``round_to=8``: head dims and MLP widths kept at
  multiples of 8;
* ``upop_fx-heads``  — (with ``--heads``) ``granularity="heads"``: whole heads, like Torch-Pruning,

exports every model with :func:`upop_fx.runtime.export.export_onnx` (parity-checked) and times it in

* ``ort-cpu``       — ONNX Runtime, CPUExecutionProvider, ``ORT_ENABLE_ALL``;
* ``ort-cuda``      — ONNX Runtime, CUDAExecutionProvider (only with a GPU and ``onnxruntime-gpu``);
* ``torch-gm``      — PyTorch eager: the captured dense GraphModule against the pruned GraphModule;
* ``torch-module``  — PyTorch eager: the original ``nn.Module`` against what the user gets (upop_fx's
  GraphModule, Torch-Pruning's pruned module).

Dense and pruned models run interleaved (dense, pruned, …, with the order reversed every other round), after
warm-up runs; each time is the median of ``--runs`` runs. A row reports both latencies, the speedup, the FLOPs
reduction (``upop_fx.report.count_flops`` — what ``Result.report`` counts — at that sequence length) and
speedup ÷ FLOPs reduction. On a shared machine single latencies are noisy; the ratios of interleaved runs much
less so.

The acceptance check (printed and written to the markdown): ONNX Runtime CPU, batch 8, sequence 128, ratio 0.5,
for MiniLM and BERT-base: upop_fx's speedup ≥ 0.85 × its FLOPs reduction, and ≥ Torch-Pruning's speedup.
``--profile`` adds ONNX Runtime's per-operator times (dense against pruned) for that setting.

Writes ``<out>/latency.json`` (``{"machine": {...}, "rows": [...]}``; ``--append`` merges with the rows already
there, so the grid can be run in pieces), ``<out>/latency.md`` and ``<out>/latency.png``.

    python benchmarks/latency.py --quick                     # MiniLM, ORT CPU, batch 8, seq 128, ratio 0.5
    python benchmarks/latency.py --models minilm bert-base --batches 8 --seqs 128 --ratios 0.5 --runtimes ort-cpu
    python benchmarks/latency.py                             # the whole grid (hours on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import upop_fx  # noqa: E402
from benchmarks.common import MAX_LOAD, cpu_name, quiet_timing  # noqa: E402
from upop_fx.capture.program import capture  # noqa: E402
from upop_fx.report import count_flops, count_params  # noqa: E402
from upop_fx.runtime.export import export_onnx  # noqa: E402
from upop_fx.runtime.sessions import ort_session  # noqa: E402
from upop_fx.runtime.speed import time_interleaved  # noqa: E402

log = logging.getLogger("latency")

MODELS = ("minilm", "bert-base", "vit-b16")
RUNTIMES = ("ort-cpu", "ort-cuda", "torch-gm", "torch-module")
METHODS = ("upop_fx", "torch-pruning")
RESULTS = Path(__file__).resolve().parent / "results"
CRITERION = dict(runtime="ort-cpu", batch=8, seq=128, ratio=0.5, models=("minilm", "bert-base"), factor=0.85)
IMAGE = 224


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: MiniLM, ort-cpu, batch 8, seq 128, ratio 0.5, 5 runs")
    p.add_argument("--models", nargs="+", choices=MODELS, default=None, help=f"default: {' '.join(MODELS)}")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 8 32")
    p.add_argument("--seqs", nargs="+", type=int, default=None, help="text sequence lengths (default: 128 512)")
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="default: 0.3 0.5 0.7")
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=None,
                   help="default: every runtime available here")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--heads", action="store_true",
                   help="also upop_fx with granularity='heads' (whole heads, like Torch-Pruning) as 'upop_fx-heads'")
    p.add_argument("--no-round-to", action="store_true",
                   help="skip the MiniLM round_to=8 vs round_to=1 comparison (ratio 0.5, ort-cpu)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model (median; default 20)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up runs per model (default 3)")
    p.add_argument("--max-load", type=float, default=MAX_LOAD,
                   help=f"a group timed under a higher load average is timed again (default {MAX_LOAD})")
    p.add_argument("--tries", type=int, default=3, help="times to time a loaded group before keeping it (default 3)")
    p.add_argument("--opset", type=int, default=23,
                   help="ONNX opset of the exports (default 23: SDPA becomes ONNX's fused Attention op; 18 spells "
                        "it out as MatMul/Softmax/Where)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (default: all cores)")
    p.add_argument("--profile", action="store_true",
                   help="ONNX Runtime per-operator profile of the acceptance setting (dense vs pruned)")
    p.add_argument("--append", action="store_true", help="merge with the rows already in <out>/latency.json")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite latency.md and latency.png from <out>/latency.json")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS})")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["minilm"]
        args.batches = args.batches or [8]
        args.seqs = args.seqs or [128]
        args.ratios = args.ratios or [0.5]
        args.runtimes = args.runtimes or ["ort-cpu"]
        args.runs = min(args.runs, 5)
        args.warmup = min(args.warmup, 1)
    args.models = args.models or list(MODELS)
    args.batches = args.batches or [1, 8, 32]
    args.seqs = args.seqs or [128, 512]
    args.ratios = args.ratios or [0.3, 0.5, 0.7]
    args.runtimes = [r for r in (args.runtimes or RUNTIMES) if r != "ort-cuda" or _has_ort_cuda()]
    return args


def _has_ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def machine_info(threads: int, opset: int) -> dict[str, Any]:
    import onnxruntime as ort
    import transformers

    cpu = cpu_name(platform.processor() or "unknown")
    try:
        import torch_pruning

        tp_version = torch_pruning.__version__
    except ImportError:
        tp_version = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "threads": threads, "onnx_opset": opset, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(), "transformers": transformers.__version__,
        "torch_pruning": tp_version, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- models

@dataclass
class Spec:
    """A benchmark model: the dense module, how to make its inputs, and how Torch-Pruning sees its attention."""

    name: str
    model: torch.nn.Module
    make_inputs: Callable[[int, int], dict[str, torch.Tensor]]  # (batch, seq) -> kwargs
    text: bool
    attention: type  # the HF attention module holding q/k/v
    qkv: tuple[str, str, str]
    residual_writers: Callable[[torch.nn.Module], list[torch.nn.Module]]  # per layer: Linears writing the residual


def _text_inputs(tokenizer: Any) -> Callable[[int, int], dict[str, torch.Tensor]]:
    from upop_fx.datasets import bbc_news

    articles = bbc_news()

    def make(batch: int, seq: int) -> dict[str, torch.Tensor]:
        texts = [f"{a.headline}. {a.body}" for a in articles[:batch]]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return make


def build(name: str) -> Spec:
    from transformers.models.bert.modeling_bert import BertSelfAttention

    from upop_fx.datasets import load_minilm

    def bert_writers(layer: torch.nn.Module) -> list[torch.nn.Module]:
        return [layer.attention.output.dense, layer.output.dense]

    if name == "minilm":
        model, tokenizer = load_minilm()
        return Spec(name, model.eval(), _text_inputs(tokenizer), True, BertSelfAttention, ("query", "key", "value"),
                    bert_writers)
    if name == "bert-base":
        from transformers import BertConfig, BertModel

        _, tokenizer = load_minilm()  # the same uncased WordPiece vocabulary (30522) as bert-base-uncased
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=512, attn_implementation="sdpa")
        return Spec(name, BertModel(cfg).eval(), _text_inputs(tokenizer), True, BertSelfAttention,
                    ("query", "key", "value"), bert_writers)
    if name == "vit-b16":
        from transformers import ViTConfig, ViTModel
        from transformers.models.vit.modeling_vit import ViTAttention

        torch.manual_seed(0)
        cfg = ViTConfig(image_size=IMAGE, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, attn_implementation="sdpa")

        def pixels(batch: int, seq: int) -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(batch)
            return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g)}

        return Spec(name, ViTModel(cfg).eval(), pixels, False, ViTAttention, ("q_proj", "k_proj", "v_proj"),
                    lambda layer: [layer.attention.o_proj, layer.mlp.fc2])
    raise ValueError(name)


@dataclass
class Variant:
    """One model to time: the dense one or a pruned one."""

    method: str  # "dense", "upop_fx", "upop_fx-r8", "torch-pruning"
    ratio: float
    module: torch.nn.Module  # what the user holds (HF module, or upop_fx's GraphModule)
    gm: torch.fx.GraphModule | None = None  # the same as a GraphModule (for torch-gm)
    onnx: Path | None = None
    params: int = 0
    flops: dict[int, int] = field(default_factory=dict)  # seq -> FLOPs of one batch-2 call
    sessions: dict[str, Any] = field(default_factory=dict)


def upop_prune(spec: Spec, example: dict[str, torch.Tensor], ratio: float, round_to: int,
               granularity: str = "upop") -> torch.nn.Module:
    kwargs: dict[str, Any] = {"method": "magnitude", "round_to": round_to, "granularity": granularity}
    if "retrain_steps" in inspect.signature(upop_fx.compress).parameters:
        kwargs["retrain_steps"] = 0  # latency only: retraining changes weights, not shapes
    result = upop_fx.compress(spec.model, example, ratio=ratio, **kwargs)
    log.info("upop_fx ratio %.2f round_to %d %s: %s", ratio, round_to, granularity,
             result.report.table().splitlines()[-2].strip())
    return result.model


def tp_prune(spec: Spec, example: dict[str, torch.Tensor], ratio: float) -> torch.nn.Module:
    """Torch-Pruning, group magnitude importance: whole heads and MLP hidden dims, residual stream kept."""
    import torch_pruning as tp

    model = copy.deepcopy(spec.model).eval()
    heads, ignored = {}, [model.embeddings, model.pooler]
    for m in model.modules():
        if isinstance(m, spec.attention):
            for name in spec.qkv:
                heads[getattr(m, name)] = m.num_attention_heads
    encoder = getattr(model, "encoder", None)  # BERT: encoder.layer; ViT (transformers 5): layers
    for layer in encoder.layer if encoder is not None else model.layers:
        ignored += spec.residual_writers(layer)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        global_pruning=False, num_heads=heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, ignored_layers=ignored, output_transform=lambda out: out.last_hidden_state.sum(),
    )  # fmt: skip
    with torch.no_grad():
        pruner.step()
    for m in model.modules():
        if isinstance(m, spec.attention):
            q = getattr(m, spec.qkv[0])
            m.num_attention_heads = pruner.num_heads[q]
            if hasattr(m, "all_head_size"):
                m.all_head_size = q.out_features
    return model.eval()


# ---------------------------------------------------------------------------------------------- timing

def runner(v: Variant, dense: Variant, runtime: str, feed: dict[str, torch.Tensor], threads: int) -> Callable[[], Any]:
    if runtime.startswith("ort"):
        provider = "CUDAExecutionProvider" if runtime == "ort-cuda" else "CPUExecutionProvider"
        if runtime not in v.sessions:
            # timed in turn with the other variants: no session's spinning threads may hold the cores
            v.sessions[runtime] = ort_session(v.onnx, providers=[provider], threads=threads, spinning=False)
        sess = v.sessions[runtime]
        np_feed = {i.name: feed[i.name].numpy() for i in sess.get_inputs()}
        return lambda: sess.run(None, np_feed)
    module = v.gm if runtime == "torch-gm" else v.module

    def call() -> Any:
        with torch.no_grad():
            return module(**feed)

    return call


# ---------------------------------------------------------------------------------------------- profile

def ort_profile(variants: list[Variant], feed: dict[str, torch.Tensor], threads: int, runs: int,
                workdir: Path) -> dict[str, dict[str, float]]:
    """ms per run and per op type from ONNX Runtime's profiler (node kernel times summed over the graph), plus
    the achieved GFLOP/s of the matrix products (``gemm_gflops``, from the node shapes). The sessions run
    interleaved, like the timings."""
    sessions, feeds = [], []
    for v in variants:
        sess = ort_session(v.onnx, threads=threads, profile_prefix=str(workdir / f"prof_{v.method}_{v.ratio}"))
        sessions.append(sess)
        feeds.append({i.name: feed[i.name].numpy() for i in sess.get_inputs()})
    time_interleaved(*[lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)], runs=runs, warmup=2,
                     alternate=True)
    out: dict[str, dict[str, float]] = {}
    for v, sess in zip(variants, sessions):
        events = json.loads(Path(sess.end_profiling()).read_text())
        per_op: dict[str, float] = defaultdict(float)
        gemm_flops = gemm_ms = 0.0
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            op = e.get("args", {}).get("op_name", "?")
            ms = e["dur"] / 1000 / (runs + 2)  # every run is profiled, the 2 warm-up runs too
            per_op[op] += ms
            if op in ("MatMul", "FusedMatMul", "Gemm", "FusedGemm"):
                flops = _gemm_flops(e["args"])
                if flops:
                    gemm_flops += flops / (runs + 2)
                    gemm_ms += ms
        key = f"{v.method}@{v.ratio}" if v.method != "dense" else "dense"
        out[key] = dict(per_op)
        out[key]["gemm_gflops"] = gemm_flops / gemm_ms / 1e6 if gemm_ms else 0.0
    return out


def _gemm_flops(args: dict[str, Any]) -> float:
    """2·M·N·K of a MatMul/Gemm node from the profiler's shapes (A's last axis is K)."""
    try:
        a = next(iter(args["input_type_shape"][0].values()))
        out = next(iter(args["output_type_shape"][0].values()))
        return 2.0 * float(np.prod(out)) * a[-1]
    except (KeyError, IndexError, StopIteration, TypeError):
        return 0.0


# ---------------------------------------------------------------------------------------------- main

def run_model(spec: Spec, args: argparse.Namespace, workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    seqs = args.seqs if spec.text else [0]
    example = spec.make_inputs(2, seqs[0] if spec.text else 0)
    small = spec.make_inputs(2, 16) if spec.text else example  # export example (the ONNX axes are dynamic)
    dense = Variant("dense", 0.0, spec.model)
    variants: list[Variant] = []
    t0 = time.time()
    for ratio in args.ratios:
        if "upop_fx" in args.methods:
            variants.append(Variant("upop_fx", ratio, upop_prune(spec, example, ratio, 1)))
            if spec.name == "minilm" and ratio == 0.5 and not args.no_round_to:
                variants.append(Variant("upop_fx-r8", ratio, upop_prune(spec, example, ratio, 8)))
            if args.heads:
                variants.append(Variant("upop_fx-heads", ratio, upop_prune(spec, example, ratio, 1, "heads")))
        if "torch-pruning" in args.methods:
            variants.append(Variant("torch-pruning", ratio, tp_prune(spec, example, ratio)))
    log.info("%s: pruned %d variants in %.0f s", spec.name, len(variants), time.time() - t0)
    for v in [dense, *variants]:
        v.params = count_params(v.module)
        for s in seqs:
            v.flops[s] = count_flops(v.module, (), spec.make_inputs(2, s) if spec.text else example)
        if any(r.startswith("torch") for r in args.runtimes):
            v.gm = v.module if isinstance(v.module, torch.fx.GraphModule) else capture(v.module, example).gm
        if any(r.startswith("ort") for r in args.runtimes):
            t1 = time.time()
            info = export_onnx(v.module, small, workdir / f"{spec.name}-{v.method}-{v.ratio}.onnx", optimize=False,
                               opset=args.opset)
            v.onnx = info.path
            log.info("%s %s %.2f: exported in %.0f s (max error %.1e)", spec.name, v.method, v.ratio,
                     time.time() - t1, info.max_error)

    rows: list[dict[str, Any]] = []
    for runtime in args.runtimes:
        for batch in args.batches:
            for seq in seqs:
                feed = spec.make_inputs(batch, seq)
                chosen = [v for v in variants if runtime == "ort-cpu" or v.method != "upop_fx-r8"]
                calls = [runner(v, dense, runtime, feed, args.threads) for v in [dense, *chosen]]
                t1 = time.time()
                measured_at = time.strftime("%Y-%m-%dT%H:%M:%S")
                ms, load = quiet_timing(
                    lambda calls=calls: time_interleaved(*calls, runs=args.runs, warmup=args.warmup, alternate=True),
                    args.max_load, args.tries)
                log.info("%s %s batch %d seq %d: %.0f s, dense %.1f ms, load %.2f / %.2f", spec.name, runtime, batch,
                         seq, time.time() - t1, ms[0], load["load_before"], load["load_after"])
                for v, m in zip(chosen, ms[1:]):
                    red = dense.flops[seq] / v.flops[seq]
                    rows.append({
                        "model": spec.name, "runtime": runtime, "batch": batch, "seq": seq if spec.text else 197,
                        "ratio": v.ratio, "method": v.method, "ms_dense": round(ms[0], 3), "ms_pruned": round(m, 3),
                        "speedup": round(ms[0] / m, 4), "flops_reduction": round(red, 4),
                        "speedup_over_flops": round(ms[0] / m / red, 4),
                        "params_dense": dense.params, "params_pruned": v.params, "runs": args.runs,
                        "opset": args.opset if runtime.startswith("ort") else None, "measured_at": measured_at,
                        **load,
                    })  # fmt: skip
                    log.info("  %-14s %.2f  %8.1f ms  speedup %.2f  FLOPs %.2fx", v.method, v.ratio, m,
                             ms[0] / m, red)
    profile: dict[str, Any] = {}
    c = CRITERION
    if args.profile and spec.name in c["models"] and "ort-cpu" in args.runtimes:
        chosen = [v for v in variants if v.ratio == c["ratio"]]
        if chosen:
            feed = spec.make_inputs(c["batch"], c["seq"])
            profile = {"model": spec.name, "batch": c["batch"], "seq": c["seq"],
                       "ms_per_op": ort_profile([dense, *chosen], feed, args.threads, max(5, args.runs // 2), workdir),
                       "shapes": {f"{v.method}@{v.ratio}": _shapes(v.module) for v in chosen}}
    for v in [dense, *variants]:
        v.sessions.clear()
    return rows, profile


def _shapes(module: torch.nn.Module) -> list[str]:
    """The 2-D weight shapes (out, in) of the Linears, in order: shows the kept head/MLP widths."""
    return [f"{name}:{tuple(p.shape)}" for name, p in module.named_parameters() if p.dim() == 2 and "embed" not in name]


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New rows replace old ones with the same key; the speedups they replace are kept in ``earlier_speedups``
    (on a noisy machine the repeats are the error bar)."""
    key = ("model", "runtime", "batch", "seq", "ratio", "method")
    rows = {tuple(r[k] for k in key): r for r in old}
    for r in new:
        k = tuple(r[f] for f in key)
        if k in rows:
            r["earlier_speedups"] = [*rows[k].get("earlier_speedups", []), rows[k]["speedup"]]
        rows[k] = r
    return sorted(rows.values(), key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 99,
                                                 r["runtime"], r["batch"], r["seq"], r["ratio"], r["method"]))


def criterion(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    c = CRITERION
    out = []
    for model in c["models"]:
        sel = {r["method"]: r for r in rows if r["model"] == model and r["runtime"] == c["runtime"]
               and r["batch"] == c["batch"] and r["seq"] == c["seq"] and r["ratio"] == c["ratio"]
               and not r.get("loaded", True)}  # a group timed under load (or never recorded) is no measurement
        up, tpr = sel.get("upop_fx"), sel.get("torch-pruning")
        if up is None:
            continue
        ok_flops = up["speedup"] >= c["factor"] * up["flops_reduction"]
        ok_tp = tpr is None or up["speedup"] >= tpr["speedup"]
        out.append({"model": model, "upop_speedup": up["speedup"], "flops_reduction": up["flops_reduction"],
                    "needed": round(c["factor"] * up["flops_reduction"], 3),
                    "tp_speedup": tpr["speedup"] if tpr else None, "tp_flops_reduction": tpr["flops_reduction"] if tpr else None,
                    "met_flops": ok_flops, "met_tp": ok_tp if tpr else None})
    return out


def write_markdown(path: Path, machine: dict[str, Any], rows: list[dict[str, Any]], profiles: list[dict[str, Any]]) -> None:
    lines = [
        "# Latency: dense vs pruned", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['threads']} threads used), "
        f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, transformers {machine['transformers']}, "
        f"torch-pruning {machine['torch_pruning']}; ONNX opset {machine.get('onnx_opset')}; load average at the start "
        f"{machine.get('load_average')}, at the end {machine.get('load_average_end')}.",
        "",
        f"Each timed group records the 1-minute load average before and after; a group above {MAX_LOAD} was timed "
        "again, and one that never ran quiet is marked *loaded* and left out of the acceptance table. "
        "The machine is shared and small: single latencies are noisy (other jobs ran beside these); dense and pruned "
        "ran interleaved, so the *ratios* (speedup) are the numbers to read. Medians of the runs given in the JSON. "
        "`ms dense` is the dense model timed in the same interleaved group as the row; groups measured at different "
        "times (column *measured*) saw different machine load, so compare speedups, not ms, across groups. "
        "*Earlier speedups*: the same setting measured in earlier invocations.",
        "FLOPs reduction: `upop_fx.report.count_flops` of dense / pruned at that sequence length (what "
        "`Result.report` counts). `upop_fx-r8` = `round_to=8`.", "",
    ]
    crit = criterion(rows)
    if crit:
        c = CRITERION
        lines += [f"## Acceptance: {c['runtime']}, batch {c['batch']}, seq {c['seq']}, ratio {c['ratio']}", "",
                  "| model | upop_fx speedup | FLOPs reduction | 0.85 × FLOPs red. | Torch-Pruning speedup "
                  "| TP FLOPs red. | ≥ 0.85 × FLOPs | ≥ TP |", "|---|---|---|---|---|---|---|---|"]
        for r in crit:
            lines.append(f"| {r['model']} | {r['upop_speedup']:.2f} | {r['flops_reduction']:.2f} | {r['needed']:.2f} | "
                         f"{_f(r['tp_speedup'])} | {_f(r['tp_flops_reduction'])} | {_yes(r['met_flops'])} | "
                         f"{_yes(r['met_tp'])} |")
        lines.append("")
    lines += ["## All rows", "",
              "| model | runtime | batch | seq | ratio | method | ms dense | ms pruned | speedup | FLOPs red. "
              "| speedup ÷ FLOPs red. | params pruned / dense | earlier speedups | measured | load before/after |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        earlier = ", ".join(f"{x:.2f}" for x in r.get("earlier_speedups", []))
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['seq']} | {r['ratio']} | {r['method']} | "
                     f"{r['ms_dense']:.1f} | {r['ms_pruned']:.1f} | {r['speedup']:.2f} | {r['flops_reduction']:.2f} | "
                     f"{r['speedup_over_flops']:.2f} | {r['params_pruned'] / r['params_dense']:.3f} | {earlier} | "
                     f"{r.get('measured_at', '')[11:16]} | {_load(r)} |")
    for prof in profiles:
        if not prof:
            continue
        ms = prof["ms_per_op"]
        cols = list(ms)
        ops = sorted({op for d in ms.values() for op in d if op != "gemm_gflops"},
                     key=lambda op: -ms["dense"].get(op, 0.0))
        lines += ["", f"## ONNX Runtime profile: {prof['model']}, batch {prof['batch']}, seq {prof['seq']} "
                  "(ms per run, summed kernel time per op type)", "",
                  "| op type | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for op in ops:
            vals = [ms[c].get(op, 0.0) for c in cols]
            if max(vals) < 0.05:
                continue
            lines.append(f"| {op} | " + " | ".join(f"{x:.1f}" for x in vals) + " |")
        total = {c: sum(x for op, x in ms[c].items() if op != "gemm_gflops") for c in cols}
        lines.append("| **total** | " + " | ".join(f"**{total[c]:.1f}**" for c in cols) + " |")
        lines.append("| MatMul/Gemm GFLOP/s | " + " | ".join(f"{ms[c].get('gemm_gflops', 0.0):.1f}" for c in cols) + " |")
    path.write_text("\n".join(lines) + "\n")


def _load(r: dict[str, Any]) -> str:
    if "load_before" not in r:
        return "not recorded"
    return f"{r['load_before']:.2f} / {r['load_after']:.2f}" + (" (loaded: not a measurement)" if r["loaded"] else "")


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _yes(x: bool | None) -> str:
    return "–" if x is None else ("yes" if x else "**no**")


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Speedup against FLOPs reduction: one panel per runtime, colour = model, marker = method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = [r for r in RUNTIMES if any(row["runtime"] == r for row in rows)] or ["ort-cpu"]
    fig, axes = plt.subplots(1, len(runtimes), figsize=(5.5 * len(runtimes), 5), squeeze=False)
    markers = {"upop_fx": "o", "upop_fx-r8": "s", "upop_fx-heads": "D", "torch-pruning": "^"}
    colors = {"minilm": "tab:blue", "bert-base": "tab:orange", "vit-b16": "tab:green"}
    hi = max([2.0] + [max(r["flops_reduction"], r["speedup"]) for r in rows]) * 1.05
    xs = np.linspace(1, hi, 10)
    for ax, runtime in zip(axes[0], runtimes):
        seen = set()
        for r in (r for r in rows if r["runtime"] == runtime):
            label = f"{r['model']} / {r['method']}"
            ax.scatter(r["flops_reduction"], r["speedup"], marker=markers.get(r["method"], "x"),
                       color=colors.get(r["model"], "gray"), alpha=0.7, label=None if label in seen else label)
            seen.add(label)
        ax.plot(xs, xs, "k--", lw=1, label="speedup = FLOPs reduction")
        ax.plot(xs, 0.85 * xs, "k:", lw=1, label="0.85 × FLOPs reduction")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set_xlabel("FLOPs reduction (dense / pruned)")
        ax.set_ylabel("measured speedup (dense ms / pruned ms)")
        ax.set_title(runtime)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle("Speedup vs FLOPs reduction (all batches / lengths)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    if "torch-pruning" in args.methods:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            log.error("torch-pruning is not installed: pip install torch-pruning (or drop it with --methods upop_fx)")
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "latency.json"
    if args.report_only:
        saved = json.loads(json_path.read_text())
        write_markdown(args.out / "latency.md", saved["machine"], saved["rows"], saved.get("profiles", []))
        plot(args.out / "latency.png", saved["rows"])
        log.info("rewrote %s and %s", args.out / "latency.md", args.out / "latency.png")
        return 0
    machine = machine_info(args.threads, args.opset)
    log.info("machine: %s", machine)
    rows: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="upop_latency-") as tmp:
        for name in args.models:
            spec = build(name)
            new_rows, prof = run_model(spec, args, Path(tmp))
            rows += new_rows
            if prof:
                profiles.append(prof)
            del spec
            gc.collect()
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    old: dict[str, Any] = {}
    if args.append and json_path.exists():
        old = json.loads(json_path.read_text())
    rows = merge(old.get("rows", []), rows)
    kept_profiles = {p["model"]: p for p in old.get("profiles", [])}
    kept_profiles.update({p["model"]: p for p in profiles})
    result = {"machine": machine, "rows": rows, "profiles": list(kept_profiles.values())}
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(args.out / "latency.md", machine, rows, result["profiles"])
    plot(args.out / "latency.png", rows)
    for r in criterion(rows):
        log.info("criterion %s: upop_fx speedup %.2f (need ≥ %.2f = 0.85 × FLOPs reduction %.2f: %s); "
                 "Torch-Pruning %s (%s)", r["model"], r["upop_speedup"], r["needed"], r["flops_reduction"],
                 "met" if r["met_flops"] else "NOT met", _f(r["tp_speedup"]),
                 {True: "met", False: "NOT met", None: "not measured"}[r["met_tp"]])
    log.info("wrote %s, latency.md, latency.png", json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
