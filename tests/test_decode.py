"""``upop_fx.runtime.decode``: prefill and decode timings of causal LMs side by side, with a simulated clock (each
forward of a model advances it by that model's cost per token), so that no assertion depends on wall-clock time."""

from __future__ import annotations

import pytest
import torch

import upop_fx.runtime.timing as timing
from upop_fx.errors import ConfigError
from upop_fx.runtime.decode import decode_latency


def _lm(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        eos_token_id=5, pad_token_id=0)).eval()


def _costed(model, now: list[float], ms_per_token: float, ms_per_call: float):
    """Every forward advances the clock by ``ms_per_call`` plus ``ms_per_token`` per input token."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        now[0] += (ms_per_call + ms_per_token * ids.numel()) / 1000.0
    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def test_prefill_and_decode_are_told_apart(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing, "clock", lambda: now[0])
    big = _costed(_lm(2), now, ms_per_token=0.5, ms_per_call=2.0)
    small = _costed(_lm(1), now, ms_per_token=0.25, ms_per_call=1.0)
    a, b = decode_latency([big, small], batch=2, context=8, new_tokens=5, runs=3, warmup=1)
    # prefill: one call over 2x8 tokens; generate: that, then 4 steps of one token per row
    assert a.prefill_ms == pytest.approx(2.0 + 0.5 * 16) and b.prefill_ms == pytest.approx(1.0 + 0.25 * 16)
    assert a.decode_ms == pytest.approx(2.0 + 0.5 * 2) and b.decode_ms == pytest.approx(1.0 + 0.25 * 2)
    assert a.generate_ms == pytest.approx(a.prefill_ms + 4 * a.decode_ms)
    assert a.tokens_per_s == pytest.approx(2 * 1000 / a.decode_ms)  # two rows decode a token per step
    assert (a.batch, a.context, a.new_tokens) == (2, 8, 5)


def test_an_end_of_sequence_token_never_stops_the_decode_early(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing, "clock", lambda: now[0])
    lm = _costed(_lm(1), now, ms_per_token=0.0, ms_per_call=1.0)
    with torch.no_grad():  # make every next token the end-of-sequence token
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[5] = 1.0
        lm.model.norm.weight.fill_(1.0)
    (t,) = decode_latency([lm], context=4, new_tokens=6, runs=1, warmup=0)
    assert t.generate_ms == pytest.approx(6.0)  # 1 prefill + 5 decode calls


@pytest.mark.parametrize("kwargs, words", [
    ({"new_tokens": 1}, "new_tokens >= 2"),
    ({"context": 0}, "context >= 1"),
])  # fmt: skip
def test_bad_arguments_are_refused(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        decode_latency([_lm(1)], **kwargs)
    with pytest.raises(ConfigError, match="generate"):
        decode_latency([torch.nn.Linear(2, 2)])


def test_a_cut_decoder_exports_with_its_kv_cache_and_decodes_as_generate(tmp_path):
    """Layers left with different KV head counts: each past/present pair has its own; 32 greedy tokens in ONNX
    Runtime equal ``generate``'s (checked inside the export too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import upop_fx
    from upop_fx.runtime.decoder_onnx import export_decoder_onnx, ort_greedy

    from .models import _tokens

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=36, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=9, num_key_value_heads=3, head_dim=4,
                                         initializer_range=0.3, bos_token_id=1, eos_token_id=99, pad_token_id=0)).eval()
    result = upop_fx.compress(model, _tokens(2, 6, seed=3), ratio=0.5, method="magnitude", retrain_steps=0)
    kv = [layer.self_attn.k_proj.out_features for layer in result.module.model.layers]
    assert len(set(kv)) > 1, kv
    path = export_decoder_onnx(result.module, tmp_path / "step.onnx", parity_tokens=32)
    prompt = torch.tensor([[1, 17, 42, 5, 63], [1, 8, 8, 91, 30]])
    with torch.no_grad():
        want = result.module.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                      min_new_tokens=32, do_sample=False)
    assert torch.equal(ort_greedy(path, prompt, 32), want)
    import onnxruntime as ort

    inputs = {i.name: i.shape for i in ort.InferenceSession(str(path)).get_inputs()}
    assert [inputs[f"past.{i}.key"][1] for i in range(3)] == [k // 4 for k in kv]  # KV heads per layer
