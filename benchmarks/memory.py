"""How much memory does compressing a BERT-base-sized model take, counted in copies of the model?

Each stage runs in a fresh process (peak memory is a per-process high-water mark), on the same randomly
initialised ``BertModel`` (hidden 768, 12 layers, 12 heads, intermediate 3072; 109 M parameters, 418 MiB in
fp32), batch 8 × 128 tokens, distillation from the dense model (the default objective):

* ``model``     — the model and the data, built: the baseline every other stage is measured from;
* ``prepare``   — capture + group analysis (the teacher graph);
* ``magnitude`` — one-shot magnitude ranking and the cut (surgery + its check against the zeroed reference);
* ``search``    — the UPop search (masked student + AdamW) and the cut, no retrain;
* ``search+retrain`` — the whole ``compress``.

For each: peak resident memory above the baseline (``ru_maxrss``), in MiB and in model sizes, and on CUDA the
peak allocated memory (``torch.cuda.max_memory_allocated``). What the method needs beside the caller's model:
a teacher (1 copy; the captured graph), a student (1), its gradients (1) and AdamW's two moments (2) — about
5 model sizes plus activations while training. Writes ``benchmarks/results/memory.json`` and ``.md``.

    python -m benchmarks.memory                  # CPU, 4 search + 2 retrain steps
    python -m benchmarks.memory --device cuda    # on a GPU
    python -m benchmarks.memory --small          # a tiny config (seconds; what the tests run)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, arg_parser, machine, markdown_table, write_results

log = logging.getLogger("benchmarks.memory")

STAGES = ("model", "prepare", "magnitude", "search", "search+retrain")
BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def stage(name: str, small: bool, device: str, search_steps: int, retrain_steps: int) -> dict[str, Any]:
    """Run one stage in this process; returns its measurements."""
    import transformers

    import upop_fx
    from upop_fx.search.magnitude import Magnitude

    torch.manual_seed(0)
    cfg = transformers.BertConfig(**(SMALL if small else BASE), attn_implementation="sdpa")
    model = transformers.BertModel(cfg).eval().to(device)
    batch, seq = (2, 16) if small else (8, 128)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)} for _ in range(4)]
    model_mib = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    base = _rss_mib()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated() / 2**20
    if name == "prepare":
        upop_fx.pipeline.prepare(model, data[0], ratio=0.5)
    elif name == "magnitude":
        upop_fx.pipeline.run(model, data[0], Magnitude(), ratio=0.5, retrain_steps=0)
    elif name in ("search", "search+retrain"):
        upop_fx.compress(model, data[0], 0.5, data=data, search_steps=search_steps, interval=2,
                         retrain_steps=retrain_steps if name == "search+retrain" else 0)
    row = {"stage": name, "model_mib": round(model_mib, 1), "baseline_mib": round(base, 1),
           "peak_above_baseline_mib": round(_rss_mib() - base, 1)}
    row["copies"] = round(row["peak_above_baseline_mib"] / model_mib, 2)
    if device == "cuda":
        torch.cuda.synchronize()
        row["cuda_peak_above_baseline_mib"] = round(torch.cuda.max_memory_allocated() / 2**20 - cuda_base, 1)
        row["cuda_copies"] = round(row["cuda_peak_above_baseline_mib"] / model_mib, 2)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = arg_parser(__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--small", action="store_true", help="a tiny BERT config (seconds), for tests")
    p.add_argument("--search-steps", type=int, default=4)
    p.add_argument("--retrain-steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage, print JSON
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:
        torch.set_num_threads(int(os.environ.get("UPOP_BENCH_THREADS", "2")))
        print(json.dumps(stage(args.stage, args.small, args.device, args.search_steps, args.retrain_steps)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda: no CUDA device on this machine")
        return 2
    rows = []
    for name in STAGES:
        cmd = [sys.executable, "-m", "benchmarks.memory", "--stage", name, "--device", args.device,
               "--search-steps", str(args.search_steps), "--retrain-steps", str(args.retrain_steps)]
        if args.small:
            cmd.append("--small")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode != 0:
            log.error("stage %s failed:\n%s", name, proc.stderr[-3000:])
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log.info("%-16s peak +%8.1f MiB = %.2f model copies", name, rows[-1]["peak_above_baseline_mib"], rows[-1]["copies"])
    columns = ["stage", "model_mib", "peak_above_baseline_mib", "copies"]
    if args.device == "cuda":
        columns += ["cuda_peak_above_baseline_mib", "cuda_copies"]
    setup = {"model": "BertModel " + json.dumps(SMALL if args.small else BASE), "device": args.device,
             "batch": "2x16" if args.small else "8x128", "search_steps": args.search_steps,
             "retrain_steps": args.retrain_steps, "objective": "distillation from the dense model"}
    payload = {"machine": machine(), "setup": setup, "rows": rows}
    md = (f"# Memory of a compression, in model copies\n\nSetup: {json.dumps(setup)}\n\nMachine: "
          f"{json.dumps(payload['machine'])}\n\n{markdown_table(rows, columns)}\n")
    name = "memory_small" if args.small else f"memory_{args.device}"
    path = write_results(name, payload, columns, out=args.out, markdown=md)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
