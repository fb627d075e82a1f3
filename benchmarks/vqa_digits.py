"""Visual question answering on digits: a small BLIP VQA model trained from scratch on scikit-learn's digits,
then compressed 2×.

The model: the three towers of ``transformers.BlipForQuestionAnswering`` — a vision encoder (8×8 images repeated
to 3 channels, 2×2 patches, hidden 64, 4 layers, 4 heads × 16, MLP 256), a question encoder that cross-attends
to the image and an answer decoder that cross-attends to the question (each hidden 64, 2 layers, 4 heads × 16,
MLP 256) — run as in its training forward, returning the answer decoder's logits (:class:`BlipVQA`: the Hugging
Face forward returns only the loss). Random init, a word-level vocabulary of the questions and answers.

Questions, every one asked of every image: "what digit is this?" (answer: its word), "is it even?",
"is it larger than five?" (yes / no), "what is it plus one?" (the word of d + 1, "ten" for 9). Training draws
a random image and a random question per example. Loss: cross entropy of the answer tokens. Training: the
vision tower is first pretrained on digit classification (400 steps, as BLIP starts from a pretrained ViT), then
the model trains on the questions (1,800 steps at lr 5e-4; at 2e-3 the post-LN text towers never left chance).

Metric on the held-out split (20%, stratified, per seed): ``accuracy``, exact match (in %) of the greedily
decoded answer over every test image × every question (1,440 pairs); ``digit_acc``: the same on the
"what digit" question alone. Compressed with UPop's unified search, the uniform search and magnitude at
ratio 0.5, each followed by the same retrain; three seeds. See :mod:`benchmarks.digits_task`.

    python -m benchmarks.vqa_digits                      # 3 seeds, written to benchmarks/results/vqa_digits.*
    python -m benchmarks.vqa_digits --seeds 0 --quick      # a smoke run
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .caption_digits import BOS, PAD, SEP, WORDS, images, logits_of, vision_pretraining
from .digits_data import Digits, shift
from .digits_task import Setup, Task, run_main

QUESTIONS = ["what digit is this ?", "is it even ?", "is it larger than five ?", "what is it plus one ?"]


def answer(question: int, digit: int) -> str:
    if question == 0:
        return WORDS[digit]
    if question == 1:
        return "yes" if digit % 2 == 0 else "no"
    if question == 2:
        return "yes" if digit > 5 else "no"
    return (WORDS + ["ten"])[digit + 1]


class Vocab:
    """``[pad]``, ``[sep]``, ``[bos]``, then the words of the questions and answers."""

    def __init__(self) -> None:
        words = sorted({w for q in QUESTIONS for w in q.split()} | set(WORDS) | {"ten", "yes", "no"})
        self.words = ["[pad]", "[sep]", "[bos]", *words]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.question_length = 2 + max(len(q.split()) for q in QUESTIONS)

    def encode(self, text: str, length: int) -> list[int]:
        ids = [BOS, *(self.index[w] for w in text.split()), SEP]
        return ids + [PAD] * (length - len(ids))


ANSWER_LENGTH = 3  # [bos] word [sep]


class BlipVQA(torch.nn.Module):
    """``BlipForQuestionAnswering``'s towers under their own names, run as its training forward (image → question
    encoder → answer decoder), returning the answer logits."""

    def __init__(self, blip: torch.nn.Module) -> None:
        super().__init__()
        self.vision_model = blip.vision_model
        self.text_encoder = blip.text_encoder
        self.text_decoder = blip.text_decoder

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        question = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                     encoder_attention_mask=image_mask, use_cache=False).last_hidden_state
        return self.text_decoder(input_ids=decoder_input_ids, encoder_hidden_states=question,
                                 encoder_attention_mask=attention_mask, use_cache=False).logits


def build_model(vocab_size: int, length: int) -> BlipVQA:
    from transformers import BlipConfig, BlipForQuestionAnswering

    text = dict(vocab_size=vocab_size, hidden_size=64, encoder_hidden_size=64, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=length, pad_token_id=PAD,
                bos_token_id=BOS, sep_token_id=SEP, eos_token_id=SEP, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, initializer_range=0.05, use_cache=False)
    vision = dict(image_size=8, patch_size=2, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, initializer_range=0.05)
    return BlipVQA(BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision))).eval()


def answer_loss(out: Any, answers: torch.Tensor) -> torch.Tensor:
    logits = logits_of(out) if not isinstance(out, torch.Tensor) else out
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers[:, 1:].reshape(-1), ignore_index=PAD)


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The answer decoder's greedy tokens after ``[bos]``, at the fixed answer length (causal: padding after the
    step changes nothing)."""
    n = inputs["input_ids"].shape[0]
    ids = torch.full((n, ANSWER_LENGTH), PAD, dtype=torch.long)
    ids[:, 0] = BOS
    for t in range(ANSWER_LENGTH - 1):
        out = model(**inputs, decoder_input_ids=ids)
        ids[:, t + 1] = (out if isinstance(out, torch.Tensor) else logits_of(out))[:, t].argmax(-1)
    return ids


def setup(digits: Digits, seed: int, args: argparse.Namespace) -> Setup:
    vocab = Vocab()
    model = build_model(len(vocab.words), max(vocab.question_length, ANSWER_LENGTH))
    questions = torch.tensor([vocab.encode(q, vocab.question_length) for q in QUESTIONS])  # (Q, Lq)
    answers = torch.tensor([[vocab.encode(answer(q, d), ANSWER_LENGTH) for d in range(10)]
                            for q in range(len(QUESTIONS))])  # (Q, 10, La)
    n = len(digits.y_train)

    def inputs(pixels: torch.Tensor, which: torch.Tensor) -> dict[str, torch.Tensor]:
        q = questions[which]
        return {"pixel_values": pixels, "input_ids": q, "attention_mask": (q != PAD).long()}

    def make_batch(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        which = torch.randint(0, len(QUESTIONS), (args.batch_size,), generator=gen)
        target = answers[which, digits.y_train[idx]]
        return {**inputs(images(digits, shift(digits.x_train[idx], gen)), which), "decoder_input_ids": target}, target

    m = len(digits.y_test)
    test_which = torch.arange(len(QUESTIONS)).repeat_interleave(m)
    test_digits = digits.y_test.repeat(len(QUESTIONS))
    test_pixels = images(digits, digits.x_test).repeat(len(QUESTIONS), 1, 1, 1)
    want = answers[test_which, test_digits][:, 1]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        got = greedy_answers(model, inputs(test_pixels, test_which))[:, 1]
        hit = (got == want).float()
        return {"accuracy": 100 * float(hit.mean()), "digit_acc": 100 * float(hit[:m].mean())}

    return Setup(model, make_batch, answer_loss, evaluate, pretrain=vision_pretraining(model.vision_model, digits, args))


TASK = Task(
    name="vqa_digits",
    metric="accuracy",
    describe={
        "model": "BlipForQuestionAnswering's towers (BlipVQA): vision 8x8x3, patch 2, hidden 64, 4 layers, "
                 "4 heads x 16, MLP 256; question encoder and answer decoder hidden 64, 2 layers, 4 heads x 16, "
                 "MLP 256 each; word-level vocabulary",
        "data": "sklearn load_digits, stratified 80/20 split per seed (1,437 train / 360 test), ±1 px shifts; "
                "4 questions (what digit, even, larger than five, plus one) of every image",
        "loss": "cross entropy of the answer tokens",
        "metric": "accuracy: exact match (%) of the greedy answer over 360 test images x 4 questions; digit_acc: "
                  "the 'what digit' question alone; *_cut = right after the cut",
    },
    paper="BLIP on VQAv2 test-dev, 77.4 → 76.3 at 2×",
    setup=setup,
    defaults={"pretrain_steps": 400, "train_steps": 1800, "train_lr": 5e-4},  # 2e-3 left VQA at chance
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_main(TASK, argv, __doc__)


if __name__ == "__main__":
    main()
