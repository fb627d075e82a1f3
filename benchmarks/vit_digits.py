"""Image classification on digits: a small ViT trained from scratch on scikit-learn's digits, then compressed 2×.

The model: ``transformers.ViTForImageClassification`` (8×8×1 images, 2×2 patches → 16 patches + cls, hidden 96,
4 layers, 4 heads × 24, MLP 384; ``initializer_range=0.1``: with HF's 0.02 the model sits on a loss plateau for
hundreds of steps), trained with AdamW (lr 3e-3, warm-up + cosine), cross entropy and ±1 px shift augmentation on
the seed's stratified 80/20 split of ``load_digits`` (1,437 train / 360 test images). The search and the retrain
use the same task loss.

Metric: ``top1`` (%) on the 360 test images (one image = 0.28 points). Compressed with UPop's unified search,
the uniform search and magnitude at ratio 0.5 (head dims and MLP neurons), each followed by the same retrain;
three seeds. See :mod:`benchmarks.digits_task`.

    python -m benchmarks.vit_digits                     # 3 seeds, written to benchmarks/results/vit_digits.*
    python -m benchmarks.vit_digits --seeds 0 --quick     # a smoke run
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .digits_data import Digits, shift
from .digits_task import Setup, Task, run_main


def build_model(hidden: int = 96, layers: int = 4, heads: int = 4, mlp: int = 384, init_range: float = 0.1
                ) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=mlp, num_labels=10, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, initializer_range=init_range, attn_implementation="sdpa")
    return ViTForImageClassification(cfg).eval()


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out["logits"]


def ce_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(out), target)


def setup(digits: Digits, seed: int, args: argparse.Namespace) -> Setup:
    model = build_model()
    n = len(digits.y_train)

    def make_batch(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        return {"pixel_values": digits.norm(shift(digits.x_train[idx], gen))}, digits.y_train[idx]

    test = digits.norm(digits.x_test)

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"top1": 100 * float((logits_of(m(pixel_values=test)).argmax(-1) == digits.y_test).float().mean())}

    return Setup(model, make_batch, ce_loss, evaluate)


TASK = Task(
    name="vit_digits",
    metric="top1",
    describe={
        "model": "ViTForImageClassification 8x8x1, patch 2, hidden 96, 4 layers, 4 heads x 24, MLP 384",
        "data": "sklearn load_digits, stratified 80/20 split per seed (1,437 train / 360 test), ±1 px shifts",
        "loss": "cross entropy (training, search and retrain)",
        "metric": "top1: top-1 (%) on the 360 test images (one image = 0.28 points); *_cut = right after the cut",
    },
    paper="DeiT-S on ImageNet, top-1 79.9 → 78.9 at 2×",
    setup=setup,
    defaults={"train_steps": 1000, "train_lr": 3e-3},
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_main(TASK, argv, __doc__)


if __name__ == "__main__":
    main()
