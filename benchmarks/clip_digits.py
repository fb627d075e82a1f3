"""Image–text retrieval on digits: a small two-tower CLIP trained from scratch on digits with captions, then
compressed 2×: does the unified search across towers beat the same ratio applied uniformly to every layer of
every tower?

The model: ``transformers.CLIPModel`` with a vision tower (8×8×1 images, 2×2 patches, hidden 64, 4 layers,
4 heads × 16, MLP 256) and a text tower of the same size (a word-level vocabulary built from the caption
templates below; nothing is downloaded), both projected to 64, trained with AdamW (lr 2e-3, warm-up + cosine).
Data: the seed's stratified 80/20 split of ``load_digits`` (1,437 train / 360 held-out images), ±1 px shifts;
each training image is paired with a random caption of its digit: one of several templates ("a photo of the
digit seven", "handwritten 7", "the number seven", "an 8", ...) × the word or the numeral.

Loss (training, search and retrain alike): the CLIP contrastive loss on ``logits_per_image``, symmetric, with
class-aware targets — every pair of the batch showing the same digit counts as a positive (a batch of 64
holds each digit several times, so the one-hot CLIP target would punish correct matches).

Metrics on the 360 held-out images: ``i2t_cls`` (%), image→text Recall@1 among the 10 class captions of one
fixed template ("a photo of the digit {word}"), the zero-shot accuracy; ``i2t_all``, image→text Recall@1 among
all 360 held-out captions (one random template/form per image; a hit = the nearest caption names the image's
digit); ``t2i``, text→image Recall@1 with those captions as queries (a hit = the nearest image shows the
caption's digit). Compressed with UPop's unified search, the uniform search and magnitude at ratio 0.5 (both
towers' head dims and MLP neurons), each followed by the same retrain; three seeds. See
:mod:`benchmarks.digits_task`.

    python -m benchmarks.clip_digits                     # 3 seeds, written to benchmarks/results/clip_digits.*
    python -m benchmarks.clip_digits --seeds 0 --quick     # a smoke run
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .digits_data import Digits, shift
from .digits_task import Setup, Task, run_main

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

def build_model(vocab_size: int, eos: int, hidden: int = 64, layers: int = 4, heads: int = 4, mlp: int = 256,
                proj: int = 64) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=16, projection_dim=proj, pad_token_id=0,
                bos_token_id=1, eos_token_id=eos)
    vision = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, intermediate_size=mlp,
                  num_hidden_layers=layers, num_attention_heads=heads, projection_dim=proj)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj, attn_implementation="sdpa")
    return CLIPModel(cfg).eval()


def _get(out: Any, name: str) -> torch.Tensor:
    return getattr(out, name) if hasattr(out, name) else out[name]


def contrastive_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with class-aware targets (all same-digit pairs of the batch are positives)."""
    logits = _get(out, "logits_per_image")  # (B_img, B_txt)
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))  # same is symmetric


def setup(digits: Digits, seed: int, args: argparse.Namespace) -> Setup:
    tok = Tokenizer()
    model = build_model(tok.vocab_size, tok.eos)
    n_train, n_test = len(digits.y_train), len(digits.y_test)

    def make_batch(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = torch.randint(0, n_train, (args.batch_size,), generator=gen)
        y = digits.y_train[idx]
        tmpl = torch.randint(0, len(TEMPLATES), (len(idx),), generator=gen)
        num = torch.randint(0, 2, (len(idx),), generator=gen)
        texts = [caption(int(d), int(t), bool(n)) for d, t, n in zip(y, tmpl, num)]
        return {"pixel_values": digits.norm(shift(digits.x_train[idx], gen)), **tok(texts)}, y

    # held-out captions: one per held-out image, random template and form (fixed per seed)
    g_eval = torch.Generator().manual_seed(123 + seed)
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
        cls_txt = F.normalize(_get(m(pixel_values=test_pixels[:10], **class_texts), "text_embeds"), dim=-1)
        y = digits.y_test
        return {"i2t_cls": 100 * float(((img @ cls_txt.T).argmax(1) == y).float().mean()),
                "i2t_all": 100 * float((y[(img @ txt.T).argmax(1)] == y).float().mean()),
                "t2i": 100 * float((y[(txt @ img.T).argmax(1)] == y).float().mean())}

    return Setup(model, make_batch, contrastive_loss, evaluate)


TASK = Task(
    name="clip_digits",
    metric="i2t_cls",
    describe={
        "model": "CLIPModel: vision 8x8x1 patch 2 and text (word-level), each hidden 64, 4 layers, 4 heads x 16, "
                 "MLP 256; projection 64",
        "data": f"sklearn load_digits, stratified 80/20 split per seed (1,437 train / 360 held-out), ±1 px shifts; "
                f"{len(TEMPLATES)} caption templates x word/numeral",
        "loss": "symmetric CLIP contrastive loss with class-aware targets (training, search and retrain)",
        "metric": "i2t_cls: image->text R@1 (%) among the 10 class captions 'a photo of the digit {word}'; i2t_all: "
                  "among all held-out captions; t2i: text->image R@1; *_cut = right after the cut",
    },
    paper="UPop compresses CLIP for retrieval on COCO and Flickr30K; no single figure is quoted here",
    setup=setup,
    defaults={"train_steps": 1200},  # 0.13 s a step on one thread: inside the 3-minute training budget
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_main(TASK, argv, __doc__)


if __name__ == "__main__":
    main()
