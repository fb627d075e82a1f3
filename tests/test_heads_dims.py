"""``granularity="heads+dims"``: whole heads and head dims in one ranking — a layer keeps ``h`` heads of ``j`` dims
(a rectangle of its q/k/v channels), the budget is met, the cut equals the zeroed reference, and the latency
tables of such a layer have a heads axis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upop_fx
from upop_fx.compare import relative_error
from upop_fx.errors import ConfigError
from upop_fx.ir.entries import Entry, Structure, build_entries, removed_fraction, widths
from upop_fx.runtime.latency_tables import _heads_table, _interpolate
from upop_fx.search.ranking import select_pruned

from .models import ZOO
from .simulated_runtime import SimulatedRuntime

#: zoo models with attention whose q/k and v share head dims (BLOOM's interleaved heads, ALiBi, do not mix)
MIXED = ["bert", "clip", "deit", "distilbert", "gpt2", "llama", "llava", "mixtral", "torch_transformer", "vit"]


def _call(module, inputs):
    with torch.no_grad():
        return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


def _rectangle(keep: list[int], heads: int, head_dim: int) -> tuple[int, int]:
    """(heads, dims) of a kept channel set that is a product of kept heads and kept dims; fails otherwise."""
    chans = np.zeros((heads, head_dim), dtype=bool)
    chans.flat[keep] = True
    rows = chans.any(axis=1)
    cols = chans.any(axis=0)
    assert np.array_equal(chans, np.outer(rows, cols)), "kept channels are not kept heads x kept dims"
    return int(rows.sum()), int(cols.sum())


@pytest.mark.parametrize("name", MIXED)
def test_heads_and_dims_cut_exact_rectangles_at_the_asked_cost(name):
    zoo = ZOO[name]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.5, method="magnitude", retrain_steps=0, own_class=False,
                              granularity="heads+dims", budget="flops")  # fmt: skip
    structures, entries = build_entries(result.analysis, "heads+dims", "flops")
    assert any(st.heads for st in structures), f"{name}: no layer mixes heads and dims"
    assert result.report.prunable_cost_removed >= 0.5
    groups = {g.id: g for g in result.analysis.prunable}
    for st in structures:
        if not st.heads:
            continue
        qk, v = (groups[g] for g in st.groups)
        h, _ = _rectangle(result.keep[qk.id], qk.heads, qk.head_dim)
        assert _rectangle(result.keep[v.id], v.heads, v.head_dim)[0] == h  # v keeps the same heads
    result.model.graph.lint()
    reference = result.reference()
    for inputs in (zoo.example_inputs, zoo.other_inputs):
        assert relative_error(_call(result.model, inputs), _call(reference, inputs)) <= 1e-4
    if result.module is not None:  # the caller's class, with per-layer head counts and head sizes
        assert relative_error(_call(result.module, zoo.example_inputs), _call(result.model, zoo.example_inputs)) <= 1e-4


def _mixed(head_z, dim_z, table=None):
    """One heads+dims structure (its head entries first, then its dims) with the given importances."""
    entries = [Entry(0, "head", cost=1.0, head=True) for _ in head_z] + [Entry(0, "attn", cost=1.0) for _ in dim_z]
    return entries, [Structure("attn", "a", [], heads=len(head_z), latency=table)]


def test_the_walk_removes_a_head_when_it_ranks_below_every_dim():
    # z-scored per kind: heads among heads, dims among dims; head 0 is the least important entry of all
    entries, structures = _mixed([-10.0, 1.0, 1.1, 1.2], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    scores = np.array([-10.0, 1.0, 1.1, 1.2, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    pruned = select_pruned(scores, entries, structures, 0.2)
    assert pruned[0] and widths(entries, structures, pruned)[0][0] == 3
    # the dims' cost counts what is still kept: a quarter of the channels went with the head
    assert removed_fraction(entries, pruned, structures) >= 0.2


def test_the_walk_never_removes_the_last_head_or_dim():
    entries, structures = _mixed([0.0, 0.1, 0.2], [0.0, 0.1, 0.2, 0.3])
    pruned = select_pruned(np.arange(7.0), entries, structures, 0.999)
    assert widths(entries, structures, pruned) == [(1, 1)]


def test_the_walk_reaches_the_asked_latency_on_a_heads_by_dims_table():
    dims = np.linspace(0.4, 0.0, 9)  # 8 dims
    table = _heads_table(4, dims, {2: 0.3, 1: 0.45})
    entries, structures = _mixed([0.3, -0.2, 0.1, 0.5], np.linspace(-1, 1, 8), table)
    scores = np.concatenate([[0.3, -0.2, 0.1, 0.5], np.linspace(-1, 1, 8)])
    for ratio in (0.1, 0.3):
        for per_cost in (False, True):
            pruned = select_pruned(scores, entries, structures, ratio, per_cost=per_cost)
            assert table[widths(entries, structures, pruned)[0]] >= ratio


def test_a_heads_by_dims_table_is_exact_on_both_measured_axes_and_monotone():
    dims = _interpolate(8, {6: 0.1, 4: 0.2, 2: 0.3, 1: 0.34})
    table = _heads_table(4, dims, {2: 0.3, 1: 0.45})
    assert table.shape == (5, 9) and table[4, 8] == 0.0
    assert np.allclose(table[4], dims)  # every head kept: the dims table
    assert table[2, 8] == pytest.approx(0.3) and table[1, 8] == pytest.approx(0.45)  # every dim kept: the heads
    assert np.all(np.diff(table, axis=0) <= 1e-12) and np.all(np.diff(table, axis=1) <= 1e-12)
    # two heads of four dims keep 8 channels, as four heads of two dims do, and save more: the heads' own work
    assert table[2, 4] > table[4, 2]


def test_uniform_allocation_thins_the_dims_and_keeps_the_heads():
    zoo = ZOO["bert"]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, 0.5, method="magnitude", retrain_steps=0,
                              granularity="heads+dims", allocate="uniform", budget="flops")  # fmt: skip
    assert result.report.prunable_cost_removed >= 0.45
    for g in result.analysis.prunable:
        if g.kind == "qk":
            h, j = _rectangle(result.keep[g.id], g.heads, g.head_dim)
            assert h == g.heads and j < g.head_dim


def test_a_latency_budget_ranks_heads_and_dims_unless_told_otherwise():
    from upop_fx.options import Options, resolve_granularity

    assert resolve_granularity(None, "latency") == "heads+dims" and resolve_granularity(None, "flops") == "upop"
    assert resolve_granularity("upop", "latency") == "upop"
    assert Options(budget="latency").resolved_granularity == "heads+dims"
    with pytest.raises(ConfigError, match="granularity must be one of"):
        Options(budget="latency", granularity="head")


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_the_upop_search_masks_heads_and_dims_together(name):
    """A channel's mask is its head's times its head dim's: at mask 1 the graph is the original (InsertMasks'
    check), the search's last masked model is what the cut reproduces (the pipeline's check), and the cut is
    kept heads x kept dims."""
    from upop_fx.passes import FindGroups, InsertMasks

    zoo = ZOO[name]()
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    analysis = FindGroups()(cap.gm).value
    state = InsertMasks(*build_entries(analysis, "heads+dims"))(cap.gm).value
    heads = [e for e in state.entries if e.head]
    assert heads and len(state.entries) == sum(b - a for a, b in state.entry_slices)
    result = upop_fx.compress(zoo.model, zoo.example_inputs, 0.5, granularity="heads+dims", budget="flops",
                              search_steps=6, interval=2, retrain_steps=0)  # fmt: skip
    assert result.report.prunable_cost_removed >= 0.5
    groups = {g.id: g for g in result.analysis.prunable}
    for g in result.analysis.prunable:
        if g.kind == "qk":
            _rectangle(result.keep[g.id], g.heads, g.head_dim)
    assert groups and result.model is not None


def test_a_latency_budget_with_heads_measures_a_heads_axis(tmp_path, monkeypatch):
    monkeypatch.setenv("UPOP_FX_CACHE", str(tmp_path))
    SimulatedRuntime().install(monkeypatch)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(128, 4, 1024, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(8, 64, 128)
    result = upop_fx.compress(model, x, 0.3, method="magnitude", retrain_steps=0, own_class=False, budget="latency",
                              runtime="torch-cpu")  # fmt: skip  # heads+dims: the latency budget's default
    import json

    stored = [json.loads(p.read_text()) for p in (tmp_path / "latency").glob("*.json")]
    assert any("heads" in s for s in stored)
    t = result.report.latency
    assert t["predicted_ms"] < t["dense_ms"] and t["measured_speedup"] > 0
    assert result.report.prunable_cost_removed >= t["rounds"][t["kept_round"]]["target"]
    assert result.report.granularity == "heads+dims"
