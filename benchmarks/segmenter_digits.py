"""Semantic segmentation of digit mosaics: a small Segmenter trained from scratch on scikit-learn's digits, then
compressed 2×.

The model (:class:`Segmenter`, the design of Strudel et al. 2021 that UPop compresses): a ViT encoder
(``transformers.ViTModel``: 16×16×1 mosaics, 2×2 patches → 64 patches + cls, hidden 64, 4 layers, 4 heads × 16,
MLP 256) and a mask-transformer decoder — 11 learned class embeddings processed jointly with the projected patch
tokens by 2 transformer layers (``ViTLayer``, hidden 64, 4 heads, MLP 256), masks from the scalar products of the
L2-normalised patch and class embeddings, normalised over classes, upsampled bilinearly to the pixels.

Data: 2×2 mosaics of four digit images (16×16), each pixel labelled background (ink below a quarter of full
scale) or the digit it belongs to (11 classes). Training mosaics draw four random training images (±1 px
shifts); the test mosaics (fixed per seed) use held-out images only. Loss: per-pixel cross entropy.

Metric: ``miou`` (%), the mean over the 11 classes of the intersection over union on 360 test mosaics, and
``pixel_acc`` (%). Compressed with UPop's unified search, the uniform search and magnitude at ratio 0.5 (encoder
and decoder head dims and MLP neurons), each followed by the same retrain; three seeds. See
:mod:`benchmarks.digits_task`.

    python -m benchmarks.segmenter_digits                     # 3 seeds, written to benchmarks/results/segmenter_digits.*
    python -m benchmarks.segmenter_digits --seeds 0 --quick     # a smoke run
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .digits_data import Digits, shift
from .digits_task import Setup, Task, run_main

CLASSES = 11  # background + 10 digits
INK = 0.25  # a pixel with less ink than this (of full scale) is background
TEST_MOSAICS = 360


class Segmenter(torch.nn.Module):
    """ViT encoder + mask transformer: class embeddings and patch tokens through joint layers, masks from their
    normalised scalar products."""

    def __init__(self, image_size: int = 16, patch: int = 2, hidden: int = 64, layers: int = 4, heads: int = 4,
                 mlp: int = 256, decoder_layers: int = 2, classes: int = CLASSES) -> None:
        from transformers import ViTConfig, ViTModel
        from transformers.models.vit.modeling_vit import ViTLayer

        super().__init__()
        enc = ViTConfig(image_size=image_size, patch_size=patch, num_channels=1, hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.1,
                        attn_implementation="sdpa")
        self.grid = image_size // patch
        self.image_size = image_size
        self.encoder = ViTModel(enc, add_pooling_layer=False)
        dec = ViTConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=mlp, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")  # standalone layers: say which
        self.proj_dec = torch.nn.Linear(hidden, hidden)
        self.cls_emb = torch.nn.Parameter(0.02 * torch.randn(1, classes, hidden))
        self.blocks = torch.nn.ModuleList(ViTLayer(dec) for _ in range(decoder_layers))
        self.decoder_norm = torch.nn.LayerNorm(hidden)
        self.proj_patch = torch.nn.Parameter(hidden**-0.5 * torch.randn(hidden, hidden))
        self.proj_classes = torch.nn.Parameter(hidden**-0.5 * torch.randn(hidden, hidden))
        self.mask_norm = torch.nn.LayerNorm(classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.encoder(pixel_values=pixel_values).last_hidden_state[:, 1:]  # patch tokens, cls dropped
        n = x.shape[1]
        x = torch.cat([self.proj_dec(x), self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            out = block(x)
            x = out[0] if isinstance(out, tuple) else out
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, n:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, P, C)
        masks = masks.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
        return F.interpolate(masks, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)


def mosaic(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, 4, 1, 8, 8) images in [0, 1] and ``y`` (B, 4) digits → (B, 1, 16, 16) mosaics and their pixel
    labels (B, 16, 16): 0 background, 1 + digit where the digit's ink is."""
    b = x.shape[0]
    top = torch.cat([x[:, 0], x[:, 1]], dim=-1)
    bottom = torch.cat([x[:, 2], x[:, 3]], dim=-1)
    image = torch.cat([top, bottom], dim=-2)  # (B, 1, 16, 16)
    digit = (y + 1).view(b, 2, 2).repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    return image, torch.where(image[:, 0] >= INK, digit, torch.zeros_like(digit))


def seg_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out if isinstance(out, torch.Tensor) else out[0], target)


def miou(pred: torch.Tensor, target: torch.Tensor, classes: int = CLASSES) -> float:
    """Mean intersection over union (%) over the classes present in the target or the prediction."""
    ious = []
    for c in range(classes):
        p, t = pred == c, target == c
        union = int((p | t).sum())
        if union:
            ious.append(int((p & t).sum()) / union)
    return 100 * sum(ious) / len(ious)


def setup(digits: Digits, seed: int, args: argparse.Namespace) -> Setup:
    model = Segmenter().eval()
    n = len(digits.y_train)

    def make_batch(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = torch.randint(0, n, (args.batch_size, 4), generator=gen)
        x = shift(digits.x_train[idx.flatten()], gen).view(args.batch_size, 4, 1, 8, 8)
        image, labels = mosaic(x, digits.y_train[idx])
        return {"pixel_values": digits.norm(image)}, labels

    gen = torch.Generator().manual_seed(30_000 + seed)
    idx = torch.randint(0, len(digits.y_test), (TEST_MOSAICS, 4), generator=gen)
    test_image, test_labels = mosaic(digits.x_test[idx], digits.y_test[idx])
    test_pixels = digits.norm(test_image)

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        out = m(pixel_values=test_pixels)
        pred = (out if isinstance(out, torch.Tensor) else out[0]).argmax(1)
        return {"miou": miou(pred, test_labels), "pixel_acc": 100 * float((pred == test_labels).float().mean())}

    return Setup(model, make_batch, seg_loss, evaluate)


TASK = Task(
    name="segmenter_digits",
    metric="miou",
    describe={
        "model": "Segmenter: ViT encoder 16x16x1, patch 2, hidden 64, 4 layers, 4 heads x 16, MLP 256; mask "
                 "transformer with 11 class embeddings, 2 ViTLayers (hidden 64, 4 heads, MLP 256)",
        "data": "sklearn load_digits, stratified 80/20 split per seed; 2x2 mosaics of digits, pixels labelled "
                "background or digit (11 classes); test mosaics from test images only",
        "loss": "per-pixel cross entropy",
        "metric": f"miou: mean IoU (%) over 11 classes on {TEST_MOSAICS} test mosaics; pixel_acc: % of pixels right; "
                  "*_cut = right after the cut",
    },
    paper="Segmenter ViT-S on ADE20K, mIoU 45.3 → 44.4 at 1.39× fewer FLOPs",
    setup=setup,
    defaults={"batch_size": 32, "train_steps": 1400},  # 1,500 steps of 64 mosaics took 4.7 min: over 3 minutes
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_main(TASK, argv, __doc__)


if __name__ == "__main__":
    main()
