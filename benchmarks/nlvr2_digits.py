"""Visual reasoning over two images (NLVR2-style) on digits: a small BLIP reasoning model trained from scratch
on scikit-learn's digits, then compressed 2×.

The model (:class:`BlipNLVR`), built from Hugging Face BLIP modules as the BLIP paper's NLVR2 model is: one
vision encoder (``BlipVisionModel``: 8×8 images repeated to 3 channels, 2×2 patches, hidden 64, 4 layers,
4 heads × 16, MLP 256) applied to both images (as one batch of 2B), a text encoder (``BlipTextModel`` in
encoder mode, hidden 64, 2 layers, 4 heads × 16, MLP 256) whose cross-attention attends to the tokens of both
images, and a true/false head (linear–ReLU–linear on the first text token). Where the paper gives every layer one
cross-attention per image and merges their outputs with a linear layer, here the merge comes first: the two
images' tokens are concatenated position by position ([left; right], 2 × 64 features) and a linear layer merges
them into the one sequence the stock BLIP cross-attention attends to, so left and right stay in different
directions of every token.

Statements about a pair: "the left digit is larger", "both digits are even", "they are the same digit", "their
sum is more than nine"; every example draws a statement and a truth value (balanced true / false) and then a pair
of images whose digits make it so. Loss: cross entropy of true / false. (With "the right digit is larger" beside
"the left digit is larger", those two stayed at chance after 3 minutes of training while the others reached
73–98%: for a model that does not yet tell the two statements apart their labels are opposite on the same pairs,
so their gradients cancel.) Training: the vision tower is first pretrained on digit classification (800 steps,
as BLIP starts from a pretrained ViT), then the model trains on the statements (1,300 steps at lr 5e-4).

Metric: ``accuracy`` (%) on 1,440 balanced examples drawn (fixed per seed) from the held-out images only.
Compressed with UPop's unified search, the uniform search and magnitude at ratio 0.5, each followed by the same
retrain; three seeds. See :mod:`benchmarks.digits_task`.

    python -m benchmarks.nlvr2_digits                     # 3 seeds, written to benchmarks/results/nlvr2_digits.*
    python -m benchmarks.nlvr2_digits --seeds 0 --quick     # a smoke run
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .caption_digits import BOS, PAD, SEP, images, vision_pretraining
from .digits_data import Digits, shift
from .digits_task import Setup, Task, run_main

STATEMENTS = ["the left digit is larger", "both digits are even", "they are the same digit",
              "their sum is more than nine"]
KEYS = ["left_larger", "both_even", "same_digit", "sum_over_nine"]  # per-statement accuracy in the results
TEST_EXAMPLES = 1440


def holds(statement: int, left: int, right: int) -> bool:
    return [left > right, left % 2 == 0 and right % 2 == 0, left == right, left + right > 9][statement]


class BlipNLVR(torch.nn.Module):
    """One BLIP vision encoder over both images, a BLIP text encoder cross-attending to both, a true/false head."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__()
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        width = vision_config.hidden_size
        self.merge = torch.nn.Linear(2 * width, text_config.encoder_hidden_size)  # [left; right] per position
        hidden = text_config.hidden_size
        self.cls_head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))

    def forward(self, pixel_values_left: torch.Tensor, pixel_values_right: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        b = input_ids.shape[0]
        both = self.vision_model(pixel_values=torch.cat([pixel_values_left, pixel_values_right])).last_hidden_state
        tokens = self.merge(torch.cat([both[:b], both[b:]], dim=-1))
        mask = torch.ones(tokens.shape[:-1], dtype=torch.long, device=tokens.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=tokens,
                                 encoder_attention_mask=mask, is_decoder=False).last_hidden_state
        return self.cls_head(text[:, 0])


def build_model(vocab_size: int, length: int) -> BlipNLVR:
    from transformers import BlipTextConfig, BlipVisionConfig

    text = BlipTextConfig(vocab_size=vocab_size, hidden_size=64, encoder_hidden_size=64, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=length,
                          pad_token_id=PAD, bos_token_id=BOS, sep_token_id=SEP, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, initializer_range=0.05, use_cache=False)
    vision = BlipVisionConfig(image_size=8, patch_size=2, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                              num_attention_heads=4, initializer_range=0.05)
    return BlipNLVR(vision, text).eval()


def logits_of(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) else out[0]


def nlvr_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(out), target)


def draw(statements: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (statement, truth), a pair of indices into ``labels`` whose digits make the statement so."""
    by_digit = [torch.nonzero(labels == d).flatten() for d in range(10)]
    pairs = {(s, t): [(a, b) for a in range(10) for b in range(10) if holds(s, a, b) == t]
             for s in range(len(STATEMENTS)) for t in (True, False)}
    left, right = [], []
    for s, t in zip(statements.tolist(), truth.tolist()):
        options = pairs[(s, bool(t))]
        a, b = options[int(torch.randint(0, len(options), (1,), generator=gen))]
        left.append(by_digit[a][int(torch.randint(0, len(by_digit[a]), (1,), generator=gen))])
        right.append(by_digit[b][int(torch.randint(0, len(by_digit[b]), (1,), generator=gen))])
    return torch.stack(left), torch.stack(right)


def setup(digits: Digits, seed: int, args: argparse.Namespace) -> Setup:
    words = sorted({w for s in STATEMENTS for w in s.split()})
    index = {w: i + 3 for i, w in enumerate(words)}
    length = 2 + max(len(s.split()) for s in STATEMENTS)
    encoded = torch.tensor([[BOS, *(index[w] for w in s.split()), SEP] + [PAD] * (length - 2 - len(s.split()))
                            for s in STATEMENTS])
    model = build_model(3 + len(words), length)

    def inputs(left: torch.Tensor, right: torch.Tensor, statements: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = encoded[statements]
        return {"pixel_values_left": left, "pixel_values_right": right, "input_ids": ids,
                "attention_mask": (ids != PAD).long()}

    def make_batch(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        statements = torch.randint(0, len(STATEMENTS), (args.batch_size,), generator=gen)
        truth = torch.randint(0, 2, (args.batch_size,), generator=gen)
        li, ri = draw(statements, truth, digits.y_train, gen)
        x = digits.x_train
        return inputs(images(digits, shift(x[li], gen)), images(digits, shift(x[ri], gen)), statements), truth

    test_gen = torch.Generator().manual_seed(20_000 + seed)
    test_statements = torch.arange(TEST_EXAMPLES) % len(STATEMENTS)
    test_truth = (torch.arange(TEST_EXAMPLES) // len(STATEMENTS)) % 2
    li, ri = draw(test_statements, test_truth, digits.y_test, test_gen)
    test = inputs(images(digits, digits.x_test[li]), images(digits, digits.x_test[ri]), test_statements)

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        hit = (logits_of(m(**test)).argmax(-1) == test_truth).float()
        per = {KEYS[k]: 100 * float(hit[test_statements == k].mean()) for k in range(len(STATEMENTS))}
        return {"accuracy": 100 * float(hit.mean()), **per}

    return Setup(model, make_batch, nlvr_loss, evaluate, pretrain=vision_pretraining(model.vision_model, digits, args))


TASK = Task(
    name="nlvr2_digits",
    metric="accuracy",
    describe={
        "model": "BlipNLVR: one BLIP vision encoder (8x8x3, patch 2, hidden 64, 4 layers, 4 heads x 16, MLP 256) "
                 "over both images, a BLIP text encoder (hidden 64, 2 layers, 4 heads x 16, MLP 256) "
                 "cross-attending to both (their tokens merged position by position by a linear layer), a "
                 "true/false head",
        "data": "sklearn load_digits, stratified 80/20 split per seed; pairs drawn for 4 statements (left larger, "
                "both even, same digit, sum over nine), balanced true / false; test pairs from test images only",
        "loss": "cross entropy of true / false",
        "metric": f"accuracy: % of {TEST_EXAMPLES} balanced test statements judged right ({', '.join(KEYS)}: per "
                  "statement); *_cut = right after the cut",
    },
    paper="BLIP on NLVR2 (test-P), 83.1 → 81.1 at 2×",
    setup=setup,
    defaults={"pretrain_steps": 800, "train_steps": 1300, "train_lr": 5e-4},
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_main(TASK, argv, __doc__)


if __name__ == "__main__":
    main()
