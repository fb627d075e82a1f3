"""The unified ranking: per-kind z-scores, the exact cost budget, at least one entry per structure."""

from __future__ import annotations

import numpy as np
import pytest

from upop_fx.ir.entries import Entry, Structure
from upop_fx.search.ranking import select_pruned, zscore_by_kind


def _entries(costs, kinds, structures):
    return [Entry(structure=s, kind=k, cost=c) for c, k, s in zip(costs, kinds, structures)]


def test_zscore_per_kind_removes_scale():
    z = zscore_by_kind(np.array([1.0, 2.0, 3.0, 100.0, 200.0, 300.0]), ["a"] * 3 + ["b"] * 3)
    np.testing.assert_allclose(z[:3], z[3:])
    assert zscore_by_kind(np.array([5.0, 5.0]), ["a", "a"]).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.33, 0.5, 0.9])
def test_budget_met_within_one_entry(ratio):
    rng = np.random.default_rng(0)
    n = 200
    costs = rng.integers(1, 50, n).astype(float)
    entries = _entries(costs, ["mlp"] * n, [i % 10 for i in range(n)])
    pruned = select_pruned(rng.normal(size=n), entries, [Structure("mlp", str(i), []) for i in range(10)], ratio)
    removed = costs[pruned].sum()
    assert ratio * costs.sum() <= removed < ratio * costs.sum() + costs.max()


def test_least_important_first_and_one_entry_kept():
    entries = _entries([1.0] * 4, ["mlp"] * 4, [0, 0, 1, 1])
    structures = [Structure("mlp", "a", []), Structure("mlp", "b", [])]
    pruned = select_pruned(np.array([0.0, 1.0, 2.0, 3.0]), entries, structures, 0.5)
    assert pruned.tolist() == [True, False, True, False]
    pruned = select_pruned(np.array([0.0, 1.0, 2.0, 3.0]), entries, structures, 0.99)
    assert pruned.sum() == 2  # each structure keeps one entry, whatever the ratio


@pytest.mark.parametrize("n", [2, 8])
def test_round_to_keeps_multiples_and_meets_budget(n):
    rng = np.random.default_rng(1)
    sizes = [64, 37, 16, 5]
    structure = np.repeat(np.arange(len(sizes)), sizes)
    costs = rng.integers(1, 9, len(structure)).astype(float)
    entries = _entries(costs, ["mlp"] * len(structure), structure.tolist())
    structures = [Structure("mlp", str(i), []) for i in range(len(sizes))]
    pruned = select_pruned(rng.normal(size=len(structure)), entries, structures, 0.5, round_to=n)
    assert costs[pruned].sum() >= 0.5 * costs.sum()
    for s, size in enumerate(sizes):
        kept = int((~pruned[structure == s]).sum())
        assert kept >= 1
        assert kept % n == 0 or kept == size, (s, kept)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.8])
def test_a_stacked_structure_keeps_a_multiple_of_its_own_in_both_allocations(ratio):
    from upop_fx.search.strategy import uniform

    rng = np.random.default_rng(2)
    sizes = [48, 30, 12]  # the first is stacked experts (multiple 8), the others plain MLPs
    structure = np.repeat(np.arange(len(sizes)), sizes)
    entries = _entries([1.0] * len(structure), ["mlp"] * len(structure), structure.tolist())
    structures = [Structure("mlp", "experts", [], multiple=8), Structure("mlp", "b", []), Structure("mlp", "c", [])]
    scores = rng.normal(size=len(structure))
    for pruned in (select_pruned(scores, entries, structures, ratio), uniform(scores, entries, structures, ratio)):
        kept = int((~pruned[structure == 0]).sum())
        assert kept % 8 == 0 and kept >= 8
        if ratio == 0.0:
            assert not pruned.any()
    if ratio > 0:  # the plain structures still go one entry at a time
        kept_b = [int((~p[structure == 1]).sum()) for p in (select_pruned(scores, entries, structures, ratio),)]
        assert kept_b[0] < 30


def test_round_to_through_compress():
    import torch

    import upop_fx

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 256, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    result = upop_fx.compress(model, torch.randn(2, 6, 64), ratio=0.5, round_to=8, method="magnitude", retrain_steps=0)
    assert result.report.prunable_cost_removed >= 0.5
    for row in result.report.groups:
        per_head = row.kept // (row.kept_heads or 1)
        assert per_head % 8 == 0 or row.kept == row.total, row
    with pytest.raises(upop_fx.ConfigError, match="round_to"):
        upop_fx.compress(model, torch.randn(2, 6, 64), ratio=0.5, round_to=0)


def _timed(per_entry: list[float], n: int) -> list[Structure]:
    """Structures of ``n`` entries whose measured tables save ``per_entry[s]`` of the latency per entry removed."""
    return [Structure("mlp", str(s), [], latency=np.array([(n - k) * x for k in range(n + 1)]))
            for s, x in enumerate(per_entry)]


def test_per_cost_takes_what_saves_most_time_per_importance_first():
    """Two structures alike in importance; one saves 5x more latency per entry. Ranked by importance alone the
    walk takes from both alike; per unit of latency saved it leaves the fast one nearly whole, and reaches the
    target with less importance removed."""
    n = 8
    scores = np.concatenate([np.arange(0.0, 2 * n, 2), np.arange(1.0, 2 * n, 2)])  # interleaved by importance
    entries = _entries([1.0] * 2 * n, ["mlp"] * 2 * n, [0] * n + [1] * n)
    structures = _timed([0.05, 0.01], n)
    by_score = select_pruned(scores, entries, structures, 0.2)
    per_cost = select_pruned(scores, entries, structures, 0.2, per_cost=True)
    assert per_cost[:n].sum() >= by_score[:n].sum() and per_cost[n:].sum() < by_score[n:].sum()
    saved = lambda p: 0.05 * p[:n].sum() + 0.01 * p[n:].sum()  # noqa: E731
    assert saved(per_cost) >= 0.2 and saved(by_score) >= 0.2
    from upop_fx.search.ranking import importance_by_kind

    imp = importance_by_kind(scores, ["mlp"] * 2 * n, np.ones(2 * n))
    assert imp[per_cost].sum() < imp[by_score].sum()


def test_importance_by_kind_is_non_negative_with_its_kinds_mean_cost_as_mean():
    from upop_fx.search.ranking import importance_by_kind

    costs = np.array([2.0, 2.0, 2.0, 1.0, 3.0, 2.0, 5.0, 5.0])
    imp = importance_by_kind(np.array([-3.0, 1.0, 2.0, 10.0, 10.0, 40.0, 7.0, 7.0]), ["a"] * 3 + ["b"] * 3 + ["c"] * 2,
                             costs)
    assert imp.min() == 0.0 and imp[:3].argmin() == 0
    np.testing.assert_allclose([imp[:3].mean(), imp[3:6].mean()], [2.0, 2.0])
    assert imp[6:].tolist() == [5.0, 5.0]  # a constant kind: its mean cost each


def test_per_cost_takes_a_flat_stretch_of_a_table_with_the_chunk_that_saves():
    """A table that saves nothing until its third entry goes (a kernel that only gets faster below a tile size):
    the first two entries are offered with the third, priced by what the three save together (0.1 per entry),
    and go before a structure that saves 0.05 per entry of the same importance. Priced alone, the first entry
    would save nothing and never go first."""
    tiled = np.array([0.5, 0.3, 0.3, 0.3, 0.0, 0.0, 0.0])  # index: entries kept
    linear = np.array([0.15, 0.1, 0.05, 0.0])
    entries = _entries([1.0] * 11, ["mlp"] * 11, [0] * 6 + [1] * 3 + [2] * 2)
    structures = [Structure("mlp", "tiled", [], latency=tiled), Structure("mlp", "linear", [], latency=linear),
                  Structure("mlp", "anchor", [], latency=np.zeros(3))]  # the kind's least important, never timed
    scores = np.array([1.0] * 9 + [0.0, 0.0])
    pruned = select_pruned(scores, entries, structures, 0.3, per_cost=True)
    assert pruned[:6].sum() == 3 and not pruned[6:].any()


def test_per_cost_without_tables_removes_the_costly_entry_of_equal_importance_first():
    entries = _entries([1.0, 4.0, 1.0, 4.0, 1.0], ["mlp"] * 5, [0, 0, 1, 1, 2])
    structures = [Structure("mlp", "a", []), Structure("mlp", "b", []), Structure("mlp", "one entry", [])]
    scores = np.array([0.0, 1.0, 0.0, 1.0, -10.0])  # the costly ones matter a little more, not 4x more
    assert select_pruned(scores, entries, structures, 0.2).tolist() == [True, False, True, False, False]
    assert select_pruned(scores, entries, structures, 0.2, per_cost=True).tolist() == [False, True, False, False, False]


def test_per_cost_through_compress():
    import torch

    import upop_fx

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    result = upop_fx.compress(model, torch.randn(2, 6, 32), ratio=0.4, method="magnitude", retrain_steps=0,
                              allocate="per_cost")
    assert result.report.prunable_cost_removed >= 0.4
    with pytest.raises(upop_fx.ConfigError, match="per_cost"):
        upop_fx.compress(model, torch.randn(2, 6, 32), ratio=0.4, allocate="per-cost")
