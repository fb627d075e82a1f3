"""upop_fx.drop_layers: whole layers of the stack removed, the class kept, verified, generating, reloadable."""

from __future__ import annotations

import json

import pytest
import torch

import upop_fx
from tests import models
from tests.fresh_process import plain_generate
from upop_fx.module.depth import block_influence, layer_stack

ZOO = ["llama", "qwen3", "gemma3", "mixtral", "deepseek_v3", "gpt2", "gptj", "bloom", "bigcode", "bert", "distilbert",
       "deberta_v2", "vit", "timm_vit", "torch_encoder"]
GENERATIVE = ["llama", "qwen3", "gemma3", "deepseek_v3", "gpt2", "bigcode"]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _skipped(model: torch.nn.Module, stack: str, dropped: list[int]) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks making the ``dropped`` layers of ``model`` pass their input on (the reference, written here)."""

    def skip(_m, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return h if isinstance(out, torch.Tensor) else (h, *out[1:])

    layers = model.get_submodule(stack)
    return [layers[i].register_forward_hook(skip, with_kwargs=True) for i in dropped]


@pytest.mark.parametrize("name", ZOO)
def test_a_dropped_layer_leaves_the_function_of_the_original_with_it_skipped(name):
    zoo = models.get(name)
    before = _state(zoo.model)
    depth = upop_fx.drop_layers(zoo.model, zoo.example_inputs, layers=[0])
    assert type(depth.module) is type(zoo.model) and depth.dropped == [0] and depth.error <= 1e-5
    stack = zoo.model.get_submodule(depth.stack)
    assert len(depth.module.get_submodule(depth.stack)) == len(stack) - 1
    # the caller's model is untouched: same weights, no hooks left, same depth
    assert all(torch.equal(v, before[k]) for k, v in zoo.model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in zoo.model.modules())
    handles = _skipped(zoo.model, depth.stack, [0])
    try:
        with torch.no_grad():
            want = zoo.call(zoo.other_inputs)
    finally:
        for h in handles:
            h.remove()
    args, kwargs = zoo.split(zoo.other_inputs)
    with torch.no_grad():
        got = depth.module(*args, **kwargs)
    assert upop_fx.compare.relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("name, stack", [("clip", "text_model.encoder.layers"), ("clip", "vision_model.encoder.layers"),
                                         ("llava", "model.language_model.layers"),
                                         ("blip_caption", "text_decoder.bert.encoder.layer")])
def test_a_tower_of_a_multimodal_model_is_named_and_cut_alone(name, stack):
    zoo = models.get(name)
    with pytest.raises(upop_fx.InputError, match="several stacks"):
        upop_fx.drop_layers(zoo.model, zoo.example_inputs, layers=[1])
    depth = upop_fx.drop_layers(zoo.model, zoo.example_inputs, layers=[1], stack=stack)
    assert depth.error <= 1e-5 and len(depth.module.get_submodule(stack)) == len(zoo.model.get_submodule(stack)) - 1


def test_a_tower_whose_depth_the_model_reads_is_refused():
    """LLaVA takes its image features from the vision tower's second-to-last layer: without a layer it would take
    another layer's, which the check sees."""
    zoo = models.get("llava")
    with pytest.raises(upop_fx.PostconditionError, match="does not use them as blocks"):
        upop_fx.drop_layers(zoo.model, zoo.example_inputs, layers=[1], stack="model.vision_tower.encoder.layers")


@pytest.mark.parametrize("name", GENERATIVE)
def test_the_shallower_decoder_generates_with_its_kv_cache_as_the_original_with_the_layer_skipped(name):
    zoo = models.get(name)
    depth = upop_fx.drop_layers(zoo.model, zoo.example_inputs, layers=[0])
    prompt = {k: zoo.example_inputs[k] for k in ("input_ids", "attention_mask")}
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    handles = _skipped(zoo.model, depth.stack, [0])
    try:
        with torch.no_grad():
            want = zoo.model.generate(**prompt, **kw)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        assert torch.equal(depth.module.generate(**prompt, **kw), want)


def _llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, bos_token_id=1,
                      eos_token_id=99, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(2, 99, (2, 10), generator=g)} for _ in range(n)]


def test_padding_does_not_count_in_the_influence():
    """Right padding with its attention mask: the causal model's real tokens are those of the unpadded batch, and
    the padded positions (whatever their hidden states) are left out, so the influence is the unpadded one's."""
    model = _llama()
    real = _batches()
    padded = _right_padded(real)
    want = block_influence(model, real)
    assert block_influence(model, padded) == pytest.approx(want, rel=1e-9)
    unmasked = [{"input_ids": b["input_ids"]} for b in padded]  # the same tokens counted: a different figure
    assert block_influence(model, unmasked) != pytest.approx(want, rel=1e-3)


def test_a_layer_that_adds_nothing_has_no_influence_and_goes_first():
    """Layer 2 writes nothing to the residual stream (its output projections are zero): its block influence is
    exactly 0, the others' above it, n=1 removes it, and the shallower model equals the original itself."""
    model = _llama()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    influence = block_influence(model, _batches())
    assert influence[2] == pytest.approx(0.0, abs=1e-12) and min(influence[:2] + influence[3:]) > 1e-4
    ids = _batches(1)[0]
    depth = upop_fx.drop_layers(model, ids, 1, data=_batches())
    assert depth.dropped == [2] and depth.influence == influence
    with torch.no_grad():
        torch.testing.assert_close(depth.module(**ids).logits, model(**ids).logits, rtol=1e-5, atol=1e-6)
    assert [layer.self_attn.layer_idx for layer in depth.module.model.layers] == [0, 1, 2]
    # nothing to bridge: the stream after layer 1 already is the one after layer 2
    assert [b.applied for b in depth.bridges] == [False]
    assert depth.describe() == ("1 of 4 layers of model.layers removed: [2]\n"
                                "  not bridged [2]: the fit did not lower the held-out error")


def test_the_shallower_model_is_a_stock_checkpoint_that_plain_transformers_generates_with(tmp_path):
    model = _llama()
    depth = upop_fx.drop_layers(model, _batches(1)[0], 2, data=_batches())
    path = upop_fx.save_pretrained(depth.module, tmp_path / "shallow")
    assert json.loads((path / "upop_fx.json").read_text())["layout"] == "stock"
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 2
    prompt = _batches(1)[0]["input_ids"][:, :6]
    with torch.no_grad():
        want = depth.module.generate(input_ids=prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert plain_generate(path, input_ids=prompt) == want.tolist()


def test_per_layer_config_lists_follow_the_kept_layers():
    zoo = models.get("gemma3")  # layer_types: a sliding-window layer, then a global one
    depth = upop_fx.drop_layers(zoo.model, zoo.example_inputs, layers=[0])
    assert depth.module.config.layer_types == ["full_attention"] and depth.module.config.num_hidden_layers == 1
    assert zoo.model.config.layer_types == ["sliding_attention", "full_attention"]


class _Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


class _Towers(torch.nn.Module):
    def __init__(self, block: type[torch.nn.Module] = _Residual) -> None:
        super().__init__()
        self.a = torch.nn.ModuleList([block() for _ in range(2)])
        self.b = torch.nn.ModuleList([block() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.a, *self.b]:
            x = layer(x) if isinstance(layer, _Residual) else x + layer(x)
        return x


@pytest.mark.parametrize("call, message", [
    (lambda m, x: upop_fx.drop_layers(m, x, 0, data=[x]), "remove at least one"),
    (lambda m, x: upop_fx.drop_layers(m, x, 4, data=[x]), "keep at least one"),
    (lambda m, x: upop_fx.drop_layers(m, x, 1), "needs data"),
    (lambda m, x: upop_fx.drop_layers(m, x, layers=[7]), "layers 0..3"),
    (lambda m, x: upop_fx.drop_layers(m, x, 1, layers=[0]), "either n"),
    (lambda m, x: upop_fx.drop_layers(m, x, layers=[0], stack="model.norm"), "not a list"),
])
def test_a_bad_request_is_a_clear_error(call, message):
    model = _llama()
    with pytest.raises(upop_fx.InputError, match=message):
        call(model, _batches(1)[0])


def test_a_model_without_one_stack_is_asked_to_name_it():
    with pytest.raises(upop_fx.InputError, match="no nn.ModuleList or nn.Sequential"):
        layer_stack(torch.nn.Linear(4, 4))
    towers = _Towers()
    with pytest.raises(upop_fx.InputError, match="several stacks of 2 layers .*a, b"):
        layer_stack(towers)
    depth = upop_fx.drop_layers(towers, torch.randn(3, 4), layers=[1], stack="b")
    assert len(depth.module.b) == 1 and len(towers.b) == 2


def test_layers_that_are_not_blocks_to_skip_are_refused_not_cut_wrong():
    """The residual add is outside the layers (``x + layer(x)`` in the owner's forward): removing a layer is not
    the layer passing its input on, and the check says so instead of returning another function."""
    towers = _Towers(block=lambda: torch.nn.Linear(4, 4))
    with pytest.raises(upop_fx.PostconditionError, match="does not use them as blocks"):
        upop_fx.drop_layers(towers, torch.randn(3, 4), layers=[1], stack="b")


def _calibration(n: int = 8, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 99, (4, 16), generator=g)} for _ in range(n)]


def _changed(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sb = b.state_dict()
    return [k for k, v in a.state_dict().items() if not torch.equal(v, sb[k])]


def test_a_bridge_brings_the_stream_after_a_gap_back_toward_the_original():
    """Layers 2 and 3 removed: layer 1's MLP output map is re-fitted so that its stream is the original's after
    layer 3. It alone changes, its calibration error falls, and on other inputs the stream the next layer
    receives, and the logits, are nearer the original's than without the bridge."""
    model = _llama(6)
    plain = upop_fx.drop_layers(model, _batches(1)[0], layers=[2, 3], data=_calibration(), bridge=False)
    bridged = upop_fx.drop_layers(model, _batches(1)[0], layers=[2, 3], data=_calibration())
    assert plain.bridges == [] and len(bridged.bridges) == 1
    b = bridged.bridges[0]
    assert (b.layer, b.gap, b.weight, b.applied) == (1, [2, 3], "model.layers.1.mlp.down_proj", True)
    assert b.fit.after < b.fit.before and b.fit.held_after < b.fit.held_before and b.stream_after < b.stream_before
    assert _changed(bridged.module, plain.module) == ["model.layers.1.mlp.down_proj.weight"]
    other = _calibration(4, seed=9)
    with torch.no_grad():
        want = [model(**x, output_hidden_states=True) for x in other]  # hidden_states[4]: after layer 3
        got = [[m(**x, output_hidden_states=True) for x in other] for m in (plain.module, bridged.module)]
    stream = [upop_fx.compare.relative_error([o.hidden_states[2] for o in outs], [w.hidden_states[4] for w in want])
              for outs in got]
    logits = [upop_fx.compare.relative_error([o.logits for o in outs], [w.logits for w in want]) for outs in got]
    assert stream[1] < stream[0] and logits[1] < logits[0], (stream, logits)
    assert "bridged [2, 3] by re-fitting model.layers.1.mlp.down_proj" in bridged.describe()


def _right_padded(batches, pad: int = 5):
    """Each batch with ``pad`` padding tokens after it, and the attention mask that says so."""
    return [{"input_ids": torch.cat([b["input_ids"], torch.full((b["input_ids"].shape[0], pad), 7)], 1),
             "attention_mask": torch.cat([torch.ones_like(b["input_ids"]),
                                          torch.zeros(b["input_ids"].shape[0], pad, dtype=torch.long)], 1)}
            for b in batches]  # fmt: skip


def test_padding_does_not_count_in_a_bridge():
    """Right padding with its mask: a causal model's real positions are those of the unpadded batches, so the
    bridge fitted on the padded batches is the one fitted on the unpadded ones (and it is another one when the
    padding is counted as tokens)."""
    model, real = _llama(6), _calibration()
    padded = _right_padded(real)
    fitted = [upop_fx.drop_layers(model, real[0], layers=[2, 3], data=d)
              for d in (real, padded, [{"input_ids": b["input_ids"]} for b in padded])]
    weights = [d.module.model.layers[1].mlp.down_proj.weight for d in fitted]
    assert all(d.bridges[0].applied for d in fitted)
    assert torch.allclose(weights[1], weights[0], rtol=1e-4, atol=1e-6)
    assert fitted[1].bridges[0].fit.rows == fitted[0].bridges[0].fit.rows
    assert not torch.allclose(weights[2], weights[0], rtol=1e-4, atol=1e-6)


def test_conv1d_maps_are_bridged_too():
    """GPT-2 writes its MLP output through Hugging Face's Conv1D (weight stored (in, out))."""
    zoo = models.get("gpt2")
    ids = zoo.example_inputs["input_ids"]
    g = torch.Generator().manual_seed(4)
    data = [{"input_ids": torch.randint(0, int(ids.max()) + 1, (4, 12), generator=g)} for _ in range(8)]
    depth = upop_fx.drop_layers(zoo.model, zoo.example_inputs, layers=[1], data=data)
    (b,) = depth.bridges
    assert b.weight.endswith("mlp.c_proj") and b.applied and b.fit.after < b.fit.before


def test_a_post_norm_layer_is_not_bridged_and_left_as_it_was():
    """BERT normalises after its residual add: a re-fitted map cannot set the stream, so the bridge is undone
    and says why; the module is the one without bridges."""
    zoo = models.get("bert")
    ids = zoo.example_inputs["input_ids"]
    g = torch.Generator().manual_seed(5)
    data = [{"input_ids": torch.randint(0, int(ids.max()) + 1, (4, 12), generator=g)} for _ in range(8)]
    bridged = upop_fx.drop_layers(zoo.model, zoo.example_inputs, layers=[1], data=data)
    plain = upop_fx.drop_layers(zoo.model, zoo.example_inputs, layers=[1], data=data, bridge=False)
    (b,) = bridged.bridges
    assert not b.applied and _changed(bridged.module, plain.module) == []
    assert b.why is not None and ("not the stream plus" in b.why or b.fit.ridge is None)


def test_a_gap_at_the_start_has_nothing_to_bridge_from():
    depth = upop_fx.drop_layers(_llama(), _batches(1)[0], layers=[0, 2], data=_calibration())
    assert [b.gap for b in depth.bridges] == [[0], [2]]
    assert depth.bridges[0].why == "the gap starts the stack: no kept layer before it"
    assert depth.bridges[1].layer == 1


def test_bridging_without_data_is_refused():
    with pytest.raises(upop_fx.InputError, match="bridging the gaps needs data"):
        upop_fx.drop_layers(_llama(), _batches(1)[0], layers=[1], bridge=True)
