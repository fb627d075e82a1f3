"""compress() on every zoo model: exact at ratio 0, the requested cost removed at 0.5, equal to the zeroed
reference at another batch size and sequence length, lint-clean."""

from __future__ import annotations

import json

import pytest
import torch

import upop_fx
from upop_fx.capture.program import cache_off
from upop_fx.compare import relative_error
from upop_fx.ir.entries import build_entries
from upop_fx.module.rebuild import RTOL
from upop_fx.report import count_params

from . import models
from .models import ZOO


def _call(module, inputs):
    with torch.no_grad():
        return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


@pytest.fixture(scope="module", params=sorted(ZOO))
def half(request):
    return models.half(request.param)


def test_half_removes_requested_cost(half):
    zoo, result = half
    _, entries = build_entries(result.analysis, "upop", "params")
    total = sum(e.cost for e in entries)
    largest = max(e.cost for e in entries)
    removed = result.report.prunable_cost_removed * total
    assert 0.5 * total <= removed < 0.5 * total + largest + 1e-9
    assert result.report.params_after < result.report.params_before
    assert result.report.flops_after < result.report.flops_before
    result.model.graph.lint()


def test_half_equals_zeroed_reference_at_other_shapes(half):
    zoo, result = half
    reference = result.reference()
    for inputs in (zoo.example_inputs, zoo.other_inputs):
        err = relative_error(_call(result.model, inputs), _call(reference, inputs))
        assert err <= 1e-4, f"{zoo.name}: relative error {err:.2e}"


def test_half_is_smaller_where_it_counts(half):
    zoo, result = half
    kept = {row.group: row.kept for row in result.report.groups}
    assert any(kept[g.id] < g.width for g in result.analysis.prunable)
    assert all(kept[g.id] >= 1 for g in result.analysis.prunable)


def test_the_captured_graph_reproduces_the_model_at_other_shapes(half):
    """What every cut starts from: the graph compress captured (``result.dense``, its weights untouched by a
    one-shot method) equals the caller's model at the example shapes and at others."""
    zoo, result = half
    for inputs in (zoo.example_inputs, zoo.other_inputs):
        err = relative_error(_call(result.dense, inputs), _call(zoo.model, inputs))
        assert err <= 1e-5, f"{zoo.name}: relative error {err:.2e}"


#: ratio 0 end to end, on one model per family (an encoder, a decoder with a KV cache, a two-tower multimodal
#: model, a vision model with convolutions, experts, latent attention); every zoo model's capture is checked above
RATIO_ZERO = ["bert", "llama", "blip_vqa", "segformer", "mixtral", "deepseek_v3"]


@pytest.mark.parametrize("name", RATIO_ZERO)
def test_ratio_zero_reproduces_outputs(name):
    zoo = ZOO[name]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.0, method="magnitude", retrain_steps=0)
    assert result.report.params_after == result.report.params_before
    for inputs in (zoo.example_inputs, zoo.other_inputs):
        err = relative_error(_call(result.model, inputs), _call(zoo.model, inputs))
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
    result.model.graph.lint()
    assert result.module is not None and type(result.module) is type(zoo.model), result.report.module_reason


#: zoo models whose own class cannot express every cut the graph can, and the words of ``report.class_limits`` that
#: say what the default cut does instead; every zoo model gets ``result.module``
CLASS_LIMITS = {
    "llama": "whole heads only",  # one cos/sin table for all layers, one head_dim for q, k and v
    "mixtral": "whole heads only",
    "gptj": "whole heads only",
    "llava": "whole heads only",
    "deepseek_v3": "whole heads only",  # one rotary table for all layers: latent attention loses whole heads
    "blip_vqa": "left whole",  # the vision attention reshapes to embed_dim // num_heads of its input width
    "blip_caption": "left whole",
    "torch_encoder": "left whole",  # nn.MultiheadAttention: head size = embed_dim // num_heads
    "torch_transformer": "left whole",
    "timm_vit": "left whole",  # reshapes the heads' output to its input width
}


def test_half_module_is_the_callers_class_and_equals_the_graph(half):
    zoo, result = half
    assert result.report.module_reason is None
    if zoo.name in CLASS_LIMITS:
        assert any(CLASS_LIMITS[zoo.name] in line for line in result.report.class_limits), result.report.class_limits
    else:
        assert result.report.class_limits == []
    module = result.module
    assert type(module) is type(zoo.model) and module is not zoo.model
    assert count_params(module) < count_params(zoo.model)
    with cache_off(module):
        for inputs in (zoo.example_inputs, zoo.other_inputs):
            err = relative_error(_call(module, inputs), _call(result.model, inputs))
            assert err <= RTOL, f"{zoo.name}: module vs graph relative error {err:.2e}"


@pytest.mark.parametrize("name, words", [
    ("llama", "rotary pairs per layer"),  # the graph slices the shared cos/sin table per layer
    ("timm_vit", "default scale"),  # the graph pins SDPA's scale at the original head size
    ("mpnet", "scales by 2.82843 = sqrt(8)"),  # scores divided by sqrt(attention_head_size) in the forward
])  # fmt: skip
def test_the_graph_only_cut_is_wider_and_says_why_the_class_cannot_follow(name, words):
    zoo = ZOO[name]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.5, method="magnitude", retrain_steps=0,
                              own_class=False)
    assert result.module is None and words in result.report.module_reason
    assert result.report.class_limits == []
    assert any(row.kept % row.head_dim for row in result.report.groups if row.heads)  # head dims went


def test_half_module_survives_save_pretrained_and_from_pretrained(half, tmp_path):
    zoo, result = half
    if result.module is None or not hasattr(result.module, "config"):
        pytest.skip(f"{zoo.name}: no Hugging Face module to save ({result.report.module_reason or 'not a HF model'})")
    upop_fx.save_pretrained(result.module, tmp_path / "m")
    record = json.loads((tmp_path / "m" / "upop_fx.json").read_text())
    assert record["edits"] and record["class"].endswith(type(zoo.model).__qualname__)
    again = upop_fx.from_pretrained(tmp_path / "m")  # a fresh process: tests/test_module_back.py
    assert type(again) is type(zoo.model)
    with cache_off(result.module), cache_off(again):
        assert relative_error(_call(again, zoo.other_inputs), _call(result.module, zoo.other_inputs)) <= 1e-6


def test_a_squared_relu_mlp_is_pruned_exactly():
    """Squared ReLU (Primer, some decoders: ``aten.square``) keeps a removed neuron at exactly zero: its MLP is a
    prunable group, and the cut equals the zeroed reference."""

    class SquaredReLU(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.square(torch.relu(self.up(x))))

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    result = upop_fx.compress(SquaredReLU().eval(), x, ratio=0.5, method="magnitude", retrain_steps=0)
    assert [g.kind for g in result.report.groups] == ["mlp"] and result.report.groups[0].kept == 32
    with torch.no_grad():
        other = torch.randn(3, 7, 16)
        torch.testing.assert_close(result.model(other), result.reference()(other), rtol=1e-5, atol=1e-6)


def test_windowed_attention_with_pooled_queries_is_pruned_exactly_in_its_class():
    """Hiera's mask-unit attention: q, k and v laid out ``(B, H, windows, T, d)`` (an axis between the heads and
    the tokens), queries pooled by ``max`` over a stride window, a single-head first stage whose head axis carries
    no labels. Every stage's heads and head dims are pruned, exactly, and the model's class comes back."""
    from transformers import HieraConfig, HieraModel

    torch.manual_seed(0)
    config = HieraConfig(embed_dim=16, image_size=[128, 128], patch_size=[7, 7], patch_stride=[4, 4],
                         patch_padding=[3, 3], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2], query_stride=[2, 2],
                         masked_unit_size=[8, 8], mlp_ratio=2.0)
    model = HieraModel(config).eval()
    result = upop_fx.compress(model, torch.randn(2, 3, 128, 128), ratio=0.4, method="magnitude", retrain_steps=0)
    attention = [(row.layer, row.kind) for row in result.report.groups if row.kind in ("qk", "v")]
    assert attention == [(stage, kind) for stage in range(4) for kind in ("qk", "v")]
    assert all(row.kept < row.total for row in result.report.groups)
    assert result.report.class_limits == [] and type(result.module) is HieraModel
    other = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        cut = result.model(other).last_hidden_state
        torch.testing.assert_close(cut, result.reference()(other).last_hidden_state, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.module(other).last_hidden_state, cut, rtol=1e-4, atol=1e-5)


def test_eager_multi_query_attention_broadcast_by_the_matmul_is_pruned_exactly():
    """One key/value head of size-1 head axis, broadcast over the query heads by ``q @ kᵀ`` and ``probs @ v``
    (no ``expand``): copied per query head by the matmuls, so head dims go from every query head and the one KV
    head at once, and whole query heads go alone (the KV head kept whole), exactly."""

    class MultiQuery(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(16, n) for n in (16, 4, 4))
            self.o = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, _ = x.shape
            q = self.q(x).view(B, T, 4, -1).transpose(1, 2)
            k, v = self.k(x).unsqueeze(1), self.v(x).unsqueeze(1)  # (B, 1, T, 4)
            probs = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1)
            return x + self.o((probs @ v).transpose(1, 2).reshape(B, T, -1))

    torch.manual_seed(0)
    model = MultiQuery().eval()
    result = upop_fx.compress(model, torch.randn(2, 5, 16), ratio=0.5, method="magnitude", retrain_steps=0)
    kinds = {row.kind: row for row in result.report.groups}
    assert kinds["qk"].heads == kinds["v"].heads == 4 and kinds["qk"].kept < kinds["qk"].total
    assert result.module.k.out_features == kinds["qk"].kept // 4  # dim j of every head: k's row j went with them
    other = torch.randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), result.reference()(other), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.module(other), result.model(other), rtol=1e-5, atol=1e-6)
    heads = upop_fx.compress(model, torch.randn(2, 5, 16), ratio=0.3, method="magnitude", retrain_steps=0,
                             granularity="heads", own_class=False)
    kinds = {row.kind: row for row in heads.report.groups}
    assert kinds["qk"].kept_heads < 4 and kinds["qk"].kept == 4 * kinds["qk"].kept_heads
    assert dict(heads.model.named_parameters())["k.weight"].shape == (4, 16)  # the KV head: whole
    with torch.no_grad():
        torch.testing.assert_close(heads.model(other), heads.reference()(other), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["cohere", "gemma3"])
def test_per_head_q_k_norms_cut_whole_heads_with_their_own_weights(family):
    """q/k normalised per head with several KV heads: Cohere's LayerNorm carries a ``[heads, head_dim]`` weight
    (cut with its heads), Gemma 3's RMSNorm one ``head_dim`` weight shared by every head (never cut). Whole heads
    go, exactly, and the class comes back."""
    import transformers

    config, model_cls, extra = {
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM, {"use_qk_norm": True}),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, {"head_dim": 16, "sliding_window": 4}),
    }[family]  # fmt: skip
    torch.manual_seed(0)
    model = model_cls(config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             eos_token_id=2, **extra)).eval()
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    result = upop_fx.compress(model, {"input_ids": ids}, ratio=0.5, method="magnitude", retrain_steps=0)
    qk = [row for row in result.report.groups if row.kind == "qk"]
    assert qk and all(row.kept_heads < row.heads and row.kept % row.head_dim == 0 for row in qk)
    assert len(result.report.whole_heads) == len(qk) and result.report.class_limits == []
    norm = result.module.model.layers[0].self_attn.q_norm.weight
    kept_q_heads = qk[0].kept_heads * 2  # a KV head with its two query heads
    assert norm.shape[0] == (kept_q_heads if family == "cohere" else 16)
    other = torch.randint(3, 100, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cut = result.model(input_ids=other).logits
        torch.testing.assert_close(cut, result.reference()(input_ids=other).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.module(input_ids=other).logits, cut, rtol=1e-4, atol=1e-5)
