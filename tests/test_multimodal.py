"""Vision-language end to end: cross-attention groups on BLIP, the unified ranking across towers, compressed
CLIP and BLIP equal to their zeroed references, ONNX export of the compressed models."""

from __future__ import annotations

import pytest
import torch

import upop_fx
from upop_fx.compare import relative_error

from .models import ZOO

BLIP_CROSS = {  # tower holding the cross-attention -> the tower its K and V read
    "text_encoder.encoder.layer": "vision_model",
    "text_decoder.bert.encoder.layer": "text_encoder",
}


def _call(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> object:
    with torch.no_grad():
        return module(**inputs)


def _compress_zoo(name: str) -> tuple[object, upop_fx.Result]:
    zoo = ZOO[name]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.5, search_steps=4, interval=2, retrain_steps=0)
    return zoo, result


@pytest.fixture(scope="module")
def blip():
    return _compress_zoo("blip_vqa")


@pytest.fixture(scope="module")
def clip():
    return _compress_zoo("clip")


def _linear_input_scopes(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Parameter name -> the module path that produced the input of the linear using it."""
    out = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        for u in n.users:
            if u.target is torch.ops.aten.linear.default and u.args[1] is n:
                stack = u.args[0].meta.get("nn_module_stack") or {}
                out[n.target] = list(stack.values())[-1][0] if stack else ""
    return out


# ---------------------------------------------------------------------------------------------- BLIP cross-attention

def test_blip_cross_attention_groups_read_the_other_tower(blip):
    _, result = blip
    cross = [g for g in result.analysis.groups if g.cross]
    for tower in BLIP_CROSS:
        found = sorted((g.layer, g.kind) for g in cross if g.tower == tower)
        assert found == [(0, "qk"), (0, "v"), (1, "qk"), (1, "v")], tower
    assert {g.tower for g in cross} == set(BLIP_CROSS)  # none in the vision tower
    assert all(g.prunable for g in cross)

    scopes = _linear_input_scopes(result.dense)
    checked = 0
    for g in result.analysis.prunable:
        if g.kind not in ("qk", "v") or g.tower not in BLIP_CROSS:
            continue
        own = g.tower.split(".")[0]
        for name, _, _ in g.producers:
            if not name.endswith(".weight"):
                continue
            reads_other = g.cross and (".key." in name or ".value." in name)
            expected = BLIP_CROSS[g.tower] if reads_other else own
            assert scopes[name].startswith(expected), (g.describe(), name, scopes[name])
            checked += 1
    assert checked == 2 * 2 * 2 * 3  # 2 towers x 2 layers x (self + cross) x q, k, v

    # the cut went through the cross-attention projections: K/V rows follow the kept dims, inputs stay full
    small = dict(result.model.named_parameters())
    rows = {r.group: r for r in result.report.groups}
    for g in cross:
        for name, axis, _ in g.producers:
            if name.endswith(".weight"):
                assert small[name].shape[axis] == rows[g.id].kept, name
    assert any(rows[g.id].kept < rows[g.id].total for g in cross)


def test_blip_compressed_matches_zeroed_reference(blip):
    zoo, result = blip
    assert result.report.params_after < result.report.params_before
    reference = result.reference()
    for inputs in (zoo.example_inputs, zoo.other_inputs):
        assert relative_error(_call(result.model, inputs), _call(reference, inputs)) <= 1e-4


def test_clip_compressed_matches_zeroed_reference(clip):
    zoo, result = clip
    towers = result.report.towers()
    assert set(towers) == {"vision_model.encoder.layers", "text_model.encoder.layers"}
    assert result.report.prunable_cost_removed >= 0.5
    reference = result.reference()
    for inputs in (zoo.example_inputs, zoo.other_inputs):
        out, ref = _call(result.model, inputs), _call(reference, inputs)
        assert out.logits_per_image.shape == ref.logits_per_image.shape
        assert relative_error(out, ref) <= 1e-4


# ---------------------------------------------------------------------------------------------- unified ranking

DEAD, LIVE = "vision_model.encoder.layers", "text_model.encoder.layers"


@pytest.fixture(scope="module")
def dead_vision_clip():
    """A small CLIP whose vision MLPs are dead (fc1 rows, fc1 bias and fc2 columns all zero) and whose text
    tower is untouched. MLPs are 4x wide, so the dead neurons are 2/3 of the vision tower's prunable
    parameters — a third of the model's: at ratio 0.3 a ranking that sees them takes its whole budget there."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vocab = 40
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, projection_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=vocab - 1)
    vision = dict(image_size=8, patch_size=4, num_channels=1, hidden_size=32, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, attn_implementation="sdpa")
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            layer.mlp.fc1.weight.zero_()
            layer.mlp.fc1.bias.zero_()
            layer.mlp.fc2.weight.zero_()
    gen = torch.Generator().manual_seed(1)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(2, vocab - 1, (8, 6), generator=gen)
        ids[:, -1] = vocab - 1
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(8, 1, 8, 8, generator=gen)}

    return model, [batch() for _ in range(4)]


@pytest.mark.parametrize("method, score", [
    ("magnitude", "gradient"),
    ("upop", "sensitivity"),
    pytest.param("upop", "gradient", marks=pytest.mark.xfail(strict=True, reason=(
        "UPop ranks by the *signed* accumulated mask gradient (z-scored per kind): an exactly dead channel "
        "scores 0, the middle of the ranking, and live channels whose accumulated gradient is positive "
        "(about 40% of them here) are pruned before it. Measured: dead vision tower keeps 0.79, live text "
        "tower 0.60 (distillation, 12 steps); 0.87 vs 0.53 with a trained text tower and the task loss; "
        "0.83 vs 0.56 after 600 steps."))),
])
def test_unified_ranking_prunes_the_dead_tower(dead_vision_clip, method, score):
    model, data = dead_vision_clip
    result = upop_fx.compress(model, data[0], ratio=0.3, method=method, data=data, search_steps=12, interval=2,
                              retrain_steps=0, lr=1e-4, score=score)
    towers = result.report.towers()
    dead, live = towers[DEAD]["kept_fraction"], towers[LIVE]["kept_fraction"]
    assert dead < 0.6 and live > 0.85, (method, score, dead, live)
    assert live - dead > 0.3, (method, score, dead, live)


# ---------------------------------------------------------------------------------------------- ONNX

@pytest.mark.parametrize("name", ["clip", pytest.param("blip", marks=pytest.mark.slow)])
def test_compressed_model_exports_to_onnx(name, request, tmp_path):
    from upop_fx.runtime.export import export_onnx

    zoo, result = request.getfixturevalue(name)
    info = export_onnx(result.model, zoo.example_inputs, tmp_path / f"{name}_small.onnx", optimize=False)
    assert info.path.exists() and info.max_error <= 1e-4  # parity at two batch sizes / sequence lengths
