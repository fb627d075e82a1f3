"""The benchmarks' shared load guard: a timed group is kept only when the machine ran quiet around it."""

from __future__ import annotations

import functools

import pytest
import torch

import benchmarks.common as common


def _machine(monkeypatch, loads, others_per_group):
    """A fake machine: the load averages read in turn, and the CPU seconds the other processes use per group."""
    loads = iter(loads)
    busy = iter(x for o in others_per_group for x in (0.0, o))  # /proc/stat read before and after each group
    monkeypatch.setattr(common.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(common, "_busy_seconds", lambda: next(busy))
    monkeypatch.setattr(common.time, "process_time", lambda: 0.0)
    clock = iter(range(0, 100, 1))
    monkeypatch.setattr(common.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(common.time, "sleep", lambda s: None)


def test_a_group_with_other_jobs_running_is_timed_again(monkeypatch):
    # try 1: quiet before, but others used 0.9 cores; try 2: quiet
    _machine(monkeypatch, [1.0, 1.0, 1.8, 1.0, 1.0, 1.9], [0.9, 0.1])
    timed = []
    ms, load = common.quiet_timing(lambda: timed.append(1) or [float(len(timed))], max_load=1.5, tries=3)
    assert ms == [2.0] and len(timed) == 2
    assert load["loaded"] is False and load["tries"] == 2 and load["load_after"] == 1.9  # our own load is allowed
    assert abs(load["others"] - 0.1) < 1e-9


def test_a_group_that_never_runs_quiet_is_marked(monkeypatch):
    _machine(monkeypatch, [3.0] * 20, [0.0, 0.0])
    ms, load = common.quiet_timing(lambda: [1.0], max_load=1.5, tries=2)
    assert load["loaded"] is True and load["tries"] == 2 and load["load_before"] == 3.0


def test_a_table_prints_flags_as_words_and_numbers_by_their_kind():
    rows = [{"bridged": True, "layers": 22, "ppl": 62.81, "big": 1104.9}, {"bridged": False}]
    table = common.markdown_table(rows, ["bridged", "layers", "ppl", "big"]).splitlines()
    assert table[2] == "| yes | 22 | 62.810 | 1,105 |" and table[3] == "| no |  |  |  |"


def test_match_speedup_finds_the_ratio_of_a_measured_speedup():
    from benchmarks.common import match_speedup

    def measure(r):  # time left falls linearly, then flattens: no ratio reaches more than 1 / 0.3
        return 1 / max(0.3, 1 - 0.8 * r)

    model, ratio, speedup, probes = match_speedup(lambda r: r, measure, 2.0, 0.5)
    assert ratio == pytest.approx(0.625) and speedup == pytest.approx(2.0) and len(probes) == 2
    model, ratio, speedup, probes = match_speedup(lambda r: r, measure, 5.0, 0.5, probes=3)
    assert len(probes) == 3 and speedup == pytest.approx(1 / 0.3)  # out of reach: the closest probe


def test_a_ratio_probed_again_is_timed_again_not_rebuilt_and_its_timings_averaged():
    """Out of reach, the step clamps at 0.95 and probes it again: the same model is timed again (built once), the
    ratio's speedup is the mean of its noisy timings, and each probe's own timing is in the record."""
    from benchmarks.common import match_speedup

    built, noise = [], iter([1.0, 1.1, 0.9, 1.0])

    def make(r):
        built.append(r)
        return r

    def measure(r):  # at most 2x, each timing off by the next noise factor
        return 1 / max(0.5, 1 - 0.6 * r) * next(noise)

    model, ratio, speedup, probes = match_speedup(make, measure, 3.0, 0.5, probes=4)
    assert built == [0.5, 0.95] and ratio == model == 0.95
    assert [r for r, _ in probes] == [0.5, 0.95, 0.95, 0.95]
    assert [s for _, s in probes] == pytest.approx([1 / 0.7, 2.2, 1.8, 2.0])
    assert speedup == pytest.approx(2.0)  # the mean of 0.95's three timings


def test_search_step_benchmark_times_three_real_training_steps(tmp_path, monkeypatch):
    """The smoke run of ``benchmarks.search_step``: each variant's step runs and trains a copy (the caller's
    model is untouched), and the result files hold one row per variant with its ratio to the eager step."""
    import json

    from benchmarks import search_step

    model, batch, _ = search_step.model_and_batch("small")
    fns = search_step.steps(model, batch, total=4)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for fn in fns.values():
        fn()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model is untouched
    quiet = {"load_before": 0.0, "load_after": 0.0, "others": 0.0, "loaded": False, "tries": 1}
    monkeypatch.setattr(search_step, "quiet_timing", lambda timer: (timer(), quiet))  # no wait for a quiet machine
    assert search_step.main(["--model", "small", "--runs", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "search_step_small.json").read_text())
    assert [r["step"] for r in payload["rows"]] == ["eager", "graph", "search"]
    assert payload["rows"][0]["vs_eager"] == 1.0 and all(r["median_ms"] > 0 for r in payload["rows"])
    assert "| search |" in (tmp_path / "search_step_small.md").read_text()


@functools.cache
def _small_tokenizer():
    """A byte-level BPE tokenizer of 512 words trained on CPython's documentation (``pydoc_data.topics``): the
    tiny models' text, with an LM head 60x narrower than a 30k-word tokenizer's (the head dominated the runs)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(sorted(topics.values()), trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="[SEP]")


def _tiny_llama(hidden: int = 32, intermediate: int = 64, layers: int = 2):
    """A random Llama of SmolLM2's layout (grouped-query heads, SwiGLU MLP), with a small tokenizer for text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _small_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval(), tok


def test_depth_bridge_benchmark_removes_the_same_layers_bridged_and_not(tmp_path):
    """``benchmarks.depth_bridge`` on a tiny random Llama of 4 layers, two seeds: per seed the same layer removed
    twice, once with its gap bridged; finite perplexities; the files written."""
    from benchmarks import depth_bridge

    payload = depth_bridge.run([1], [0, 1], blocks=1, load=lambda: _tiny_llama(layers=4), calibration_batches=2)
    assert [(r["seed"], r["bridged"]) for r in payload["rows"]] == [(0, False), (0, True), (1, False), (1, True)]
    plain, bridged = payload["rows"][:2]
    assert plain["dropped"] == bridged["dropped"] and plain["bridges"] == [] and len(bridged["bridges"]) == 1
    assert all(0 < r[k] < float("inf") for r in payload["rows"] for k in ("ppl_bbc", "ppl_pydoc"))
    common.write_results("bridge", payload, depth_bridge.COLUMNS, tmp_path, markdown=depth_bridge.report(payload))
    assert "1 layers, bridged" in (tmp_path / "bridge.md").read_text()


def test_shared_rotary_benchmark_compares_both_cuts_of_a_llama(tmp_path):
    """The comparison of ``benchmarks.shared_rotary`` on a tiny random Llama (a small tokenizer for the text):
    the dense row and both cuts, each of the model's class, with finite perplexities; the shared cut narrows the
    heads, the default keeps their size."""
    from benchmarks import shared_rotary

    payload = shared_rotary.run(0.3, blocks=1, load=_tiny_llama)
    dense, whole, shared = payload["rows"]
    assert whole["head_dim"] == 8 and shared["head_dim"] < 8
    assert all(r["params"] < dense["params"] for r in (whole, shared))
    assert all(0 < r[k] < float("inf") for r in payload["rows"] for k in ("ppl_bbc", "ppl_pydoc"))
    assert "| shared rotary pairs |" in shared_rotary.report(payload)


def test_decoder_benchmark_runs_every_method_at_an_asked_decode_speed(tmp_path, monkeypatch):
    """The smoke run of ``benchmarks.decoder_smollm2`` on a tiny random Llama, a few steps each: each method gives
    a smaller model of the class, timed beside the dense one, with finite perplexities and samples, and the
    result files hold them (Torch-Pruning's row where it is installed). The latency tables run on the simulated
    runtime (a tiny model's real tables are overhead and noise); the generate() timings of the rows are real, and
    Torch-Pruning's speed match (a decision taken on timings) runs on a fake timer that follows the parameter
    count. Nothing about the speeds is asserted."""
    import importlib.util
    import json
    import time

    from benchmarks import decoder_smollm2 as bench
    from upop_fx.runtime import decode, timing

    from .simulated_runtime import SimulatedRuntime

    SimulatedRuntime().install(monkeypatch)
    simulated = decode.time_interleaved

    def real_clock(*fns, **kwargs):  # the models' generate() on the wall clock
        with monkeypatch.context() as m:
            m.setattr(timing, "clock", time.perf_counter)
            return simulated(*fns, **kwargs)

    monkeypatch.setattr(decode, "time_interleaved", real_clock)

    def size_speedup(dense, runs):  # Torch-Pruning's speed match on a fake timer: time taken to follow the size
        return lambda model: sum(p.numel() for p in dense.parameters()) / sum(p.numel() for p in model.parameters())

    monkeypatch.setattr(bench, "_decode_speedup", size_speedup)
    quiet = {"load_before": 0.0, "load_after": 0.0, "others": 0.0, "loaded": False, "tries": 1}
    monkeypatch.setattr(bench.common, "quiet_timing", lambda timer: (timer(), quiet))  # no wait for a quiet machine
    monkeypatch.setattr(bench, "CONTEXT", 32)
    monkeypatch.setenv("UPOP_FX_CACHE", str(tmp_path / "cache"))
    # one upop_fx row (the others differ only in `method`), the layers removed, and Torch-Pruning's where it is installed
    methods = ("upop", "depth") + (("torch-pruning",) if importlib.util.find_spec("torch_pruning") else ()) + (
        "dense-retrained",)
    saved = []  # a copy of what each save held: a long run keeps every retrained row before its timed group
    payload = bench.run([1.05], [0], search_steps=2, retrain_steps=1, blocks=1, methods=methods, runs=1,
                        load=lambda: _tiny_llama(128, 512), check_batches=2, schedule="cosine", task_weight=0.5, save=lambda p: saved.append(json.loads(
                            json.dumps({"rows": p["rows"], "untimed": p["untimed"], "md": bench.report(p)}))))
    assert [[r["method"] for r in p["untimed"]] for p in saved[:-1]] == [list(methods[:i + 1]) for i in
                                                                          range(len(methods))]
    assert all(not p["rows"] and "not timed yet" in p["md"] for p in saved[:-1])
    assert saved[-1]["untimed"] == payload["untimed"] == [] and "not timed yet" not in saved[-1]["md"]
    assert [r["method"] for r in payload["rows"]] == list(methods)
    dense = payload["dense"]
    for r in payload["rows"]:
        assert (r["params"] < dense["params"]) != (r["method"] == "dense-retrained")  # the reference keeps all
        assert 0 < r["ppl_bbc"] < float("inf") and len(r["samples"]) == 5
        assert r["decode_speedup"] > 0 and r["prefill_speedup"] > 0
        assert r["retrain_kept"] in [done for done, _ in r["retrain_check"]]  # the guard measured what it kept
    # the reference's guard follows its own next-token loss on the check batches: at step 0, the dense model's
    from upop_fx import datasets

    model, tok = _tiny_llama(128, 512)
    stream = bench._stream(list(datasets.bbc_texts("train")), tok, 0, True)
    with torch.no_grad():
        own = [float(model(**next(stream)).loss) for _ in range(2)]
    reference = next(r for r in payload["rows"] if r["method"] == "dense-retrained")
    assert reference["retrain_check"][0] == [0, pytest.approx(sum(own) / 2, rel=1e-5)]
    depth = next(r for r in payload["rows"] if r["method"] == "depth")  # measured right after the cut too
    assert 0 < depth["ppl_bbc_cut"] < float("inf") and depth["bridges"] and depth["layers_removed"]
    common.write_results("decoder", payload, bench.COLUMNS, tmp_path, markdown=bench.report(payload))
    assert json.loads((tmp_path / "decoder.json").read_text())["rows"][0]["method"] == "upop"
    assert "| 1.05x upop |" in (tmp_path / "decoder.md").read_text()
    assert "cosine schedule, distillation + 0.5 x the own loss" in saved[-1]["md"]  # every row trained on labels
    # an ask beyond the prunable share of decode is recorded as refused, and the run goes on without it
    beyond = bench.run([20.0], [0], search_steps=1, retrain_steps=1, blocks=1, methods=("upop",), runs=1,
                       load=lambda: _tiny_llama(128, 512), check_batches=2)
    [refused] = beyond["refused"]
    assert beyond["rows"] == [] and (refused["method"], refused["asked"]) == ("upop", 20.0)
    assert refused["most_saved"] < 0.95 and "account for at most" in refused["reason"]
    assert "20.0x upop (seed 0): at most" in bench.report(beyond)
