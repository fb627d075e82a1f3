"""The digits task benchmarks: their models compress exactly, the generative ones generate after the cut, the
fixed-length greedy decoding equals Hugging Face's ``generate``, and every script runs end to end on a tiny
budget (one seed, a few steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upop_fx
from benchmarks import (
    caption_digits,
    clip_digits,
    nlvr2_digits,
    score_default,
    segmenter_digits,
    vit_digits,
    vqa_digits,
)
from benchmarks.digits_data import load_digits_split, train_loop
from benchmarks.digits_task import render, summarize, verdict

pytest.importorskip("pycocoevalcap")


def _setup(module, seed: int = 0):
    import argparse

    torch.manual_seed(seed)
    return module.setup(load_digits_split(seed), seed, argparse.Namespace(batch_size=4))


def _caption_setup(seed: int = 0):
    return _setup(caption_digits, seed)


def test_fixed_length_greedy_decoding_is_generate():
    s = _caption_setup()
    vocab = caption_digits.Vocab()
    gen = torch.Generator().manual_seed(0)  # a model that says something: a few steps of training
    train_loop(s.model, lambda _: s.make_batch(gen), s.loss_fn, 30, 3e-3, warmup=5)
    pixels = s.make_batch(torch.Generator().manual_seed(1))[0]["pixel_values"]
    ours = caption_digits.greedy(s.model, pixels, vocab.length)
    theirs = s.model.generate(pixel_values=pixels, max_new_tokens=vocab.length - 1, do_sample=False)
    for a, b in zip(ours.tolist(), theirs.tolist()):
        assert vocab.decode(a) == vocab.decode(b)


def test_the_captioner_compresses_exactly_and_its_module_generates():
    s = _caption_setup()
    example = s.make_batch(torch.Generator().manual_seed(2))[0]
    result = upop_fx.compress(s.model, example, ratio=0.5, method="magnitude", retrain_steps=0, own_class=True,
                              granularity="heads")  # the surgery is checked against the zeroed reference inside
    assert result.report.params_after < result.report.params_before
    assert result.module is not None, result.report.module_reason
    vocab = caption_digits.Vocab()
    pixels = example["pixel_values"]
    graph = caption_digits.greedy(result.model, pixels, vocab.length)
    module = result.module.generate(pixel_values=pixels, max_new_tokens=vocab.length - 1, do_sample=False)
    assert [vocab.decode(r) for r in graph.tolist()] == [vocab.decode(r) for r in module.tolist()]


def test_the_vqa_model_compresses_exactly_and_answers_through_generate():
    """The pruned towers, put back into ``BlipForQuestionAnswering``, generate the answers the pruned graph decodes."""
    from transformers import BlipForQuestionAnswering

    s = _setup(vqa_digits)
    gen = torch.Generator().manual_seed(0)
    train_loop(s.model, lambda _: s.make_batch(gen), s.loss_fn, 30, 3e-3, warmup=5)
    example = s.make_batch(torch.Generator().manual_seed(2))[0]
    result = upop_fx.compress(s.model, example, ratio=0.5, method="magnitude", retrain_steps=0, own_class=True,
                              granularity="heads")
    assert result.report.params_after < result.report.params_before
    assert result.module is not None, result.report.module_reason
    question = {k: v for k, v in example.items() if k != "decoder_input_ids"}
    graph = vqa_digits.greedy_answers(result.model, question)
    assert torch.equal(vqa_digits.greedy_answers(result.module, question), graph)
    hf = BlipForQuestionAnswering(_blip_config(result.module)).eval()  # a shell to generate with
    hf.vision_model, hf.text_encoder, hf.text_decoder = (result.module.vision_model, result.module.text_encoder,
                                                         result.module.text_decoder)
    answers = hf.generate(input_ids=question["input_ids"], attention_mask=question["attention_mask"],
                          pixel_values=question["pixel_values"], max_new_tokens=vqa_digits.ANSWER_LENGTH - 1,
                          do_sample=False)
    assert torch.equal(answers[:, 1], graph[:, 1])


def _blip_config(module):
    from transformers import BlipConfig

    return BlipConfig(text_config=module.text_decoder.config.to_dict(),
                      vision_config=module.vision_model.config.to_dict())


def test_cider_scores_the_right_caption_above_a_wrong_one():
    refs = [[caption_digits.caption(t, d) for t in caption_digits.TEMPLATES] for d in (3, 7, 1)]
    right = caption_digits.cider(["a handwritten three", "the digit seven", "this is a one"], refs)
    wrong = caption_digits.cider(["a handwritten eight", "the digit two", "this is a nine"], refs)
    assert right > wrong >= 0  # with three images the n-grams all share carry no weight (idf 0)
    assert caption_digits.first_digit("the number 7 written by hand") == 7
    assert caption_digits.first_digit("a handwritten") is None


def test_summary_and_targets_are_computed_over_seeds():
    rows = [{"method": "dense", "seed": s, "m": 90.0 + s, "m_cut": 90.0 + s, "minutes": 1.0} for s in range(3)]
    rows += [{"method": "unified", "seed": s, "m": 89.0 + s, "m_cut": 50.0, "kept_v": 0.5, "minutes": 1.0}
             for s in range(3)]
    rows += [{"method": "uniform", "seed": s, "m": 80.0, "m_cut": 40.0 + s, "kept_v": 0.5, "minutes": 1.0}
             for s in range(3)]
    summary = {r["method"]: r for r in summarize(rows, "m")}
    assert summary["unified"]["m"] == pytest.approx(90.0) and summary["unified"]["m_std"] == pytest.approx(1.0)
    assert summary["uniform"]["m_cut_std"] == pytest.approx(np.std([40, 41, 42], ddof=1))
    lines = verdict(list(summary.values()), "m")
    assert "1.00 points behind" in lines[0] and "met" in lines[0] and "NOT" not in lines[0]
    assert "unified ahead) met" in lines[1]
    rows[3]["m"] = 49.0  # unified seed 0: its retrain ended below its cut
    lines = verdict(list(summary.values()), "m", rows)
    assert lines[0] == "after the retrain ≥ right after the cut on 5 of 6 rows; below on unified seed 0 (50.00 → 49.00)"


TASKS = [caption_digits, vqa_digits, nlvr2_digits, segmenter_digits, vit_digits, clip_digits]


@pytest.mark.parametrize("module", TASKS, ids=lambda m: m.__name__.split(".")[-1])
def test_every_task_model_compresses_exactly_against_its_zeroed_reference(module):
    s = _setup(module)
    example = s.make_batch(torch.Generator().manual_seed(3))[0]
    result = upop_fx.compress(s.model, example, ratio=0.5, method="magnitude", retrain_steps=0)
    assert result.report.params_after < result.report.params_before
    towers = {g.tower.split(".")[0] for g in result.report.groups if g.kept < g.total}
    assert len(towers) >= (1 if module is vit_digits else 2), towers  # every tower is pruned, not only one
    with torch.no_grad():
        got, want = result.model(**example), result.reference()(**example)
    leaves = [(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want))
              if isinstance(a, torch.Tensor) and a.is_floating_point()]
    assert leaves
    for a, b in leaves:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


#: every task's driver is the shared ``benchmarks.digits_task``: one end-to-end run (the fastest task) is in
#: ``make test``; the others (about a minute each on two cores) run with ``pytest -m slow``. Every task's model is
#: compressed exactly in ``make test`` (above).
END_TO_END = [m if m is vit_digits else pytest.param(m, marks=pytest.mark.slow) for m in TASKS]


@pytest.mark.parametrize("module", END_TO_END, ids=lambda m: m.__name__.split(".")[-1])
def test_every_task_runs_end_to_end_on_a_tiny_budget(module):
    payload = module.main(["--seeds", "0", "--quick", "--train-steps", "5"])
    methods = [r["method"] for r in payload["rows"]]
    assert methods == ["dense", "unified", "uniform", "magnitude", "unified_sensitivity"]
    assert [r["score"] for r in payload["rows"]] == [None, "gradient", "gradient", None, "sensitivity"]
    metric = payload["metric"]
    for r in payload["rows"]:
        assert np.isfinite(r[metric]) and np.isfinite(r[f"{metric}_cut"])
    pruned = [r for r in payload["rows"] if r["method"] != "dense"]
    assert all(any(k.startswith("kept_") for k in r) for r in pruned)
    assert all(r["params"] < payload["rows"][0]["params"] for r in pruned)
    assert len(payload["verdict"]) == 3
    assert all("retrain_step_kept" in r for r in pruned)  # the guard measured every retrain
    text = render(module.TASK, payload)
    assert f"| method | seeds | {metric} | {metric}_cut |" in text and "Kept per layer" in text


@pytest.mark.slow
def test_the_captioner_retrain_can_keep_its_weights_by_cider_on_training_images():
    from benchmarks import caption_digits

    payload = caption_digits.main(["--seeds", "0", "--quick", "--train-steps", "5", "--distill", "--guard", "metric",
                                   "--methods", "unified"])
    (row,) = [r for r in payload["rows"] if r["method"] == "unified"]
    assert payload["config"]["guard"] == "metric" and "retrain_step_kept" in row


def test_a_task_without_a_training_metric_refuses_guard_metric():
    from benchmarks import vit_digits

    with pytest.raises(SystemExit, match="offers no metric on training images"):
        vit_digits.main(["--seeds", "0", "--quick", "--guard", "metric"])


def _score_rows(metric: str, gradient: list[float], sensitivity: list[float]) -> dict:
    rows = [{"method": "unified", "score": "gradient", metric: v, f"{metric}_cut": v - 1} for v in gradient]
    rows += [{"method": "unified_sensitivity", "score": "sensitivity", metric: v, f"{metric}_cut": v - 1}
             for v in sensitivity]
    return {"metric": metric, "rows": rows + [{"method": "magnitude", "score": None, metric: 0.0}]}


@pytest.mark.parametrize("clear_wins,default", [(3, "sensitivity"), (2, "gradient")])  # of 4: half is not most
def test_the_default_score_changes_only_where_it_wins_most_tasks_by_more_than_its_std(tmp_path, clear_wins, default):
    import json

    tasks = score_default.TASKS[:3]
    for i, name in enumerate(tasks):
        ahead = i < clear_wins  # sensitivity ahead by 2 with a std of 1 (a win), or by 0.5 with a std of 1 (none)
        sens = [11.0, 12.0, 13.0] if ahead else [9.5, 10.5, 11.5]
        (tmp_path / f"{name}.json").write_text(json.dumps(_score_rows("acc", [9.0, 10.0, 11.0], sens)))
    minilm = [{"method": m, "ratio": r, "mrr": v} for m, r, v in
              [("upop", 0.5, 0.70), ("upop", 0.5, 0.72), ("upop_sensitivity", 0.5, 0.71), ("upop_sensitivity", 0.5, 0.71),
               ("upop", 0.3, 0.99)]]  # fmt: skip
    (tmp_path / f"{score_default.MINILM}.json").write_text(json.dumps({"rows": minilm}))
    out = score_default.main(["--results", str(tmp_path)])
    assert out["default"] == default
    assert [r["wins"] for r in out["rows"]] == ["sensitivity"] * clear_wins + ["neither"] * (4 - clear_wins)
    assert out["rows"][-1]["task"] == score_default.MINILM and out["rows"][-1]["gradient"] == "71.00 ± 1.41"
    assert set(out["missing"]) == set(score_default.TASKS[3:])
    assert out["rows"][0]["gradient_cut"] == "9.00 ± 1.00" and out["rows"][-1]["gradient_cut"] == ""  # MiniLM: none
    assert f"**Default: {default}**" in (tmp_path / "score_default.md").read_text()
