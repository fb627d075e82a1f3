"""Pass contracts: requires/ensures run by the base, honest ``modified``, in-place vs functional checked."""

from __future__ import annotations

import copy

import pytest
import torch

import upop_fx
from upop_fx.capture.program import CAPTURE_KEY
from upop_fx.errors import PostconditionError, PreconditionError, SurgeryCheckError
from upop_fx.ir.entries import build_entries
from upop_fx.ir.groups import get_analysis
from upop_fx.passes import FindGroups, InsertMasks, PassResult, SortExperts, Surgery
from upop_fx.passes.base import GraphPass
from upop_fx.passes.fuse_attention import FuseMaskedAttention

from .test_errors import _NoGroups


@pytest.fixture
def layer():
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()
    return model, torch.randn(2, 6, 32)


def test_capture_records_what_later_passes_need(layer):
    model, x = layer
    cap = upop_fx.capture(model, x)
    info = cap.gm.meta[CAPTURE_KEY]
    assert info.batch_size == 2 and info.args[0] is cap.args[0] and info.model_name == "TransformerEncoderLayer"
    assert info.dynamic_shapes is not None


def test_find_groups_requires_a_capture_record(layer):
    model, x = layer
    cap = upop_fx.capture(model, x)
    del cap.gm.meta[CAPTURE_KEY]
    with pytest.raises(PreconditionError, match="batch size"):
        FindGroups()(cap.gm)


def test_find_groups_is_an_analysis(layer):
    model, x = layer
    cap = upop_fx.capture(model, x)
    code = cap.gm.code
    result = FindGroups()(cap.gm)
    assert result.gm is cap.gm and result.modified is False and cap.gm.code == code


def test_surgery_refuses_without_example_inputs(layer):
    model, x = layer
    cap = upop_fx.capture(model, x)
    mlp = next(g for g in FindGroups()(cap.gm).value.prunable if g.kind == "mlp")
    del cap.gm.meta[CAPTURE_KEY]
    with pytest.raises(PreconditionError, match="example inputs"):
        Surgery({mlp.id: range(8)})(cap.gm)


def test_surgery_requires_the_analysis(layer):
    model, x = layer
    cap = upop_fx.capture(model, x)
    with pytest.raises(PreconditionError, match="FindGroups"):
        Surgery({0: [0]})(cap.gm)


def test_nothing_to_do_is_reported_as_unmodified(layer):
    model, x = layer
    cap = upop_fx.capture(model, x)
    groups = FindGroups()(cap.gm).value.prunable
    full = Surgery({g.id: range(g.width) for g in groups})(cap.gm)
    assert full.modified is False and full.gm is cap.gm
    masked = InsertMasks(*build_entries(get_analysis(cap.gm)))(cap.gm)
    assert masked.modified is True and masked.gm is not cap.gm
    fuse = FuseMaskedAttention(device="cuda")(masked.gm)  # the weights are on the CPU: nothing to do
    assert fuse.modified is False and fuse.gm is masked.gm


def test_insert_masks_with_nothing_to_mask():
    cap = upop_fx.capture(_NoGroups().eval(), torch.randn(2, 8))
    FindGroups()(cap.gm)
    result = InsertMasks(*build_entries(get_analysis(cap.gm)))(cap.gm)
    assert result.modified is False and result.gm is cap.gm and result.value.structures == []


def test_sort_experts_requires_the_analysis_and_leaves_other_models_alone(layer):
    model, x = layer
    cap = upop_fx.capture(model, x)
    with pytest.raises(PreconditionError, match="FindGroups"):
        SortExperts()(cap.gm)
    FindGroups()(cap.gm)
    before = {k: v.clone() for k, v in cap.gm.state_dict().items()}
    result = SortExperts()(cap.gm)
    assert result.value == [] and result.modified is False and result.gm is cap.gm
    assert all(torch.equal(before[k], v) for k, v in cap.gm.state_dict().items())


def test_sort_experts_on_the_zoo_moe_keeps_outputs_and_the_callers_weights():
    from .models import ZOO

    zoo = ZOO["mixtral"]()
    weights = {k: v.clone() for k, v in zoo.model.state_dict().items()}
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    analysis = FindGroups()(cap.gm).value
    stacked = [g.id for g in analysis.prunable if g.experts == 4]
    assert len(stacked) == 2  # one per layer
    result = SortExperts()(cap.gm)  # its postcondition compares the outputs on the example inputs
    assert result.value == stacked
    cap.gm.graph.lint()
    with torch.no_grad():
        out = cap.gm(**zoo.other_inputs)
        torch.testing.assert_close(out.logits, zoo.model(**zoo.other_inputs).logits)
    assert all(torch.equal(weights[k], v) for k, v in zoo.model.state_dict().items())
    moved = cap.gm.get_parameter("model.layers.0.mlp.experts.down_proj")
    assert not torch.equal(moved, zoo.model.model.layers[0].mlp.experts.down_proj)


def test_insert_masks_tags_every_mask_site(layer):
    model, x = layer
    cap = upop_fx.capture(model, x)
    FindGroups()(cap.gm)
    masked = InsertMasks(*build_entries(get_analysis(cap.gm), "qk_v"))(cap.gm)
    tags = [n.meta["upop_mask"] for n in masked.gm.graph.nodes if "upop_mask" in n.meta]
    assert len(tags) == len(masked.value.sites) > 0
    assert all(t.index.startswith("upop_masks.") and t.masks for t in tags)
    with pytest.raises(PreconditionError, match="masked already"):
        InsertMasks(*build_entries(get_analysis(cap.gm)))(masked.gm)
    structures, entries = build_entries(get_analysis(cap.gm))
    with pytest.raises(PreconditionError, match="grouped by structure"):
        InsertMasks(structures, entries[::-1])(cap.gm)


def test_surgery_check_is_its_postcondition(layer):
    model, x = layer
    cap = upop_fx.capture(model, x)
    mlp = next(g for g in FindGroups()(cap.gm).value.prunable if g.kind == "mlp")
    surgery = Surgery({mlp.id: range(32)})
    result = surgery.run(cap.gm)
    surgery.ensures(cap.gm, result)  # the honest cut passes ...
    with torch.no_grad():
        result.gm.linear1.bias[0] += 1.0  # ... a cut that went wrong does not
    with pytest.raises(SurgeryCheckError, match="differs from the zeroed reference"):
        surgery.ensures(cap.gm, result)
    assert issubclass(SurgeryCheckError, PostconditionError)


class _Lies(GraphPass[None]):
    in_place = True

    def run(self, gm):
        gm.graph.erase_node(next(n for n in gm.graph.nodes if n.op == "call_function" and not n.users))
        return PassResult(gm, False, None)


class _Mutates(GraphPass[None]):
    in_place = False

    def run(self, gm):
        with torch.no_grad():
            gm.fc.weight = torch.nn.Parameter(gm.fc.weight[:4].clone())
        return PassResult(copy.deepcopy(gm), True, None)


class _BadEnsures(GraphPass[None]):
    in_place = True

    def run(self, gm):
        return PassResult(gm, False, None)

    def ensures(self, gm, result):
        raise AssertionError("the promise is broken")


def test_base_checks_the_contract():
    gm = torch.fx.symbolic_trace(_NoGroups())
    with gm.graph.inserting_after(next(iter(gm.graph.nodes))):
        gm.graph.call_function(torch.relu, (next(iter(gm.graph.nodes)),))
    gm.recompile()
    with pytest.raises(PostconditionError, match="modified=False"):
        _Lies()(gm)
    with pytest.raises(PostconditionError, match="functional but changed"):
        _Mutates()(torch.fx.symbolic_trace(_NoGroups()))
    with pytest.raises(PostconditionError, match="the promise is broken"):
        _BadEnsures()(torch.fx.symbolic_trace(_NoGroups()))
    with pytest.raises(PreconditionError, match="GraphModule"):
        _BadEnsures()(_NoGroups())
