"""A small ViT trained from scratch on scikit-learn's digits, then compressed 2× by four methods.

The model: ``transformers.ViTForImageClassification`` (8×8×1 images, 2×2 patches → 16 patches + cls, hidden 96,
4 layers, 4 heads × 24, MLP 384), random init (seed 0; ``initializer_range=0.1``: with HF's 0.02 the model
sits on a loss plateau for hundreds of steps), trained for 1,000 steps of 64 with AdamW (lr 3e-3, warm-up +
cosine), cross entropy and ±1 px shift augmentation on a fixed stratified 80/20 split of ``load_digits``
(1,437 train / 360 test images, seed 0).

Then ``ratio`` (default 0.5: half of the prunable parameters — head dims and MLP neurons; embeddings, the
residual stream, LayerNorms and the classifier are not prunable) is removed by

* ``unified``: UPop's unified progressive search (``upop_fx.UPop``, the loop of ``upop_fx.compress``), the
  task loss (cross entropy) on augmented training batches;
* ``uniform``: the same search and scores, but every layer prunes the same fraction of its head dims and of
  its MLP neurons;
* ``magnitude``: ``upop_fx.compress(method="magnitude")`` — one-shot global ranking by mean |weight|;
* ``uniform_magnitude``: mean |weight|, the same fraction in every layer;

each followed by the same short retrain (cross entropy, the same batches, the same steps and learning rate;
300 search steps and 100 retrain steps at lr 3e-4 by default). The searched methods also train the weights
during the search, so the one-shot methods get a second row retrained for search + retrain steps (the same
training budget). ``--sweep`` adds unified/uniform pairs under other search settings (steps, lr, interval).
Reported: top-1 on the 360 test images (dense; right after the cut; after the retrain), parameters, FLOPs per
image, the kept fraction of every layer's prunable parameters, wall minutes.

    python -m benchmarks.vit_digits                    # the full run, sweep included (about an hour, 1 thread)
    python -m benchmarks.vit_digits --sweep            # the main table only
    python -m benchmarks.vit_digits --quick            # a smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from upop_fx import SCORES

from .common import machine, write_results
from .digits_data import (
    METHODS,
    compress_run,
    jobs,
    load_digits_split,
    shift,
    towers_summary,
    train_loop,
    unified_vs_uniform,
    write_markdown,
)

log = logging.getLogger("benchmarks.vit_digits")

COLUMNS = ["method", "retrain", "top1_cut", "top1", "params", "flops_per_image", "kept", "kept_per_layer", "minutes"]

SWEEP_COLUMNS = ["method", "search", "lr", "interval", "retrain", "top1_cut", "top1", "kept", "kept_per_layer", "minutes"]
SWEEP = ["600:3e-4:10:100", "300:1e-3:10:100", "300:1e-4:10:100", "300:3e-4:5:100"]


def build_model(hidden: int = 96, layers: int = 4, heads: int = 4, mlp: int = 384, init_range: float = 0.02) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=mlp, num_labels=10, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, initializer_range=init_range,
                    attn_implementation="sdpa")
    return ViTForImageClassification(cfg)


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out["logits"]


def ce_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits_of(out), target)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    digits = load_digits_split(seed=0)
    model = build_model(init_range=args.init_range)
    gen = torch.Generator().manual_seed(0)
    n_train = len(digits.y_train)

    def make_batch(_: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = torch.randint(0, n_train, (args.batch_size,), generator=gen)
        return {"pixel_values": digits.norm(shift(digits.x_train[idx], gen))}, digits.y_train[idx]

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        pred = logits_of(m(pixel_values=digits.norm(digits.x_test))).argmax(-1)
        return {"top1": float((pred == digits.y_test).float().mean())}

    if args.dense_cache and Path(args.dense_cache).exists():  # a dense model trained by an earlier run
        cached = torch.load(args.dense_cache)
        model.load_state_dict(cached["state"])
        model.eval()
        train_minutes = cached["minutes"]
        log.info("loaded the dense model from %s", args.dense_cache)
    else:
        log.info("training the dense ViT: %d steps of %d", args.train_steps, args.batch_size)
        t = time.perf_counter()
        train_loop(model, make_batch, ce_loss, args.train_steps, args.train_lr, log_every=max(1, args.train_steps // 5),
                   log=log.info)
        train_minutes = (time.perf_counter() - t) / 60
        if args.dense_cache:
            torch.save({"state": model.state_dict(), "minutes": train_minutes}, args.dense_cache)
    dense = evaluate(model)
    log.info("dense top-1 %.4f (%.1f min)", dense["top1"], train_minutes)

    # the compression data: fixed augmented batches, the same for every method (search and retrain)
    gen.manual_seed(1)
    data = [make_batch(i) for i in range(max(max(j.search_steps, j.retrain_steps) for j in jobs(args)))]
    example = data[0][0]
    params_dense = sum(p.numel() for p in model.parameters())
    rows: list[dict[str, Any]] = [{
        "method": "dense", "top1_cut": dense["top1"], "top1": dense["top1"], "params": params_dense,
        "minutes": round(train_minutes, 2), "kept": 1.0, "kept_per_layer": "",
    }]  # fmt: skip
    details = {}
    sweep: list[dict[str, Any]] = []
    for job in jobs(args):
        label, method, retrain_steps = job.label, job.method, job.retrain_steps
        log.info("%s: ratio %.2f, search %d, retrain %d", label, args.ratio, job.search_steps, retrain_steps)
        out = compress_run(method, model, example, data, ce_loss, evaluate, ratio=args.ratio,
                           search_steps=job.search_steps, retrain_steps=retrain_steps, lr=job.lr,
                           retrain_lr=args.retrain_lr, interval=job.interval, seed=0, score=args.score)
        rep = out.result.report
        towers = towers_summary(rep)
        tower = next(iter(towers.values()))
        batch = next(iter(example.values())).shape[0]
        if rows[0].get("flops_per_image") is None:
            rows[0]["flops_per_image"] = rep.flops_before // batch
        row = {
            "method": label, "retrain": retrain_steps, "top1_cut": out.metrics_cut["top1"], "top1": out.metrics["top1"],
            "params": rep.params_after, "flops_per_image": rep.flops_after // batch,
            "kept": round(tower["kept_fraction"], 3),
            "kept_per_layer": " ".join(f"{v:.2f}" for v in tower["layers"].values()),
            "minutes": round(out.minutes, 2),
        }  # fmt: skip
        if job.table == "sweep":
            row.update(search=job.search_steps, lr=f"{job.lr:g}", interval=job.interval, method=method)
        (rows if job.table == "main" else sweep).append(row)
        details[label] = {
            "towers": towers, "prunable_cost_removed": rep.prunable_cost_removed,
            "groups": [{"where": g.where, "kind": g.kind, "kept": g.kept, "total": g.total, "shape": g.shape}
                       for g in rep.groups],
            "search_loss_first_last": [out.search_losses[0], out.search_losses[-1]] if out.search_losses else None,
            "retrain_loss_first_last": [out.retrain_losses[0], out.retrain_losses[-1]] if out.retrain_losses else None,
        }  # fmt: skip
        log.info("%s: top-1 cut %.4f, retrained %.4f, params %d, kept per layer %s (%.1f min)", label,
                 out.metrics_cut["top1"], out.metrics["top1"], rep.params_after, row["kept_per_layer"], out.minutes)
    return {
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "dense_cache")},
        "model": "ViTForImageClassification 8x8x1, patch 2, hidden 96, 4 layers, 4 heads x 24, MLP 384",
        "data": f"sklearn load_digits, stratified 80/20 split seed 0: {n_train} train / {len(digits.y_test)} test",
        "metric": "top-1 on the test split; top1_cut = right after the cut, top1 = after the retrain",
        "rows": rows,
        "sweep": sweep,
        "details": details,
        "total_minutes": round((time.perf_counter() - t_start) / 60, 2),
    }


def notes(payload: dict[str, Any]) -> list[str]:
    """One line per question the table answers, with the numbers."""
    by = {r["method"]: r for r in payload["rows"]}
    dense = by["dense"]["top1"]
    out = [
        "Top-1 (%) right after the cut / after the retrain, dense " + f"{100 * dense:.1f}: "
        + "; ".join(f"{m} {100 * r['top1_cut']:.1f} / {100 * r['top1']:.1f}" for m, r in by.items() if m != "dense")
    ]
    pairs = unified_vs_uniform(payload, "top1_cut", "top1")
    if pairs:
        for when, uk, fk in (("right after the cut", "unified_cut", "uniform_cut"), ("after the retrain", "unified", "uniform")):
            ahead = sum(p[uk] > p[fk] for p in pairs)
            diffs = ", ".join(f"{100 * (p[uk] - p[fk]):+.1f}" for p in pairs)
            out.append(f"unified - uniform over all {len(pairs)} settings (main first, then the sweep), {when}: {diffs} "
                       f"points (unified ahead in {ahead}; one test image = 0.28 points).")
        kept = [r["kept_per_layer"] for r in [by["unified"], *payload.get("sweep", [])] if r["method"] == "unified"]
        out.append("unified kept per layer (first to last): " + "; ".join(kept) + " — it keeps early layers and "
                   "prunes late ones; uniform keeps 0.50 everywhere.")
    return out


def finish(payload: dict[str, Any], name: str | None) -> None:
    """Add the notes, log them, and write ``<name>.json`` + ``<name>.md``."""
    payload["notes"] = notes(payload)
    for line in payload["notes"]:
        log.info("%s", line)
    if name:
        path = write_results(name, payload, COLUMNS)
        write_markdown(path.with_suffix(".md"), payload, SWEEP_COLUMNS)
        log.info("wrote %s", path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test: few steps, nothing written unless --out")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of the prunable parameters to remove")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--train-lr", type=float, default=3e-3)
    p.add_argument("--init-range", type=float, default=0.1,
                   help="initializer_range of the ViT (HF default 0.02 trains far slower from scratch)")
    p.add_argument("--search-steps", type=int, default=300)
    p.add_argument("--retrain-steps", type=int, default=100)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW lr of the search (and of the retrain by default)")
    p.add_argument("--score", default="gradient", choices=SCORES,
                   help="UPop's ranking score for unified and uniform (default gradient, the paper's)")
    p.add_argument("--retrain-lr", type=float, default=None)
    p.add_argument("--no-equal-budget", dest="equal_budget", action="store_false",
                   help="skip the one-shot rows retrained for search + retrain steps")
    p.add_argument("--sweep", nargs="*", default=list(SWEEP), metavar="SEARCH:LR:INTERVAL:RETRAIN",
                   help="extra unified + uniform runs with these settings (default: %(default)s; none: --sweep)")
    p.add_argument("--dense-cache", default=None, help="a .pt file: load the trained dense model from it, or save it there")
    p.add_argument("--render", default=None, metavar="JSON", help="only re-write notes + markdown from a results file")
    p.add_argument("--out", default=None, help="results name under benchmarks/results (default vit_digits)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.search_steps, args.retrain_steps, args.interval = 60, 10, 5, 5
        args.sweep = args.sweep if args.sweep != SWEEP else ["12:1e-3:3:5"]
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("upop_fx").setLevel(logging.WARNING)
    args = parse_args(argv)
    name = args.out or (None if args.quick else "vit_digits")
    if args.render:  # re-write the notes and the markdown of an earlier run
        finish(json.loads(Path(args.render).read_text()), name)
        return
    finish(run(args), name)


if __name__ == "__main__":
    main()
