"""The dimension-group analysis finds exactly the expected structures on every zoo model, and leaves nothing
unlisted: every weight's output channels are in a group or reported as not prunable with the node and the reason
(one capture per zoo model serves both)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import upop_fx
from upop_fx.ir.groups import DIMS_KEY, GROUPS_KEY, get_analysis
from upop_fx.passes import FindGroups
from upop_fx.passes.base import copy_structure
from upop_fx.passes.find_groups import unlisted_weights
from upop_fx.passes.param_views import ParamView, resolve

from . import models
from .models import ZOO

# (kind, tower, layer, heads, head_dim, width, cross) of every prunable group, in graph order.
GOLDEN = {
    "bert": [
        ('qk', 'encoder.layer', 0, 4, 8, 32, False),
        ('v', 'encoder.layer', 0, 4, 8, 32, False),
        ('mlp', 'encoder.layer', 0, None, None, 64, False),
        ('qk', 'encoder.layer', 1, 4, 8, 32, False),
        ('v', 'encoder.layer', 1, 4, 8, 32, False),
        ('mlp', 'encoder.layer', 1, None, None, 64, False),
    ],
    "bert_cls": [
        ('qk', 'bert.encoder.layer', 0, 4, 8, 32, False),
        ('v', 'bert.encoder.layer', 0, 4, 8, 32, False),
        ('mlp', 'bert.encoder.layer', 0, None, None, 64, False),
        ('qk', 'bert.encoder.layer', 1, 4, 8, 32, False),
        ('v', 'bert.encoder.layer', 1, 4, 8, 32, False),
        ('mlp', 'bert.encoder.layer', 1, None, None, 64, False),
        ('mlp', '', -1, None, None, 32, False),
    ],
    "vit": [
        ('qk', 'vit.layers', 0, 4, 8, 32, False),
        ('v', 'vit.layers', 0, 4, 8, 32, False),
        ('mlp', 'vit.layers', 0, None, None, 64, False),
        ('qk', 'vit.layers', 1, 4, 8, 32, False),
        ('v', 'vit.layers', 1, 4, 8, 32, False),
        ('mlp', 'vit.layers', 1, None, None, 64, False),
    ],
    "deit": [
        ('qk', 'layers', 0, 4, 8, 32, False),
        ('v', 'layers', 0, 4, 8, 32, False),
        ('mlp', 'layers', 0, None, None, 64, False),
        ('qk', 'layers', 1, 4, 8, 32, False),
        ('v', 'layers', 1, 4, 8, 32, False),
        ('mlp', 'layers', 1, None, None, 64, False),
    ],
    "distilbert": [
        ('qk', 'transformer.layer', 0, 4, 8, 32, False),
        ('v', 'transformer.layer', 0, 4, 8, 32, False),
        ('mlp', 'transformer.layer', 0, None, None, 64, False),
        ('qk', 'transformer.layer', 1, 4, 8, 32, False),
        ('v', 'transformer.layer', 1, 4, 8, 32, False),
        ('mlp', 'transformer.layer', 1, None, None, 64, False),
    ],
    "gpt2": [
        ('qk', 'transformer.h', 0, 4, 8, 32, False),
        ('v', 'transformer.h', 0, 4, 8, 32, False),
        ('mlp', 'transformer.h', 0, None, None, 128, False),
        ('qk', 'transformer.h', 1, 4, 8, 32, False),
        ('v', 'transformer.h', 1, 4, 8, 32, False),
        ('mlp', 'transformer.h', 1, None, None, 128, False),
    ],
    "clip": [
        ('qk', 'vision_model.encoder.layers', 0, 4, 12, 48, False),
        ('v', 'vision_model.encoder.layers', 0, 4, 12, 48, False),
        ('mlp', 'vision_model.encoder.layers', 0, None, None, 96, False),
        ('qk', 'vision_model.encoder.layers', 1, 4, 12, 48, False),
        ('v', 'vision_model.encoder.layers', 1, 4, 12, 48, False),
        ('mlp', 'vision_model.encoder.layers', 1, None, None, 96, False),
        ('qk', 'text_model.encoder.layers', 0, 4, 8, 32, False),
        ('v', 'text_model.encoder.layers', 0, 4, 8, 32, False),
        ('mlp', 'text_model.encoder.layers', 0, None, None, 64, False),
        ('qk', 'text_model.encoder.layers', 1, 4, 8, 32, False),
        ('v', 'text_model.encoder.layers', 1, 4, 8, 32, False),
        ('mlp', 'text_model.encoder.layers', 1, None, None, 64, False),
    ],
    "blip_caption": [  # vision tower, then a causal text decoder cross-attending to the image tokens
        ('qk', 'vision_model.encoder.layers', 0, 4, 8, 32, False),
        ('v', 'vision_model.encoder.layers', 0, 4, 8, 32, False),
        ('mlp', 'vision_model.encoder.layers', 0, None, None, 96, False),
        ('qk', 'vision_model.encoder.layers', 1, 4, 8, 32, False),
        ('v', 'vision_model.encoder.layers', 1, 4, 8, 32, False),
        ('mlp', 'vision_model.encoder.layers', 1, None, None, 96, False),
        ('qk', 'text_decoder.bert.encoder.layer', 0, 2, 16, 32, False),
        ('v', 'text_decoder.bert.encoder.layer', 0, 2, 16, 32, False),
        ('qk', 'text_decoder.bert.encoder.layer', 0, 2, 16, 32, True),
        ('v', 'text_decoder.bert.encoder.layer', 0, 2, 16, 32, True),
        ('mlp', 'text_decoder.bert.encoder.layer', 0, None, None, 64, False),
        ('qk', 'text_decoder.bert.encoder.layer', 1, 2, 16, 32, False),
        ('v', 'text_decoder.bert.encoder.layer', 1, 2, 16, 32, False),
        ('qk', 'text_decoder.bert.encoder.layer', 1, 2, 16, 32, True),
        ('v', 'text_decoder.bert.encoder.layer', 1, 2, 16, 32, True),
        ('mlp', 'text_decoder.bert.encoder.layer', 1, None, None, 64, False),
    ],
    "blip_vqa": [
        ('qk', 'vision_model.encoder.layers', 0, 4, 8, 32, False),
        ('v', 'vision_model.encoder.layers', 0, 4, 8, 32, False),
        ('mlp', 'vision_model.encoder.layers', 0, None, None, 96, False),
        ('qk', 'vision_model.encoder.layers', 1, 4, 8, 32, False),
        ('v', 'vision_model.encoder.layers', 1, 4, 8, 32, False),
        ('mlp', 'vision_model.encoder.layers', 1, None, None, 96, False),
        ('qk', 'text_encoder.encoder.layer', 0, 2, 16, 32, False),
        ('v', 'text_encoder.encoder.layer', 0, 2, 16, 32, False),
        ('qk', 'text_encoder.encoder.layer', 0, 2, 16, 32, True),
        ('v', 'text_encoder.encoder.layer', 0, 2, 16, 32, True),
        ('mlp', 'text_encoder.encoder.layer', 0, None, None, 64, False),
        ('qk', 'text_encoder.encoder.layer', 1, 2, 16, 32, False),
        ('v', 'text_encoder.encoder.layer', 1, 2, 16, 32, False),
        ('qk', 'text_encoder.encoder.layer', 1, 2, 16, 32, True),
        ('v', 'text_encoder.encoder.layer', 1, 2, 16, 32, True),
        ('mlp', 'text_encoder.encoder.layer', 1, None, None, 64, False),
        ('qk', 'text_decoder.bert.encoder.layer', 0, 2, 16, 32, False),
        ('v', 'text_decoder.bert.encoder.layer', 0, 2, 16, 32, False),
        ('qk', 'text_decoder.bert.encoder.layer', 0, 2, 16, 32, True),
        ('v', 'text_decoder.bert.encoder.layer', 0, 2, 16, 32, True),
        ('mlp', 'text_decoder.bert.encoder.layer', 0, None, None, 64, False),
        ('qk', 'text_decoder.bert.encoder.layer', 1, 2, 16, 32, False),
        ('v', 'text_decoder.bert.encoder.layer', 1, 2, 16, 32, False),
        ('qk', 'text_decoder.bert.encoder.layer', 1, 2, 16, 32, True),
        ('v', 'text_decoder.bert.encoder.layer', 1, 2, 16, 32, True),
        ('mlp', 'text_decoder.bert.encoder.layer', 1, None, None, 64, False),
    ],
    "torch_encoder": [
        ('qk', 'layers', 0, 4, 8, 32, False),
        ('v', 'layers', 0, 4, 8, 32, False),
        ('mlp', 'layers', 0, None, None, 64, False),
        ('qk', 'layers', 1, 4, 8, 32, False),
        ('v', 'layers', 1, 4, 8, 32, False),
        ('mlp', 'layers', 1, None, None, 64, False),
    ],
    "timm_vit": [
        ('qk', 'blocks', 0, 4, 8, 32, False),
        ('v', 'blocks', 0, 4, 8, 32, False),
        ('mlp', 'blocks', 0, None, None, 128, False),
        ('qk', 'blocks', 1, 4, 8, 32, False),
        ('v', 'blocks', 1, 4, 8, 32, False),
        ('mlp', 'blocks', 1, None, None, 128, False),
    ],
    "llama": [
        ('qk', 'model.layers', 0, 2, 4, 8, False),
        ('v', 'model.layers', 0, 2, 8, 16, False),
        ('mlp', 'model.layers', 0, None, None, 64, False),
        ('qk', 'model.layers', 1, 2, 4, 8, False),
        ('v', 'model.layers', 1, 2, 8, 16, False),
        ('mlp', 'model.layers', 1, None, None, 64, False),
    ],
    "qwen3": [  # the per-head q/k RMSNorm reduces over head_dim: a q/k channel is a whole head (of 8 positions)
        ('qk', 'model.layers', 0, 2, 1, 2, False),
        ('v', 'model.layers', 0, 2, 8, 16, False),
        ('mlp', 'model.layers', 0, None, None, 64, False),
        ('qk', 'model.layers', 1, 2, 1, 2, False),
        ('v', 'model.layers', 1, 2, 8, 16, False),
        ('mlp', 'model.layers', 1, None, None, 64, False),
    ],
    "gemma3": [  # one KV head, copied per query head; q/k normalised per head (the one key head's norm makes its
        # dims one class, which goes with the last query head): a q/k channel is a whole head; v two heads of 16 dims
        ('qk', 'model.layers', 0, 2, 1, 2, False),
        ('v', 'model.layers', 0, 2, 16, 32, False),
        ('mlp', 'model.layers', 0, None, None, 64, False),
        ('qk', 'model.layers', 1, 2, 1, 2, False),
        ('v', 'model.layers', 1, 2, 16, 32, False),
        ('mlp', 'model.layers', 1, None, None, 64, False),
    ],
    "bigcode": [  # multi-query: the one key/value head is copied per query head, so query heads go alone
        ('qk', 'transformer.h', 0, 4, 8, 32, False),
        ('v', 'transformer.h', 0, 4, 8, 32, False),
        ('mlp', 'transformer.h', 0, None, None, 64, False),
        ('qk', 'transformer.h', 1, 4, 8, 32, False),
        ('v', 'transformer.h', 1, 4, 8, 32, False),
        ('mlp', 'transformer.h', 1, None, None, 64, False),
    ],
    "deepseek_v3": [  # latent attention: the key is the cat of its per-head part and the rotary part every head
        # shares, copied per head, so a head's q/k dims are its own: 8 dims and 2 rotary pairs per head; v's head dims;
        # the dense first MLP, then the shared expert and the 4 routed experts (one group, neuron j of each)
        ('qk', 'model.layers', 0, 4, 10, 40, False),
        ('v', 'model.layers', 0, 4, 8, 32, False),
        ('mlp', 'model.layers', 0, None, None, 64, False),
        ('qk', 'model.layers', 1, 4, 10, 40, False),
        ('v', 'model.layers', 1, 4, 8, 32, False),
        ('mlp', 'model.layers', 1, None, None, 16, False),
        ('mlp', 'model.layers', 1, None, None, 16, False),
    ],
    "mixtral": [  # the experts of a layer: one MLP group, neuron j of each expert (see test_coverage.py)
        ('qk', 'model.layers', 0, 2, 4, 8, False),
        ('v', 'model.layers', 0, 2, 8, 16, False),
        ('mlp', 'model.layers', 0, None, None, 32, False),
        ('qk', 'model.layers', 1, 2, 4, 8, False),
        ('v', 'model.layers', 1, 2, 8, 16, False),
        ('mlp', 'model.layers', 1, None, None, 32, False),
    ],
    "gptj": [
        ('qk', 'transformer.h', 0, 4, 6, 24, False),
        ('v', 'transformer.h', 0, 4, 8, 32, False),
        ('mlp', 'transformer.h', 0, None, None, 128, False),
        ('qk', 'transformer.h', 1, 4, 6, 24, False),
        ('v', 'transformer.h', 1, 4, 8, 32, False),
        ('mlp', 'transformer.h', 1, None, None, 128, False),
    ],
    "torch_transformer": [
        ('qk', 'encoder.layers', 0, 4, 8, 32, False),
        ('v', 'encoder.layers', 0, 4, 8, 32, False),
        ('mlp', 'encoder.layers', 0, None, None, 64, False),
        ('qk', 'decoder.layers', 0, 4, 8, 32, False),
        ('v', 'decoder.layers', 0, 4, 8, 32, False),
        ('qk', 'decoder.layers', 0, 4, 8, 32, True),
        ('v', 'decoder.layers', 0, 4, 8, 32, True),
        ('mlp', 'decoder.layers', 0, None, None, 64, False),
    ],
    "segformer": [  # self-attention over keys from a spatially reduced copy of the same input (not cross)
        ('qk', 'segformer.stages', 0, 1, 16, 16, False),
        ('v', 'segformer.stages', 0, 1, 16, 16, False),
        ('mlp', 'segformer.stages', 0, None, None, 32, False),
        ('qk', 'segformer.stages', 1, 2, 16, 32, False),
        ('v', 'segformer.stages', 1, 2, 16, 32, False),
        ('mlp', 'segformer.stages', 1, None, None, 64, False),
        ('mlp', 'decode_head', -1, None, None, 32, False),
        ('mlp', 'decode_head', -1, None, None, 32, False),
    ],
    "llava": [
        ('qk', 'model.vision_tower.encoder.layers', 0, 4, 8, 32, False),
        ('v', 'model.vision_tower.encoder.layers', 0, 4, 8, 32, False),
        ('mlp', 'model.vision_tower.encoder.layers', 0, None, None, 64, False),
        ('qk', 'model.vision_tower.encoder.layers', 1, 4, 8, 32, False),
        ('v', 'model.vision_tower.encoder.layers', 1, 4, 8, 32, False),
        ('mlp', 'model.vision_tower.encoder.layers', 1, None, None, 64, False),
        ('mlp', 'model.multi_modal_projector', -1, None, None, 32, False),
        ('qk', 'model.language_model.layers', 0, 2, 4, 8, False),
        ('v', 'model.language_model.layers', 0, 2, 8, 16, False),
        ('mlp', 'model.language_model.layers', 0, None, None, 64, False),
        ('qk', 'model.language_model.layers', 1, 2, 4, 8, False),
        ('v', 'model.language_model.layers', 1, 2, 8, 16, False),
        ('mlp', 'model.language_model.layers', 1, None, None, 64, False),
    ],
    "bloom": [
        ('qk', 'transformer.h', 0, 4, 8, 32, False),
        ('v', 'transformer.h', 0, 4, 8, 32, False),
        ('mlp', 'transformer.h', 0, None, None, 128, False),
        ('qk', 'transformer.h', 1, 4, 8, 32, False),
        ('v', 'transformer.h', 1, 4, 8, 32, False),
        ('mlp', 'transformer.h', 1, None, None, 128, False),
    ],
    "mpnet": [
        ('qk', 'encoder.layer', 0, 4, 8, 32, False),
        ('v', 'encoder.layer', 0, 4, 8, 32, False),
        ('mlp', 'encoder.layer', 0, None, None, 64, False),
        ('qk', 'encoder.layer', 1, 4, 8, 32, False),
        ('v', 'encoder.layer', 1, 4, 8, 32, False),
        ('mlp', 'encoder.layer', 1, None, None, 64, False),
    ],
    "deberta_v2": [
        ('qk', 'encoder.layer', 0, 4, 8, 32, False),
        ('v', 'encoder.layer', 0, 4, 8, 32, False),
        ('mlp', 'encoder.layer', 0, None, None, 64, False),
        ('qk', 'encoder.layer', 1, 4, 8, 32, False),
        ('v', 'encoder.layer', 1, 4, 8, 32, False),
        ('mlp', 'encoder.layer', 1, None, None, 64, False),
    ],
}


@pytest.fixture(scope="module", params=sorted(ZOO))
def analysed(request):
    """The zoo model, the graph ``compress`` captured of it (``tests.models.half``; a copy, analysed afresh here)
    and the FindGroups result."""
    zoo, result = models.half(request.param)
    cap = SimpleNamespace(gm=copy_structure(result.dense))
    return zoo, cap, FindGroups()(cap.gm)


def test_golden_listing(analysed):
    zoo, cap, result = analysed
    assert [g.signature() for g in result.value.prunable] == GOLDEN[zoo.name]
    assert not result.modified
    cap.gm.graph.lint()


def test_every_weight_is_in_a_group_or_reported(analysed):
    zoo, cap, result = analysed
    gm, analysis = cap.gm, result.value
    assert unlisted_weights(gm, analysis) == []
    params = {id(p) for p in gm.parameters()}
    weights = {
        str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and n.users
        and id(w := gm.get_parameter(str(n.target)) if _is_param(gm, n) else None) in params
        and w.dim() >= 2 and min(w.shape[-2:]) > 1
    }  # fmt: skip
    tied = {u.name for u in analysis.uses}
    # every weight matrix is tied to some group (prunable or not), or is consumed by an op no rule follows,
    # which is then itself a reported group
    untied = {w for w in weights - tied if not _only_an_input(gm, w)}
    reported = [g for g in analysis.groups if not g.prunable and "no rule follows" in (g.reason or "")]
    assert not untied or reported, (zoo.name, sorted(untied))
    for g in analysis.groups:
        if not g.prunable:
            assert g.reason and g.reason.startswith("node ") or "structure" in g.reason, (zoo.name, g.describe())


def _only_an_input(gm: torch.fx.GraphModule, target: str) -> bool:
    """The parameter reaches ops only as their data input (DeBERTa's relative embeddings fed to a linear)."""
    views: dict = {}
    consumers = []
    for n in gm.graph.nodes:
        for i, a in enumerate(n.args if n.op == "call_function" else ()):
            v = resolve(a, views) if isinstance(a, torch.fx.Node) else None
            if isinstance(v, ParamView) and str(v.param.target) == target and not isinstance(resolve(n, views), (ParamView, list)):
                consumers.append((n, i))
    return bool(consumers) and all(n.target == torch.ops.aten.linear.default and i == 0 for n, i in consumers)


def _is_param(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    try:
        gm.get_parameter(str(node.target))
    except AttributeError:
        return False
    return True


def test_groups_are_consistent(analysed):
    """Every channel has a positive cost, producers cover every channel, and classes are disjoint."""
    zoo, cap, result = analysed
    analysis = result.value
    assert get_analysis(cap.gm) is analysis
    seen: set[int] = set()
    for g in analysis.prunable:
        assert g.width == len(g.classes) == len(g.cost_params) == len(g.cost_flops)
        assert (g.cost_params > 0).all() and (g.cost_flops > 0).all(), g.describe()
        assert not seen & set(g.classes.tolist())
        seen |= set(g.classes.tolist())
        covered = np.isin(g.classes, list(_copied(analysis)))  # a per-head copy: produced by its source
        for _, _, chan in g.producers:
            covered[chan[chan >= 0]] = True
        assert covered.all(), g.describe()
        if g.heads:
            assert g.heads * g.head_dim == g.width


def test_param_cost_matches_weights(analysed):
    """Removing every channel of a group removes exactly its producer rows and consumer columns."""
    zoo, cap, result = analysed
    params = dict(cap.gm.named_parameters())
    for g in result.value.prunable:
        covered: dict[tuple[str, int], np.ndarray] = {}  # a packed parameter is used in parts (views)
        for name, axis, chan in g.producers + g.consumers:
            hit = covered.setdefault((name, axis), np.zeros(len(chan), dtype=bool))
            hit |= chan >= 0
        expected = sum(int(hit.sum()) * params[n].numel() // params[n].shape[a] for (n, a), hit in covered.items())
        mine = set(g.classes.tolist())
        for c in result.value.copies:  # the rows of a broadcast head, shared by the classes of its copies
            if set(result.value.label_class[c.copies].reshape(-1).tolist()) <= mine:
                source = set(c.source.reshape(-1).tolist())
                for u in result.value.uses:
                    if u.role == "out" and source & set(u.labels.tolist()):
                        rows = int(np.isin(u.labels, list(source)).sum())
                        expected += rows * params[u.name].numel() // params[u.name].shape[u.axis]
        assert g.cost_params.sum() == pytest.approx(expected), g.describe()


def _copied(analysis) -> set[int]:  # noqa: ANN001
    """The classes of per-head copies of a broadcast key/value head."""
    return {int(r) for c in analysis.copies for r in analysis.label_class[c.copies].reshape(-1).tolist()}


def test_attention_flops_include_score_matrix():
    zoo = ZOO["bert"]()
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    analysis = FindGroups()(cap.gm).value
    qk = next(g for g in analysis.prunable if g.kind == "qk")
    seq = zoo.example_inputs["input_ids"].shape[1]
    hidden = zoo.model.config.hidden_size
    # q row + k row (2·T·C each) + one dim of one head in Q·Kᵀ (2·T·T), per sample
    assert qk.cost_flops[0] == pytest.approx(2 * (2 * seq * hidden) + 2 * seq * seq)


def test_no_rule_is_reported_not_guessed():
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.cumsum(self.fc1(x), dim=-1)  # no channel rule for cumsum
            return self.fc2(h)

    cap = upop_fx.capture(Odd().eval(), torch.randn(2, 8))
    analysis = FindGroups()(cap.gm).value
    hidden = next(g for g in analysis.groups if g.width == 16)
    assert not hidden.prunable
    assert "cumsum" in hidden.reason and "no channel rule" in hidden.reason


def test_non_zero_preserving_activation_is_refused():
    class Sig(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.sigmoid(self.fc1(x)))  # sigmoid(0) = 0.5: removal is not exact

    cap = upop_fx.capture(Sig().eval(), torch.randn(2, 8))
    hidden = next(g for g in FindGroups()(cap.gm).value.groups if g.width == 16)
    assert not hidden.prunable and "not be exactly zero" in hidden.reason


def test_blocks_recorded_on_nodes():
    zoo = ZOO["timm_vit"]()
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    FindGroups()(cap.gm)
    assert GROUPS_KEY in cap.gm.meta
    blocks = [n.meta.get(DIMS_KEY) for n in cap.gm.graph.nodes]
    assert any(b is not None for b in blocks)


def test_accessor_says_which_pass_to_run():
    cap = upop_fx.capture(torch.nn.Linear(4, 4), torch.randn(2, 4))
    with pytest.raises(LookupError, match="FindGroups"):
        get_analysis(cap.gm)


def test_shape_constants_listed_per_group():
    zoo = ZOO["bert"]()
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    analysis = FindGroups()(cap.gm).value
    qk = next(g for g in analysis.prunable if g.kind == "qk")
    targets = {str(n.target) for n in cap.gm.graph.nodes if n.name in qk.shape_nodes}
    # the head split of q and k, and the attention whose scale surgery pins
    assert "aten.view.default" in targets and "aten.scaled_dot_product_attention.default" in targets
    mlp = next(g for g in analysis.prunable if g.kind == "mlp")
    assert mlp.shape_nodes == []  # fc1 -> gelu -> fc2 has no literal width
