"""``result.module``: the caller's own class back — generation with the KV cache, save_pretrained/from_pretrained
(in a fresh process too), the Hugging Face Trainer, torch.compile, torch.save, retraining in train mode."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import upop_fx
from upop_fx.compare import relative_error
from upop_fx.errors import InputError
from upop_fx.module.rebuild import rebuild
from upop_fx.passes import FindGroups, Surgery
from upop_fx.passes.surgery import removed_labels

from .fresh_process import plain_generate
from .models import ZOO, _tokens


def with_dead_channels(model: torch.nn.Module, result: upop_fx.Result) -> torch.nn.Module:
    """``model`` (the original, of the same parameter names) with the channels ``result`` removed zeroed where
    they are produced and where they are consumed (a query head's copy of a shared key/value head has no
    producer of its own): the function ``result.module`` computes, in the original's shapes."""
    removed = removed_labels(result.analysis, result.keep)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for u in result.analysis.uses:
            drop = u.where[np.nonzero(removed[u.labels])[0]]
            if len(drop) and u.name in params:
                params[u.name].index_fill_(u.axis, torch.as_tensor(drop), 0)
    return model


def _greedy(model: torch.nn.Module, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                     initializer_range=0.3, bos_token_id=1, eos_token_id=99, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, bos_token_id=1,
                      eos_token_id=99, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        initializer_range=0.3, bos_token_id=1, eos_token_id=99, pad_token_id=0)
    return MixtralForCausalLM(cfg).eval()


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, initializer_range=0.3, bos_token_id=1, eos_token_id=99,
                      pad_token_id=0)
    return Qwen3ForCausalLM(cfg).eval()


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], initializer_range=0.3, bos_token_id=1,
                           eos_token_id=99, pad_token_id=0, tie_word_embeddings=False)  # (tied: one token forever)
    return Gemma3ForCausalLM(cfg).eval()


def _bigcode():
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(0)
    cfg = GPTBigCodeConfig(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                           multi_query=True, initializer_range=0.3, bos_token_id=1, eos_token_id=99, pad_token_id=0)
    return GPTBigCodeForCausalLM(cfg).eval()


def _deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                           qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                           num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
                           n_group=1, topk_group=1, initializer_range=0.3, bos_token_id=1, eos_token_id=99,
                           pad_token_id=0, tie_word_embeddings=False)
    return DeepseekV3ForCausalLM(cfg).eval()


def _gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    cfg = GPTJConfig(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=64,
                     initializer_range=0.3, bos_token_id=1, eos_token_id=99, pad_token_id=0)
    return GPTJForCausalLM(cfg).eval()


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3, bos_token_id=1,
                      eos_token_id=99, pad_token_id=0)
    return BloomForCausalLM(cfg).eval()


def with_weights_of(model: torch.nn.Module, graph: torch.fx.GraphModule) -> torch.nn.Module:
    """``model`` with the tensors of the captured ``graph`` (of the same names): the stacked experts' neurons in
    the order the analysis sorted them into."""
    tensors = dict(graph.named_parameters()) | dict(graph.named_buffers())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[name])
    return model


_HALVED: dict[object, tuple[torch.nn.Module, upop_fx.Result]] = {}


def _halved(make) -> tuple[torch.nn.Module, upop_fx.Result]:  # noqa: ANN001
    """``make()`` and its default magnitude cut at ratio 0.5 on the 2 x 6 prompt, compressed once for every test
    here that only reads it."""
    if make not in _HALVED:
        model = make()
        _HALVED[make] = model, upop_fx.compress(model, _tokens(2, 6, seed=3), ratio=0.5, method="magnitude",
                                                retrain_steps=0)
    return _HALVED[make]


@pytest.mark.parametrize("make", [_gpt2, _llama, _mixtral, _qwen3, _gemma3, _bigcode, _deepseek_v3, _gptj, _bloom],
                         ids=["gpt2", "llama", "mixtral", "qwen3", "gemma3", "bigcode", "deepseek_v3", "gptj", "bloom"])
def test_decoder_generates_as_the_original_with_dead_channels(make, tmp_path):
    """With the defaults: Llama and Mixtral (one rotary table for all layers) lose whole KV groups, GPT-2 head dims,
    the multi-query StarCoder-style decoder head dims of its one key/value head; Qwen3 and Gemma 3 (q/k normalised
    per head) whole heads at most (Gemma 3: query heads over its one key/value head) and MLP neurons; DeepSeek-V3 (latent attention) loses whole heads in
    every layer (its latent ranks keep their values) and neurons of its dense MLP, its shared expert and its routed
    experts; GPT-J (a rotary table held as a buffer) whole heads; BLOOM (ALiBi fixes its heads) head dims."""
    model, result = _halved(make)
    assert model.config.use_cache  # compress accepted the model with its cache on
    prompt = _tokens(2, 6, seed=3)
    assert result.module is not None, result.report.module_reason
    assert any(row.kept < row.total for row in result.report.groups)
    assert type(result.module) is type(model) and model.config.use_cache
    original = with_dead_channels(with_weights_of(make(), result.dense), result)
    want = _greedy(original, **prompt)
    assert len(set(want[0, 6:].tolist())) > 1  # a sequence that can tell two models apart
    assert torch.equal(_greedy(result.module, **prompt), want)
    upop_fx.save_pretrained(result.module, tmp_path / "small")
    assert torch.equal(_greedy(upop_fx.from_pretrained(tmp_path / "small"), **prompt), want)


def test_multi_query_decoder_loses_query_heads_in_its_class_and_generates_as_the_original(tmp_path):
    """A StarCoder-style decoder with one key/value head fused into ``c_attn``, cut by whole heads: each layer loses
    query heads (its one key/value head, copied per query head, keeps every row), in its own class, which generates
    as the original with the same channels dead, and again after a save and a fresh load."""
    model = _bigcode()
    prompt = _tokens(2, 6, seed=3)
    result = upop_fx.compress(model, _tokens(2, 6, seed=3), ratio=0.25, method="magnitude", retrain_steps=0,
                              granularity="heads")
    assert result.module is not None and result.report.class_limits == [], result.report.module_reason
    rows = [row for row in result.report.groups if row.kind == "qk"]
    assert rows and all(row.kept_heads < row.heads for row in rows)
    for layer, row in zip(result.module.transformer.h, rows):
        kv = 2 * 8  # the one key and value head: whole
        assert layer.attn.c_attn.out_features == row.kept_heads * 8 + kv
        assert layer.attn.c_proj.in_features == row.kept_heads * 8
    original = with_dead_channels(with_weights_of(_bigcode(), result.dense), result)
    want = _greedy(original, **prompt)
    assert len(set(want[:, 6:].reshape(-1).tolist())) > 2  # tokens that can tell two models apart
    assert torch.equal(_greedy(result.module, **prompt), want)
    upop_fx.save_pretrained(result.module, tmp_path / "small")
    assert torch.equal(_greedy(upop_fx.from_pretrained(tmp_path / "small"), **prompt), want)


def test_latent_attention_loses_whole_heads_and_keeps_its_latent_ranks():
    """DeepSeek-V3's key is assembled in an empty buffer from a per-head part and a rotary part every head shares
    (one key head ``expand``-ed over the heads): captured as their concatenation, with the shared part copied per
    head, a head's q, k and v dims are its own, and whole heads go (its class computes one rotary table for every
    layer, so head dims do not). The rotary key's projection keeps every row; the latent ranks keep theirs."""
    prompt = _tokens(2, 6, seed=3)
    _, result = _halved(_deepseek_v3)
    analysis = result.analysis
    assert len(analysis.copies) == 2 and all(c.copies.shape == (4, 4) for c in analysis.copies)
    rows = {(row.layer, row.kind): row for row in result.report.groups if row.kind in ("qk", "v")}
    assert len(rows) == 4 and all(row.kept_heads < row.heads for row in rows.values())
    assert result.module is not None, result.report.module_reason
    for i, layer in enumerate(result.module.model.layers):
        attn, qk, v = layer.self_attn, rows[(i, "qk")], rows[(i, "v")]
        assert qk.kept_heads == v.kept_heads and v.kept == v.kept_heads * 8
        assert attn.q_b_proj.out_features == qk.kept_heads * 12 and attn.o_proj.in_features == v.kept
        assert (attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim) == (8, 4, 8)
        assert (attn.kv_lora_rank, attn.q_lora_rank) == (16, 16)
        assert attn.kv_a_proj_with_mqa.out_features == 16 + 4  # the latent and the shared rotary key: whole
    torch.testing.assert_close(result.module(**prompt).logits, result.model(**prompt).logits, rtol=1e-4, atol=1e-5)


def test_llama_graph_only_cut_says_which_option_gives_the_module():
    result = upop_fx.compress(_llama(), _tokens(2, 6, seed=3), ratio=0.5, method="magnitude", retrain_steps=0,
                              own_class=False)
    assert result.module is None
    assert "rotary" in result.report.module_reason and "own_class=True" in result.report.module_reason
    assert result.model is not None  # the graph is still returned


def test_llama_by_default_keeps_whole_heads_and_says_why():
    """Its class computes one cos/sin table for every layer and sizes q, k and v by one ``head_dim``: the default
    cut removes whole KV groups (a key/value head with its query heads), every kept head at full size."""
    _, result = _halved(_llama)
    assert result.module is not None and result.report.module_reason is None
    rows = [row for row in result.report.groups if row.heads]
    assert rows and all(row.kept == row.kept_heads * row.head_dim for row in rows)
    assert any(row.kept_heads < row.heads for row in rows)
    limits = result.report.class_limits
    assert len(limits) == len(rows) and all("whole heads only" in line for line in limits)
    assert any("rotary" in line or "head_dim" in line or "fails to run" in line for line in limits)
    layer = result.module.model.layers[0].self_attn
    assert layer.head_dim == 8 and layer.q_proj.out_features % 8 == 0


def test_llama_with_shared_rotary_keeps_the_same_pairs_in_every_layer_and_slices_the_frequencies(tmp_path):
    """``shared_rotary=True``: the cut keeps the same rotary pairs (and as many v dims) in every layer, one
    structure over all of them, and the module's ``inv_freq`` is sliced to those pairs — saved and loaded with
    it, and equal to the graph."""
    prompt = _tokens(2, 6, seed=3)
    result = upop_fx.compress(_llama(), prompt, ratio=0.5, method="magnitude", retrain_steps=0, shared_rotary=True)
    assert result.module is not None and result.report.module_reason is None
    rows = [row for row in result.report.groups if row.heads]
    assert rows and len({row.kept // row.kept_heads for row in rows}) == 1  # one head size in every layer
    assert all(row.kept // row.kept_heads < row.head_dim for row in rows)
    limits = result.report.class_limits
    assert len(limits) == len(rows) and all("head dims shared by every rotary layer" in line for line in limits)
    kept_dim = rows[0].kept // rows[0].kept_heads
    rotary = result.module.model.rotary_emb
    assert result.module.model.layers[0].self_attn.head_dim == kept_dim
    assert rotary.inv_freq.shape == rotary.original_inv_freq.shape == (kept_dim // 2,)
    dense = _llama().model.rotary_emb.inv_freq
    assert set(rotary.inv_freq.tolist()) <= set(dense.tolist())  # a subset of the model's own frequencies
    upop_fx.save_pretrained(result.module, tmp_path / "m")
    again = upop_fx.from_pretrained(tmp_path / "m")
    assert torch.equal(again.model.rotary_emb.inv_freq, rotary.inv_freq)
    assert torch.equal(_greedy(again, **prompt), _greedy(result.module, **prompt))


def test_shared_rotary_with_uniform_widths_keeps_whole_heads_for_a_stock_config():
    """``allocate="uniform"`` is for a checkpoint plain transformers loads: its config states head counts, not
    sliced rotary frequencies, so even with ``shared_rotary`` the rotary layers lose whole KV groups."""
    result = upop_fx.compress(_llama(), _tokens(2, 6, seed=3), ratio=0.5, method="magnitude", retrain_steps=0,
                              allocate="uniform", shared_rotary=True)
    rows = [row for row in result.report.groups if row.heads]
    assert rows and all(row.kept == row.kept_heads * row.head_dim for row in rows)
    assert all("whole heads only" in line for line in result.report.class_limits)
    assert result.module.model.layers[0].self_attn.head_dim == 8


def test_an_attribute_that_only_held_a_cut_size_keeps_its_value():
    """9 query heads over 3 KV heads: ``num_key_value_groups`` (3) equals the KV head count (3) that the cut
    changes per layer; it must stay 3 (the export path repeats each KV head by it) while whole heads go."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=100, hidden_size=36, intermediate_size=48, num_hidden_layers=3, num_attention_heads=9,
            num_key_value_heads=3, head_dim=4, initializer_range=0.3, bos_token_id=1, eos_token_id=99, pad_token_id=0,
        )).eval()

    prompt = _tokens(2, 6, seed=3)
    result = upop_fx.compress(make(), prompt, ratio=0.5, method="magnitude", retrain_steps=0)
    assert result.module is not None, result.report.module_reason
    layers = result.module.model.layers
    assert {layer.self_attn.num_key_value_groups for layer in layers} == {3}
    assert len({layer.self_attn.k_proj.out_features for layer in layers}) > 1  # the layers keep different KV heads
    original = with_dead_channels(with_weights_of(make(), result.dense), result)
    assert torch.equal(_greedy(result.module, **prompt), _greedy(original, **prompt))


def test_llava_generates_as_the_original_with_dead_channels():
    zoo = ZOO["llava"]()
    zoo.model.config.text_config.use_cache = True
    result = upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.5, method="magnitude", retrain_steps=0,
                              granularity="heads")
    assert result.module is not None, result.report.module_reason
    original = with_dead_channels(ZOO["llava"]().model, result)
    inputs = dict(zoo.example_inputs)
    want = _greedy(original, **inputs)
    assert torch.equal(_greedy(result.module, **inputs), want)


def _blip(cls: type) -> torch.nn.Module:
    from transformers import BlipConfig

    torch.manual_seed(0)
    text = dict(vocab_size=100, hidden_size=32, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, sep_token_id=2,
                eos_token_id=99, initializer_range=0.3)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, initializer_range=0.3)
    return cls(BlipConfig(text_config=text, vision_config=vision)).eval()


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_blip_generates_as_the_original_with_dead_channels(task):
    """BLIP's vision attention reshapes to ``embed_dim // num_heads`` of its input, and its text attention divides
    by ``sqrt(attention_head_size)``: by default the vision attention stays whole (the report says so), the text
    attention loses head dims with its scale folded into q and k, and the captioner / VQA model comes back and
    generates as the original with the same channels zeroed."""
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

    cls = BlipForConditionalGeneration if task == "caption" else BlipForQuestionAnswering
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(3, 98, (2, 6), generator=g)
    ids[:, 0] = 1
    example = {"pixel_values": pixels, "input_ids": ids}
    if task == "vqa":  # without labels its forward never runs the text towers
        example["labels"] = ids
    if task == "vqa":
        plain = upop_fx.compress(_blip(cls), example, ratio=0.5, method="magnitude", retrain_steps=0, own_class=False)
        assert plain.module is None and "scales by" in plain.report.module_reason
    result = upop_fx.compress(_blip(cls), example, ratio=0.5, method="magnitude", retrain_steps=0)
    assert result.module is not None, result.report.module_reason
    assert any(line.startswith("vision_model") and "left whole" in line for line in result.report.class_limits)
    kinds = {(row.tower.split(".")[0], row.kind) for row in result.report.groups if row.kept < row.total}
    assert ("vision_model", "mlp") in kinds and any(t.startswith("text") and k == "qk" for t, k in kinds)
    text = [row for row in result.report.groups if row.tower.startswith("text") and row.kind == "qk"]
    assert any(row.kept % row.head_dim for row in text)  # head dims went: the scale is folded into q and k
    original = with_dead_channels(_blip(cls), result)
    prompt = {"pixel_values": pixels, "input_ids": ids[:, :3] if task == "caption" else ids}  # (a caption drops its last)
    want = _greedy(original, **prompt)
    assert len(set(want[0].tolist())) > 2
    assert torch.equal(_greedy(result.module, **prompt), want)


class HardCodedAttention(torch.nn.Module):
    """Sizes written into the forward as numbers: nothing the cut could patch."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out, self.scaling = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32), 8**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p.view(b, t, 4, 8).transpose(1, 2) for p in self.qkv(x).split(32, dim=-1))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.out(o.transpose(1, 2).reshape(b, t, 32))


def test_a_size_no_attribute_holds_is_refused_with_the_node():
    torch.manual_seed(0)
    result = upop_fx.compress(HardCodedAttention().eval(), torch.randn(2, 5, 32), ratio=0.5, method="magnitude",
                              retrain_steps=0, own_class=False)  # (by default: refused, as below)
    assert result.module is None
    assert "fails to run" in result.report.module_reason
    assert "no integer attribute holds the size 8" in result.report.module_reason


def test_one_attribute_for_two_cut_sizes_names_the_granularity_that_fits():
    zoo = ZOO["bert"]()
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    analysis = FindGroups()(cap.gm).value
    # q/k keep 6 dims of every head, v keeps 4: one attention_head_size cannot hold both
    keep = {g.id: [c for c in range(g.width) if c % g.head_dim < (6 if g.kind == "qk" else 4)]
            for g in analysis.prunable if g.kind in ("qk", "v")}
    small = Surgery(keep)(cap.gm).gm
    back = rebuild(zoo.model, cap.gm, small, analysis, removed_labels(analysis, keep), granularity="qk_v")
    assert back.module is None
    assert "the size 8 becomes 4 and 6 in different places" in back.reason
    assert "attention_head_size" in back.reason and "granularity='upop'" in back.reason


@pytest.fixture(scope="module")
def bert_small(tmp_path_factory):
    zoo = ZOO["bert_cls"]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.5, method="magnitude", retrain_steps=0)
    path = tmp_path_factory.mktemp("saved") / "bert"
    upop_fx.save_pretrained(result.module, path)
    return zoo, result, path


_RELOAD = """
import sys, torch, upop_fx
model = upop_fx.from_pretrained(sys.argv[1])
with torch.no_grad():
    torch.save(model(**torch.load(sys.argv[2])), sys.argv[3])
"""


def test_save_pretrained_loads_in_a_fresh_process(bert_small, tmp_path):
    zoo, result, path = bert_small
    torch.save(zoo.other_inputs, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _RELOAD, str(path), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    with torch.no_grad():  # (the module itself may have been trained by a test since it was saved)
        want = upop_fx.from_pretrained(path)(**zoo.other_inputs)
    assert relative_error(torch.load(tmp_path / "out.pt", weights_only=False), want) <= 1e-6


def test_from_pretrained_refuses_what_is_not_a_save(bert_small, tmp_path):
    _, _, path = bert_small
    with pytest.raises(InputError, match="not a directory"):
        upop_fx.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="upop_fx.json, config.json, upop_fx.safetensors missing"):
        upop_fx.from_pretrained(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "upop_fx.safetensors"):
        (bad / f).write_bytes((path / f).read_bytes())
    record = json.loads((path / "upop_fx.json").read_text())
    layer = next(k for k in record["edits"] if k.endswith("attention.self.query"))
    record["edits"][layer]["tensors"]["weight"][0] += 1
    (bad / "upop_fx.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="does not match the weights"):
        upop_fx.from_pretrained(bad)
    (bad / "upop_fx.json").write_text("{}")
    with pytest.raises(InputError, match="not a upop_fx edit record"):
        upop_fx.from_pretrained(bad)
    with pytest.raises(InputError, match="needs a Hugging Face model"):
        upop_fx.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear")


def test_plain_transformers_never_loads_a_non_uniform_save_wrong(bert_small):
    """Without upop_fx, plain from_pretrained finds no model.safetensors and stops (it never fills the config's
    sizes with fresh weights); with trust_remote_code the directory's loader rebuilds it through upop_fx, exactly;
    the README says how."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    zoo, result, path = bert_small
    assert json.loads((path / "upop_fx.json").read_text())["layout"] == "upop_fx"
    for loader in (BertForSequenceClassification, AutoModelForSequenceClassification):
        with pytest.raises(OSError, match="no file named model.safetensors"):
            loader.from_pretrained(path)
    remote = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
    ours = upop_fx.from_pretrained(path)
    assert type(remote) is type(zoo.model) and "auto_map" not in vars(remote.config)
    with torch.no_grad():
        assert torch.equal(remote(**zoo.other_inputs).logits, ours(**zoo.other_inputs).logits)
    card = (path / "README.md").read_text()
    assert "upop_fx.from_pretrained(" in card and "trust_remote_code=True" in card and "| module | changed |" in card


def _uniform_mlp_half(scores, entries, structures, fraction):
    """An allocation that removes the lower half of every layer's MLP and nothing else (the pooler stays):
    widths a config can state."""
    pruned = np.zeros(len(entries), dtype=bool)
    for s in range(len(structures)):
        if ".layer[" not in structures[s].name:
            continue
        mlp = sorted((i for i, e in enumerate(entries) if e.structure == s and e.kind == "mlp"), key=lambda i: scores[i])
        pruned[mlp[: len(mlp) // 2]] = True
    return pruned


def test_a_uniform_cut_is_saved_as_a_stock_checkpoint(tmp_path):
    """Where every layer keeps the same widths and the config has a field for each, the save is a plain
    checkpoint: config.json states the new sizes and stock transformers loads it exactly."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    zoo = ZOO["bert_cls"]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.3, method="magnitude", retrain_steps=0,
                              allocate=_uniform_mlp_half)
    path = upop_fx.save_pretrained(result.module, tmp_path / "stock")
    assert json.loads((path / "upop_fx.json").read_text())["layout"] == "stock"
    assert (path / "model.safetensors").is_file() and not (path / "upop_fx.safetensors").exists()
    assert AutoConfig.from_pretrained(path).intermediate_size == zoo.model.config.intermediate_size // 2
    with torch.no_grad():
        want = result.module(**zoo.other_inputs).logits
        for loaded in (AutoModelForSequenceClassification.from_pretrained(path), upop_fx.from_pretrained(path)):
            assert torch.equal(loaded(**zoo.other_inputs).logits, want)


def test_a_uniform_decoder_cut_is_a_stock_checkpoint_that_plain_transformers_generates_with(tmp_path):
    """Llama (grouped-query attention, one rotary table): every layer keeps one of its two KV groups and half its
    MLP, so the config states the new head counts and width; a fresh process without upop_fx loads it with
    ``AutoModelForCausalLM`` and generates the module's tokens."""
    prompt = _tokens(2, 6, seed=3)
    result = upop_fx.compress(_llama(), prompt, ratio=0.5, method="magnitude", retrain_steps=0, allocate="uniform")
    path = upop_fx.save_pretrained(result.module, tmp_path / "stock")
    assert json.loads((path / "upop_fx.json").read_text())["layout"] == "stock"
    config = json.loads((path / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 32)
    want = _greedy(result.module, **prompt)
    assert plain_generate(path, input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"]) == want.tolist()


def test_module_trains_with_the_hugging_face_trainer(bert_small, tmp_path):
    from transformers import Trainer, TrainingArguments

    zoo, result, _ = bert_small
    module = result.module
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    rows = [{"input_ids": zoo.example_inputs["input_ids"][i], "attention_mask": zoo.example_inputs["attention_mask"][i],
             "labels": torch.tensor(i % 2)} for i in range(2)] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", learning_rate=1e-2)
    Trainer(model=module, args=args, train_dataset=rows).train()
    changed = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert any("attention.self.query" in n for n in changed)


def test_module_compiles_and_pickles(bert_small, tmp_path):
    zoo, result, _ = bert_small
    module = result.module.eval()
    with torch.no_grad():
        want = module(**zoo.other_inputs).logits
        compiled = torch.compile(module, backend="aot_eager", dynamic=False)
        assert relative_error(compiled(**zoo.other_inputs).logits, want) <= 1e-6
    torch.save(module, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(**zoo.other_inputs).logits, want)


def test_retrain_runs_on_the_module_in_train_mode():
    zoo = ZOO["bert_cls"]()
    modes: list[bool] = []
    hook = zoo.model.register_forward_hook(lambda m, i, o: modes.append(m.training))  # copies carry it
    batches = [dict(zoo.example_inputs, labels=torch.tensor([0, 1]))] * 4
    original = {n: p.detach().clone() for n, p in zoo.model.named_parameters()}
    result = upop_fx.compress(zoo.model, batches[0], ratio=0.5, method="magnitude", data=batches, retrain_steps=3,
                              lr=1e-2)
    hook.remove()
    assert modes.count(True) >= 3  # the three retrain steps ran the module in train mode (dropout on)
    assert result.module is not None and not result.module.training
    assert len(result.losses["retrain"]) >= 1
    # the graph received the module's retrained weights, and the caller's model is untouched
    other = dict(zoo.other_inputs, labels=torch.tensor([0, 1, 0]))
    with torch.no_grad():
        assert relative_error(result.module(**other), result.model(**other)) <= 1e-5
        assert relative_error(result.module(**other), result.reference()(**other)) > 1e-3  # it did train
    assert all(torch.equal(p, original[n]) for n, p in zoo.model.named_parameters())


class _FixedAttention(torch.nn.Module):
    """An attention whose forward writes its sizes as numbers (nothing the cut could patch), and no MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p.reshape(b, t, 2, 8).transpose(1, 2) for p in self.qkv(x).split(16, dim=-1))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=8**-0.5)
        return x + self.out(o.transpose(1, 2).reshape(b, t, 16))


def test_a_class_that_can_express_no_cut_is_refused_with_the_graph_only_option():
    from upop_fx.errors import NoPrunableGroupError

    model, x = _FixedAttention().eval(), torch.randn(2, 5, 16)
    with pytest.raises(NoPrunableGroupError, match="own class can express no cut.*own_class=False"):
        upop_fx.compress(model, x, ratio=0.3, method="magnitude", retrain_steps=0)
    result = upop_fx.compress(model, x, ratio=0.3, method="magnitude", retrain_steps=0, own_class=False)
    assert result.module is None and result.report.params_after < result.report.params_before


def test_a_layer_index_equal_to_a_head_count_is_not_taken_for_the_size(monkeypatch):
    """Layer 3 of a Llama with 3 KV heads holds ``layer_idx == 3``, the number the cut changes: patched as a size,
    the forward still verifies (the graph has no cache) but two layers would share one cache entry. The rebuild's
    check with the KV cache sees it and gives the index back, so ``generate`` gives the tokens of a greedy decode
    without a cache. No try costs a capture: the module is verified by running it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from upop_fx.module.rebuild import _cache_failure

    captures = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: captures.append(a) or real(*a, **k))

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=6, num_key_value_heads=3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # one weak KV head per layer, a different one in each: per-layer cuts
        for i, layer in enumerate(model.model.layers):
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[8 * (i % 3): 8 * (i % 3) + 8] *= 1e-3
    ids = torch.randint(0, 64, (2, 12))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = upop_fx.compress(model, example, 0.2, method="magnitude", retrain_steps=0)
    small = result.module
    assert small is not None and [layer.self_attn.layer_idx for layer in small.model.layers] == list(range(5))
    assert len(captures) == 1  # the model's own capture, and none in the rebuild
    assert any(layer.self_attn.k_proj.out_features < 24 for layer in small.model.layers)
    prompt = ids[:1, :5]
    want = prompt
    with torch.no_grad():
        for _ in range(6):
            want = torch.cat([want, small(input_ids=want, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(small.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), want)
    assert _cache_failure(small, example) is None
    small.model.layers[3].self_attn.layer_idx = 2  # what patching the index as a size did: two layers, one cache
    assert "KV cache gives other outputs" in _cache_failure(small, example)
