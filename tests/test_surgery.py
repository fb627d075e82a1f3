"""Surgery: dense output, the reference check catches wrong rewrites, bad keep-sets are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upop_fx
from upop_fx.errors import SurgeryCheckError, SurgeryError
from upop_fx.passes import FindGroups, Surgery
from upop_fx.passes.blocks import compact
from upop_fx.passes.rules import REWRITES, key_of
from upop_fx.passes.surgery import removed_labels, zeroed_reference

from .models import ZOO


@pytest.fixture(scope="module")
def bert():
    zoo = ZOO["bert"]()
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    analysis = FindGroups()(cap.gm).value
    return zoo, cap, analysis


def _half_head_dims(g):
    return [h * g.head_dim + j for h in range(g.heads) for j in range(g.head_dim // 2)]


def test_surgery_is_functional_and_dense(bert):
    zoo, cap, analysis = bert
    before = {k: v.clone() for k, v in cap.gm.state_dict().items()}
    keep = {g.id: _half_head_dims(g) if g.heads else list(range(0, g.width, 3)) for g in analysis.prunable}
    result = Surgery(keep)(cap.gm)
    assert result.modified and result.value.max_error <= 1e-4
    for k, v in cap.gm.state_dict().items():  # the input graph module is untouched
        assert torch.equal(before[k], v)
    q = result.gm.get_submodule("encoder.layer.0.attention.self.query")
    assert q.weight.shape == (16, 32) and q.bias.shape == (16,)
    result.gm.graph.lint()
    # the head-dim literal was rewritten explicitly: no -1 left on a channel axis of a head split
    views = [n for n in result.gm.graph.nodes if n.target == torch.ops.aten.view.default]
    assert any(list(n.args[1])[-2:] == [4, 4] for n in views)


def test_surgery_output_owns_its_tensors_and_the_reference_zeroes_copies(bert):
    """Surgery starts from the input's tensors (no full-size copy) but returns a module sharing none of them; the
    zeroed reference never zeroes the input's own tensors."""
    zoo, cap, analysis = bert
    keep = {g.id: list(range(0, g.width, 2)) for g in analysis.prunable}
    before = {k: v.clone() for k, v in cap.gm.state_dict().items()}
    small = Surgery(keep)(cap.gm).gm
    theirs = {id(t) for t in [*cap.gm.parameters(), *cap.gm.buffers()]}
    assert not theirs & {id(t) for t in [*small.parameters(), *small.buffers()]}
    removed = removed_labels(analysis, keep)
    for share in (True, False):
        ref = zeroed_reference(cap.gm, removed, share=share)
        mine = {id(t) for t in [*ref.parameters(), *ref.buffers()]}
        assert bool(theirs & mine) == share
    for k, v in cap.gm.state_dict().items():
        assert torch.equal(before[k], v)


def test_tied_weights_stay_tied_in_an_owned_copy():
    from upop_fx.passes.base import copy_structure, own_tensors

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    gm = torch.fx.symbolic_trace(Tied())
    new = copy_structure(gm)
    assert new.emb.weight is gm.emb.weight
    own_tensors(new, gm)
    assert new.emb.weight is new.head.weight and new.emb.weight is not gm.emb.weight
    assert torch.equal(new.emb.weight, gm.emb.weight)


def test_wrong_rewrite_is_caught(bert, monkeypatch):
    """A head-dim constant left unchanged lets ``-1`` absorb the pruned dim: runs, but wrong — and refused."""
    zoo, cap, analysis = bert
    monkeypatch.setitem(REWRITES, key_of(torch.ops.aten.view.default), lambda ctx, node: None)
    # half of every head's q, k and v dims in layer 0: view(x, [B, T, -1, 8]) then yields 2 heads of 8,
    # attention runs on the wrong heads, and the shapes still fit
    qk, v = (next(g for g in analysis.prunable if g.kind == kind) for kind in ("qk", "v"))
    keep = {qk.id: _half_head_dims(qk), v.id: _half_head_dims(v)}
    with pytest.raises(SurgeryCheckError, match="differs from the zeroed reference"):
        Surgery(keep)(cap.gm)


def test_float32_rounding_past_rtol_is_told_apart_from_a_wrong_cut_in_float64(bert, monkeypatch, caplog):
    """With an ``rtol`` no float32 error meets, the first check always fails, as float32 rounding amplified
    through a deep pretrained model can: the float64 rerun of both graphs clears an exact cut and still refuses a
    wrong one (a head-dim constant left unchanged)."""
    zoo, cap, analysis = bert
    keep = {g.id: _half_head_dims(g) if g.heads else list(range(0, g.width, 3)) for g in analysis.prunable}
    with caplog.at_level("INFO", logger="upop_fx.passes.surgery"):
        result = Surgery(keep, rtol=-1.0)(cap.gm)
    assert result.modified and "float32 rounding, the cut is exact" in caplog.text
    monkeypatch.setitem(REWRITES, key_of(torch.ops.aten.view.default), lambda ctx, node: None)
    qk, v = (next(g for g in analysis.prunable if g.kind == kind) for kind in ("qk", "v"))
    with pytest.raises(SurgeryCheckError, match="in float64"):
        Surgery({qk.id: _half_head_dims(qk), v.id: _half_head_dims(v)}, rtol=-1.0)(cap.gm)


def test_rewrite_that_fails_to_run_is_a_check_error(bert, monkeypatch):
    zoo, cap, analysis = bert
    monkeypatch.setitem(REWRITES, key_of(torch.ops.aten.view.default), lambda ctx, node: None)
    qk = next(g for g in analysis.prunable if g.kind == "qk")  # q/k get 2 heads, v keeps 4: SDPA fails
    with pytest.raises(SurgeryCheckError, match="fails to run"):
        Surgery({qk.id: _half_head_dims(qk)})(cap.gm)


def test_unpinned_scale_is_caught(bert, monkeypatch):
    zoo = ZOO["torch_encoder"]()  # nn.MultiheadAttention: SDPA with the implicit 1/sqrt(d) scale
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    analysis = FindGroups()(cap.gm).value
    qk, v = (next(g for g in analysis.prunable if g.kind == kind) for kind in ("qk", "v"))
    keep = {qk.id: _half_head_dims(qk), v.id: _half_head_dims(v)}  # the packed in_proj needs equal widths
    Surgery(keep)(cap.gm)  # correct with the scale pinned
    monkeypatch.setitem(REWRITES, key_of(torch.ops.aten.scaled_dot_product_attention.default), lambda ctx, node: None)
    with pytest.raises(SurgeryCheckError):
        Surgery(keep)(cap.gm)


def test_bad_keep_sets(bert):
    zoo, cap, analysis = bert
    g = analysis.prunable[0]
    with pytest.raises(SurgeryError, match="at least one channel"):
        Surgery({g.id: []})(cap.gm)
    with pytest.raises(SurgeryError, match="out of range"):
        Surgery({g.id: [g.width]})(cap.gm)
    with pytest.raises(SurgeryError, match="no group"):
        Surgery({10_000: [0]})(cap.gm)
    residual = next(x for x in analysis.groups if not x.prunable)
    with pytest.raises(SurgeryError, match="cannot be pruned"):
        Surgery({residual.id: [0]})(cap.gm)
    qk = next(x for x in analysis.prunable if x.kind == "qk")
    ragged = [c for c in range(qk.width) if c != 0]  # head 0 keeps one dim fewer than the others
    with pytest.raises(SurgeryError, match="dense block"):
        Surgery({qk.id: ragged})(cap.gm)


def test_compact_keeps_rows_rectangular():
    labels = np.arange(12).reshape(3, 4)
    kept = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=bool)
    assert compact(labels, kept, "x").tolist() == [[0, 2], [9, 10]]
    with pytest.raises(SurgeryError):
        compact(labels, np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=bool), "x")


@pytest.mark.parametrize("granularity", ["upop", "heads"])
def test_whole_heads_removed_from_packed_projection(granularity):
    """nn.MultiheadAttention: the SymInt ``B·H`` size is rewritten when heads go."""
    zoo = ZOO["torch_encoder"]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.5, granularity=granularity, method="magnitude", retrain_steps=0, own_class=False)
    ref = result.reference()
    for x in (zoo.example_inputs, zoo.other_inputs):
        with torch.no_grad():
            torch.testing.assert_close(result.model(*x), ref(*x), rtol=1e-4, atol=1e-5)
    if granularity == "heads":
        assert any(r.kept_heads < r.heads for r in result.report.groups if r.heads)


@pytest.mark.parametrize("name", ["torch_encoder", "timm_vit", "blip_vqa"])
def test_packed_projection_with_different_qk_and_v_widths(name):
    """qk keeps 3 dims per head, v keeps 5: each slot of the packed projection gets its own chain."""
    zoo = ZOO[name]()
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    analysis = FindGroups()(cap.gm).value
    keep = {}
    for g in analysis.prunable:
        if g.kind in ("qk", "v") and not g.cross:
            n = 3 if g.kind == "qk" else 5
            keep[g.id] = [h * g.head_dim + j for h in range(g.heads) for j in range(n)]
    result = Surgery(keep)(cap.gm)
    result.gm.graph.lint()
    from upop_fx.compare import relative_error
    from upop_fx.passes.surgery import removed_labels, zeroed_reference

    ref = zeroed_reference(cap.gm, removed_labels(analysis, keep))
    inputs = zoo.other_inputs
    with torch.no_grad():
        out = result.gm(**inputs) if isinstance(inputs, dict) else result.gm(*inputs)
        want = ref(**inputs) if isinstance(inputs, dict) else ref(*inputs)
    assert relative_error(out, want) <= 1e-4
    packed = [p for p in result.gm.parameters() if p.dim() == 2 and p.shape[0] == 4 * (3 + 3 + 5)]
    assert packed, "the packed projection keeps q, k (3 dims per head) and v (5 dims per head)"
