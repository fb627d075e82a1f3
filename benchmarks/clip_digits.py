"""A small two-tower CLIP trained from scratch on digits with captions, then compressed 2×: does the unified
search across towers beat the same ratio applied uniformly to every layer of every tower?

The model: ``transformers.CLIPModel`` with a vision tower (8×8×1 images, 2×2 patches, hidden 64, 4 layers,
4 heads × 16, MLP 256) and a text tower of the same size (a word-level vocabulary built from the caption
templates below; nothing is downloaded), both projected to 64, trained for 1,500 steps of 64 (AdamW, lr 2e-3,
warm-up + cosine). Data: scikit-learn's ``load_digits``, a fixed
stratified 80/20 split (seed 0; 1,437 train / 360 held-out images), ±1 px shift augmentation; each training
image is paired with a random caption of its digit: one of several templates ("a photo of the digit seven",
"handwritten 7", "the number seven", "an 8", ...) × the word or the numeral.

Loss (training, search and retrain alike): the CLIP contrastive loss on ``logits_per_image``, symmetric, with
class-aware targets — every pair of the batch showing the same digit counts as a positive (a batch of 64
holds each digit several times, so the one-hot CLIP target would punish correct matches). It is passed to
``upop_fx`` as ``loss_fn(outputs, labels)``.

Metrics on the 360 held-out images:

* ``i2t_cls``: image→text Recall@1 among the 10 class captions of one fixed template ("a photo of the digit
  {word}"): the zero-shot accuracy;
* ``i2t_all``: image→text Recall@1 among all 360 held-out captions (one random template/form per held-out
  image, fixed seed); a hit = the nearest caption names the image's digit;
* ``t2i``: text→image Recall@1 with those 360 captions as queries over the 360 held-out images; a hit = the
  nearest image shows the caption's digit.

Methods, at ``ratio`` 0.5 (half of the prunable parameters of both towers: head dims and MLP neurons), each
followed by the same short retrain (100 steps; search 300 steps, lr 3e-4, interval 10 by default):
``unified`` (UPop's search: one ranking over all layers of both towers), ``uniform`` (the same search and
scores, every structure of every tower prunes the same fraction), ``magnitude`` (one global mean-|weight|
ranking), ``uniform_magnitude``; the one-shot methods get a second row retrained for search + retrain steps.
``--sweep`` adds unified/uniform pairs under other search settings. The run ends with the issue's target
checked on the numbers (``verdict``): at 2×, unified keeps i2t R@1 within 3 points of dense and beats uniform.

    python -m benchmarks.clip_digits            # the full run, sweep included (about an hour, 1 thread)
    python -m benchmarks.clip_digits --sweep    # the main table only
    python -m benchmarks.clip_digits --quick    # a smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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

log = logging.getLogger("benchmarks.clip_digits")

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUMERALS = [str(i) for i in range(10)]
TEMPLATES = [
    "a photo of the digit {x}",
    "handwritten {x}",
    "the number {x}",
    "{a} {x}",
    "an image of a handwritten {x}",
    "this is the digit {x}",
    "a picture of the number {x}",
    "digit {x}",
    "a low resolution scan of {a} {x}",
    "{x}",
]
EVAL_TEMPLATE = 0  # "a photo of the digit {word}"
SEQ = 12  # bos + at most 8 words + eos, padded
TOWERS = {"vision_model.encoder.layers": "vision", "text_model.encoder.layers": "text"}
COLUMNS = ["method", "retrain", "i2t_cls_cut", "i2t_cls", "i2t_all", "t2i", "params", "kept_vision", "kept_text",
           "vision_layers", "text_layers", "minutes"]


def caption(digit: int, template: int, numeral: bool) -> str:
    x = NUMERALS[digit] if numeral else WORDS[digit]
    a = "an" if digit == 8 else "a"  # "an eight", "an 8"
    return TEMPLATES[template].format(x=x, a=a)


class Tokenizer:
    """Word level: 0 = pad, 1 = bos, words, last id = eos (CLIP pools the text at the eos token)."""

    def __init__(self) -> None:
        words = sorted({w for d in range(10) for t in range(len(TEMPLATES)) for n in (False, True)
                        for w in caption(d, t, n).split()})
        self.ids = {w: i + 2 for i, w in enumerate(words)}
        self.eos = len(words) + 2
        self.vocab_size = self.eos + 1

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), SEQ, dtype=torch.long)
        mask = torch.zeros(len(texts), SEQ, dtype=torch.long)
        for i, t in enumerate(texts):
            row = [1, *(self.ids[w] for w in t.split()), self.eos]
            assert len(row) <= SEQ, t
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

SWEEP_COLUMNS = ["method", "search", "lr", "interval", "retrain", "i2t_cls_cut", "i2t_cls", "i2t_all", "t2i",
                 "kept_vision", "kept_text", "minutes"]
SWEEP = ["600:3e-4:10:100", "300:1e-3:10:100", "300:1e-4:10:100", "300:3e-4:5:100"]

NOTES = ["Search and retrain loss: the same contrastive loss_fn as training (the task loss, not distillation)."]


def build_model(vocab_size: int, eos: int, hidden: int = 64, layers: int = 4, heads: int = 4, mlp: int = 256,
                proj: int = 64) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=16, projection_dim=proj, pad_token_id=0,
                bos_token_id=1, eos_token_id=eos)
    vision = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, intermediate_size=mlp,
                  num_hidden_layers=layers, num_attention_heads=heads, projection_dim=proj)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj, attn_implementation="sdpa")
    return CLIPModel(cfg)


def _get(out: Any, name: str) -> torch.Tensor:
    return getattr(out, name) if hasattr(out, name) else out[name]


def contrastive_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with class-aware targets (all same-digit pairs of the batch are positives)."""
    logits = _get(out, "logits_per_image")  # (B_img, B_txt)
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))  # same is symmetric


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    digits = load_digits_split(seed=0)
    tok = Tokenizer()
    model = build_model(tok.vocab_size, tok.eos)
    n_train, n_test = len(digits.y_train), len(digits.y_test)
    gen = torch.Generator().manual_seed(0)

    def make_batch(_: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = torch.randint(0, n_train, (args.batch_size,), generator=gen)
        y = digits.y_train[idx]
        tmpl = torch.randint(0, len(TEMPLATES), (len(idx),), generator=gen)
        num = torch.randint(0, 2, (len(idx),), generator=gen)
        texts = [caption(int(d), int(t), bool(n)) for d, t, n in zip(y, tmpl, num)]
        return {"pixel_values": digits.norm(shift(digits.x_train[idx], gen)), **tok(texts)}, y

    # held-out captions: one per held-out image, random template and form (fixed seed)
    g_eval = torch.Generator().manual_seed(123)
    tmpl = torch.randint(0, len(TEMPLATES), (n_test,), generator=g_eval)
    num = torch.randint(0, 2, (n_test,), generator=g_eval)
    test_texts = tok([caption(int(d), int(t), bool(n)) for d, t, n in zip(digits.y_test, tmpl, num)])
    class_texts = tok([caption(d, EVAL_TEMPLATE, False) for d in range(10)])
    test_pixels = digits.norm(digits.x_test)

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        out = m(pixel_values=test_pixels, **test_texts)
        img = F.normalize(_get(out, "image_embeds"), dim=-1)  # (360, P)
        txt = F.normalize(_get(out, "text_embeds"), dim=-1)  # (360, P)
        cls_out = m(pixel_values=test_pixels[:10], **class_texts)
        cls_txt = F.normalize(_get(cls_out, "text_embeds"), dim=-1)  # (10, P)
        y = digits.y_test
        return {
            "i2t_cls": float(((img @ cls_txt.T).argmax(1) == y).float().mean()),
            "i2t_all": float((y[(img @ txt.T).argmax(1)] == y).float().mean()),
            "t2i": float((y[(txt @ img.T).argmax(1)] == y).float().mean()),
        }

    if args.dense_cache and Path(args.dense_cache).exists():  # a dense model trained by an earlier run
        cached = torch.load(args.dense_cache)
        model.load_state_dict(cached["state"])
        model.eval()
        train_minutes = cached["minutes"]
        log.info("loaded the dense model from %s", args.dense_cache)
    else:
        log.info("training the dense CLIP: %d steps of %d", args.train_steps, args.batch_size)
        t = time.perf_counter()
        train_loop(model, make_batch, contrastive_loss, args.train_steps, args.train_lr,
                   log_every=max(1, args.train_steps // 5), log=log.info)
        train_minutes = (time.perf_counter() - t) / 60
        if args.dense_cache:
            torch.save({"state": model.state_dict(), "minutes": train_minutes}, args.dense_cache)
    dense = evaluate(model)
    log.info("dense %s (%.1f min)", dense, train_minutes)

    gen.manual_seed(1)
    data = [make_batch(i) for i in range(max(max(j.search_steps, j.retrain_steps) for j in jobs(args)))]
    example = data[0][0]
    rows: list[dict[str, Any]] = [{
        "method": "dense", "i2t_cls_cut": dense["i2t_cls"], **dense,
        "params": sum(p.numel() for p in model.parameters()), "kept_vision": 1.0, "kept_text": 1.0,
        "minutes": round(train_minutes, 2),
    }]  # fmt: skip
    details = {}
    sweep: list[dict[str, Any]] = []
    for job in jobs(args):
        label, method, retrain_steps = job.label, job.method, job.retrain_steps
        log.info("%s: ratio %.2f, search %d (lr %g, interval %d), retrain %d", label, args.ratio,
                 job.search_steps, job.lr, job.interval, retrain_steps)
        out = compress_run(method, model, example, data, contrastive_loss, evaluate, ratio=args.ratio,
                           search_steps=job.search_steps, retrain_steps=retrain_steps, lr=job.lr,
                           retrain_lr=args.retrain_lr, interval=job.interval, seed=0, score=args.score)
        rep = out.result.report
        towers = {TOWERS.get(k, k): v for k, v in towers_summary(rep).items()}
        row = {"method": label, "retrain": retrain_steps, "i2t_cls_cut": out.metrics_cut["i2t_cls"], **out.metrics, "params": rep.params_after,
               "minutes": round(out.minutes, 2)}
        for name in ("vision", "text"):
            row[f"kept_{name}"] = round(towers[name]["kept_fraction"], 3)
            row[f"{name}_layers"] = " ".join(f"{v:.2f}" for v in towers[name]["layers"].values())
        if job.table == "sweep":
            row.update(search=job.search_steps, lr=f"{job.lr:g}", interval=job.interval, method=method)
        (rows if job.table == "main" else sweep).append(row)
        details[label] = {
            "metrics_cut": out.metrics_cut, "towers": towers, "prunable_cost_removed": rep.prunable_cost_removed,
            "flops_before": rep.flops_before, "flops_after": rep.flops_after,
            "groups": [{"where": g.where, "kind": g.kind, "kept": g.kept, "total": g.total, "shape": g.shape}
                       for g in rep.groups],
            "search_loss_first_last": [out.search_losses[0], out.search_losses[-1]] if out.search_losses else None,
            "retrain_loss_first_last": [out.retrain_losses[0], out.retrain_losses[-1]] if out.retrain_losses else None,
        }  # fmt: skip
        log.info("%s: cut %s, retrained %s, kept vision %.3f text %.3f (%.1f min)", label, out.metrics_cut,
                 out.metrics, row["kept_vision"], row["kept_text"], out.minutes)
    return {
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "dense_cache")},
        "model": f"CLIPModel: vision 8x8x1 patch 2 and text (word-level, vocab {tok.vocab_size}), each hidden 64, "
                 "4 layers, 4 heads x 16, MLP 256; projection 64",
        "data": f"sklearn load_digits, stratified 80/20 split seed 0: {n_train} train / {n_test} held-out images; "
                f"{len(TEMPLATES)} caption templates x word/numeral",
        "loss": "symmetric CLIP contrastive loss on logits_per_image with class-aware targets (loss_fn), for "
                "training, search and retrain",
        "metrics": {
            "i2t_cls": "image->text R@1 among the 10 class captions 'a photo of the digit {word}'",
            "i2t_all": "image->text R@1 among all held-out captions (hit = right digit)",
            "t2i": "text->image R@1, held-out captions over held-out images (hit = right digit)",
            "*_cut": "right after the cut, before the retrain",
        },
        "n_test": n_test,
        "rows": rows,
        "sweep": sweep,
        "details": details,
        "total_minutes": round((time.perf_counter() - t_start) / 60, 2),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test: few steps, nothing written unless --out")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of the prunable parameters to remove")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--train-lr", type=float, default=2e-3)
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
    p.add_argument("--render", default=None, metavar="JSON", help="only re-write verdict + markdown from a results file")
    p.add_argument("--out", default=None, help="results name under benchmarks/results (default clip_digits)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.search_steps, args.retrain_steps, args.interval = 60, 10, 5, 5
        args.sweep = args.sweep if args.sweep != SWEEP else ["12:1e-3:3:5"]
    return args


def verdict(payload: dict[str, Any]) -> list[str]:
    """The issue's target, checked on the numbers: at 2×, unified keeps image→text R@1 (``i2t_cls``) within 3
    points of dense and beats the uniform allocation — for the main settings and over the sweep."""
    by = {r["method"]: r for r in payload["rows"]}
    if not {"dense", "unified", "uniform"} <= set(by):
        return []
    d, u, f = by["dense"]["i2t_cls"], by["unified"], by["uniform"]
    n = int(payload.get("n_test", 360))
    out = []
    for key, when in (("i2t_cls", "after the retrain"), ("i2t_cls_cut", "right after the cut (no retrain)")):
        within, beats = u[key] >= d - 0.03, u[key] > f[key]
        out.append(
            f"Main settings, {when}: target {'MET' if within and beats else 'NOT MET'} — unified i2t R@1 "
            f"{100 * u[key]:.1f} vs dense {100 * d:.1f} ({100 * (u[key] - d):+.1f} points), uniform "
            f"{100 * f[key]:.1f} (unified {100 * (u[key] - f[key]):+.1f} points = {round(n * (u[key] - f[key])):+d} "
            f"of {n} images)."
        )
    pairs = unified_vs_uniform(payload, "i2t_cls_cut", "i2t_cls")
    for when, uk, fk in (("right after the cut", "unified_cut", "uniform_cut"), ("after the retrain", "unified", "uniform")):
        ahead = sum(p[uk] > p[fk] for p in pairs)
        within = sum(p[uk] >= d - 0.03 for p in pairs)
        diffs = ", ".join(f"{100 * (p[uk] - p[fk]):+.1f}" for p in pairs)
        out.append(f"All {len(pairs)} settings (main + sweep), {when}: unified ahead of uniform in {ahead}, within 3 "
                   f"points of dense in {within}; unified - uniform = {diffs} points.")
    every = [*payload["rows"], *payload.get("sweep", [])]
    if all(r["t2i"] == 1.0 for r in every):
        out.append("t2i is 1.000 for every model (each held-out caption's nearest held-out image shows its digit): "
                   "saturated, it cannot rank the methods.")
    out.append(f"One held-out image is {100 / n:.2f} points of i2t R@1.")
    out.append(
        f"Kept fraction of the prunable parameters: unified vision {u['kept_vision']:.2f} / text {u['kept_text']:.2f} "
        f"(over the sweep: text {min(r['kept_text'] for r in [u, *payload.get('sweep', [])] if r['method'] == 'unified'):.2f}"
        f"-{max(r['kept_text'] for r in [u, *payload.get('sweep', [])] if r['method'] == 'unified'):.2f}); "
        f"uniform {f['kept_vision']:.2f} / {f['kept_text']:.2f}."
    )
    return out


def finish(payload: dict[str, Any], name: str | None) -> None:
    """Add the verdict, log it, and write ``<name>.json`` + ``<name>.md``."""
    payload["verdict"] = verdict(payload) + NOTES
    for line in payload["verdict"]:
        log.info("%s", line)
    if name:
        path = write_results(name, payload, COLUMNS)
        write_markdown(path.with_suffix(".md"), payload, SWEEP_COLUMNS)
        log.info("wrote %s", path)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("upop_fx").setLevel(logging.WARNING)
    args = parse_args(argv)
    name = args.out or (None if args.quick else "clip_digits")
    if args.render:  # re-write the verdict and the markdown of an earlier run
        finish(json.loads(Path(args.render).read_text()), name)
        return
    finish(run(args), name)


if __name__ == "__main__":
    main()
