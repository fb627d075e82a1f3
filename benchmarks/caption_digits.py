"""Captioning digits: a small BLIP captioner trained from scratch on scikit-learn's digits, then compressed 2×.

The model: ``transformers.BlipForConditionalGeneration`` — a vision tower (8×8 images repeated to 3 channels,
2×2 patches → 16 patches + cls, hidden 64, 4 layers, 4 heads × 16, MLP 256) and a causal text decoder that
cross-attends to it (hidden 64, 2 layers, 4 heads × 16, MLP 256), random init, a word-level vocabulary built
from the caption templates (nothing is downloaded). Each training image is paired with a random caption of its
digit: one of eight templates ("a handwritten seven", "the number 7 written by hand", …), the digit as a word
or as a numeral as the template says. Loss: next-token cross entropy over the caption (padding ignored).
Training: the vision tower is first pretrained on digit classification (:func:`vision_pretraining`, as BLIP
starts from a pretrained ViT; 400 steps), then the captioner trains on the captions (1,800 steps, lr 2e-3).

Metrics on the held-out split (20%, stratified, per seed), from greedy captions (at most 9 tokens; the same
decoding for the dense model and the pruned graphs):

* ``cider``: CIDEr-D (``pycocoevalcap``'s scorer, × 100 as papers report it) of each caption against the
  eight template captions of the image's true digit;
* ``digit_acc``: the share of captions whose first digit word or numeral is the true digit (in %).

Compressed with UPop's unified search, the uniform search and magnitude at ratio 0.5 (both towers' head dims
and MLP neurons), each followed by the same retrain; three seeds (split, init, batches, search). See
:mod:`benchmarks.digits_task` for the runner and the results format. With ``--guard metric`` the retrain keeps its
weights by the CIDEr of the greedy captions of :data:`GUARD_IMAGES` training images (a fixed sample per seed;
never the held-out split) instead of by the caption loss on held batches, which does not follow CIDEr here.

    python -m benchmarks.caption_digits                   # 3 seeds, written to benchmarks/results/caption_digits.*
    python -m benchmarks.caption_digits --seeds 0 --quick   # a smoke run
    python -m benchmarks.caption_digits --distill --guard metric --out caption_digits_distill_guard
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .digits_data import Digits, shift, train_loop
from .digits_task import Setup, Task, run_main

log = logging.getLogger("benchmarks.digits_task")

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: ``{w}``: the digit as a word; ``{d}``: as a numeral
TEMPLATES = [
    "a handwritten {w}",
    "the number {d} written by hand",
    "a picture of the digit {w}",
    "an image of a handwritten {w}",
    "the digit {w}",
    "a scan of a handwritten {d}",
    "this is a {w}",
    "a {w} written by hand",
]
PAD, SEP, BOS = 0, 1, 2
#: the training images whose captions' CIDEr the retrain's guard follows with ``--guard metric``
GUARD_IMAGES = 360


def caption(template: str, digit: int) -> str:
    return template.format(w=WORDS[digit], d=str(digit))


class Vocab:
    """Word-level: ``[pad]``, ``[sep]`` (end of caption), ``[bos]``, then every word of every caption."""

    def __init__(self) -> None:
        words = sorted({w for t in TEMPLATES for d in range(10) for w in caption(t, d).split()})
        self.words = ["[pad]", "[sep]", "[bos]", *words]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.length = 2 + max(len(caption(t, d).split()) for t in TEMPLATES for d in range(10))

    def encode(self, text: str) -> list[int]:
        ids = [BOS, *(self.index[w] for w in text.split()), SEP]
        return ids + [PAD] * (self.length - len(ids))

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids[1:]:
            if i in (SEP, PAD):
                break
            out.append(self.words[i])
        return " ".join(out)


def first_digit(text: str) -> int | None:
    """The digit a caption names first (as a word or a numeral), or None."""
    for w in text.split():
        if w in WORDS:
            return WORDS.index(w)
        if w.isdigit() and len(w) == 1:
            return int(w)
    return None


def build_model(vocab_size: int, length: int) -> torch.nn.Module:
    from transformers import BlipConfig, BlipForConditionalGeneration

    text = dict(vocab_size=vocab_size, hidden_size=64, encoder_hidden_size=64, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=length, pad_token_id=PAD,
                bos_token_id=BOS, sep_token_id=SEP, eos_token_id=SEP, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, initializer_range=0.05)
    vision = dict(image_size=8, patch_size=2, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, initializer_range=0.05)
    return BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).eval()


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out["logits"]


def caption_loss(out: Any, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: position t predicts token t + 1; padding is ignored."""
    logits = logits_of(out)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)


@torch.no_grad()
def greedy(model: torch.nn.Module, pixels: torch.Tensor, length: int) -> torch.Tensor:
    """Greedy captions at a fixed length (what a pruned graph of static shape can run too): step ``t`` feeds the
    tokens so far, padded to ``length``, and takes the argmax at ``t`` — the decoder is causal, so the padding
    after ``t`` changes nothing. Equal to ``BlipForConditionalGeneration.generate`` greedy (tests check it)."""
    ids = torch.full((pixels.shape[0], length), PAD, dtype=torch.long)
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    done = torch.zeros(pixels.shape[0], dtype=torch.bool)
    for t in range(length - 1):
        nxt = logits_of(model(pixel_values=pixels, input_ids=ids, attention_mask=mask))[:, t].argmax(-1)
        ids[:, t + 1] = torch.where(done, PAD, nxt)
        done |= nxt == SEP
        if bool(done.all()):
            break
    return ids


def cider(candidates: list[str], references: list[list[str]]) -> float:
    """CIDEr-D × 100 of ``candidates[i]`` against ``references[i]`` (pycocoevalcap's scorer)."""
    from pycocoevalcap.cider.cider import Cider

    score, _ = Cider().compute_score({i: refs for i, refs in enumerate(references)},
                                     {i: [c] for i, c in enumerate(candidates)})
    return 100 * float(score)


def images(digits: Digits, x: torch.Tensor) -> torch.Tensor:
    """Standardised, repeated to the 3 channels BLIP's patch embedding takes."""
    return digits.norm(x).repeat(1, 3, 1, 1)


PRETRAIN_LR = 2e-3  # the vision tower's pretraining stage (a ViT on digits learns well at this rate)


class _DigitHead(torch.nn.Module):
    """A vision tower's mean patch token → 10 digit logits (the pretraining stage only; not part of the task)."""

    def __init__(self, vision_model: torch.nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.head = torch.nn.Linear(vision_model.config.hidden_size, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.vision_model(pixel_values=pixel_values).last_hidden_state.mean(1))


def vision_pretraining(vision_model: torch.nn.Module, digits: Digits, args: argparse.Namespace
                       ) -> Callable[[torch.Generator], None]:
    """The BLIP tasks' pretraining stage: ``args.pretrain_steps`` of digit classification on the training split
    through ``vision_model`` (a linear head on its mean token, dropped afterwards), at :data:`PRETRAIN_LR`."""

    def pretrain(gen: torch.Generator) -> None:
        n = len(digits.y_train)

        def make_batch(_: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            idx = torch.randint(0, n, (args.batch_size,), generator=gen)
            return {"pixel_values": images(digits, shift(digits.x_train[idx], gen))}, digits.y_train[idx]

        train_loop(_DigitHead(vision_model), make_batch, F.cross_entropy, args.pretrain_steps, PRETRAIN_LR,
                   warmup=max(1, min(50, args.pretrain_steps // 10)), log_every=max(1, args.pretrain_steps // 2),
                   log=log.info)

    return pretrain


def setup(digits: Digits, seed: int, args: argparse.Namespace) -> Setup:
    vocab = Vocab()
    model = build_model(len(vocab.words), vocab.length)
    encoded = torch.tensor([[vocab.encode(caption(t, d)) for t in TEMPLATES] for d in range(10)])  # (10, T, L)
    n = len(digits.y_train)

    def make_batch(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        which = torch.randint(0, len(TEMPLATES), (args.batch_size,), generator=gen)
        ids = encoded[digits.y_train[idx], which]
        pixels = images(digits, shift(digits.x_train[idx], gen))
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": (ids != PAD).long()}, ids

    def scored(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        texts = [vocab.decode(row) for row in greedy(m, images(digits, x), vocab.length).tolist()]
        hits = [first_digit(t) == int(d) for t, d in zip(texts, y)]
        references = [[caption(t, int(d)) for t in TEMPLATES] for d in y]
        return {"cider": cider(texts, references), "digit_acc": 100 * sum(hits) / len(hits)}

    sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:GUARD_IMAGES]  # training images

    return Setup(model, make_batch, caption_loss, lambda m: scored(m, digits.x_test, digits.y_test),
                 pretrain=vision_pretraining(model.vision_model, digits, args),
                 guard=lambda m: scored(m, digits.x_train[sample], digits.y_train[sample])["cider"])


TASK = Task(
    name="caption_digits",
    metric="cider",
    describe={
        "model": "BlipForConditionalGeneration: vision 8x8x3, patch 2, hidden 64, 4 layers, 4 heads x 16, MLP 256; "
                 "text decoder hidden 64, 2 layers, 4 heads x 16, MLP 256; word-level vocabulary",
        "data": "sklearn load_digits, stratified 80/20 split per seed (1,437 train / 360 test), ±1 px shifts; "
                "each training image with a random one of 8 caption templates of its digit",
        "loss": "next-token cross entropy over the caption",
        "metric": "cider: CIDEr-D x 100 (pycocoevalcap) of the greedy caption against the 8 templates of the true "
                  "digit; digit_acc: % of captions naming the true digit first; *_cut = right after the cut",
    },
    paper="BLIP on COCO captioning, CIDEr 133.3 → 128.9 at 2×",
    setup=setup,
    defaults={"pretrain_steps": 400, "train_steps": 1800},
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_main(TASK, argv, __doc__)


if __name__ == "__main__":
    main()
