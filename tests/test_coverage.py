"""Layouts beyond the zoo's defaults are read as such: rotary pairs and grouped-query heads, experts stacked or as
modules, positional biases that fix the heads, per-head fused projections, weights applied twice or on the left of
a matmul (reported); the UPop search on modern layouts. Every zoo weight's coverage is in ``test_groups``."""

from __future__ import annotations

import pytest
import torch

import upop_fx
from upop_fx.ir.entries import STACKED_MULTIPLE
from upop_fx.passes import FindGroups, SortExperts
from upop_fx.passes.find_groups import unlisted_weights

from .models import ZOO


def test_rotary_pairs_and_grouped_heads():
    zoo = ZOO["llama"]()
    analysis = FindGroups()(upop_fx.capture(zoo.model, zoo.example_inputs).gm).value
    qk = next(g for g in analysis.prunable if g.kind == "qk")
    v = next(g for g in analysis.prunable if g.kind == "v")
    assert (qk.heads, qk.head_dim, qk.head_positions) == (2, 4, 8)  # 2 KV heads, 4 rotary pairs of 8 dims
    assert qk.positions(0) == [0, 4] and qk.positions(3) == [3, 7]  # rotate_half: j with j + d/2
    assert (v.heads, v.head_dim, v.dims) == (2, 8, None)
    gptj = ZOO["gptj"]()
    qk = next(g for g in FindGroups()(upop_fx.capture(gptj.model, gptj.example_inputs).gm).value.prunable
              if g.kind == "qk")
    assert qk.positions(0) == [0, 1] and qk.positions(1) == [2, 3]  # interleaved: 2i with 2i + 1
    assert qk.positions(2) == [4] and qk.head_positions == 8  # partial rotary: the other dims stay single


class ExpertMLP(torch.nn.Module):
    """Stacked expert weights (3-D) applied to every row by batched matmuls, the outputs mixed by a router."""

    def __init__(self, computed: bool = False) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(4, 16, 32) / 4)
        self.w2 = torch.nn.Parameter(torch.randn(4, 32, 16) / 6)
        self.router = torch.nn.Linear(16, 4)
        self.computed = computed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1 = self.w1 * 2 if self.computed else self.w1
        h = torch.relu(torch.bmm(x.unsqueeze(0).expand(4, -1, -1), w1))
        y = torch.bmm(h, self.w2)
        return x + (y * self.router(x).softmax(-1).t().unsqueeze(-1)).sum(0)


def test_stacked_experts_are_one_group_whose_channel_j_is_each_experts_jth_strongest_neuron():
    torch.manual_seed(0)
    model = ExpertMLP().eval()
    x = torch.randn(6, 16)
    result = upop_fx.compress(model, x, 0.5, method="magnitude", retrain_steps=0)
    (g,) = result.analysis.prunable
    assert (g.kind, g.experts, g.width) == ("mlp", 4, 32)
    kept = result.keep[g.id]
    assert len(kept) % STACKED_MULTIPLE == 0 and 0 < len(kept) < 32
    assert result.model.w1.shape == (4, 16, len(kept)) and result.model.w2.shape == (4, len(kept), 16)
    other = torch.randn(9, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), result.reference()(other))
    # channel j is each expert's j-th strongest neuron (by |w1 column| * |w2 row|): the experts keep their own
    score = (model.w1.detach().norm(dim=1).log() + model.w2.detach().norm(dim=2).log())  # (E, 32)
    chosen = []
    for e in range(4):
        rank = score[e].argsort(descending=True)
        rows = [int((model.w2[e] == r).all(dim=1).nonzero()[0]) for r in result.model.w2[e]]
        assert rows == rank[kept].tolist()
        chosen.append(frozenset(rows))
    assert len(set(chosen)) > 1


class ModuleListMoE(torch.nn.Module):
    """Experts as separate MLP modules, mixed by a top-2 router (every expert runs on every token)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = torch.nn.Linear(16, 4)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.router(x).softmax(-1)
        top, idx = weights.topk(2, dim=-1)
        gate = torch.zeros_like(weights).scatter(-1, idx, top)
        return x + sum(gate[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))


def test_experts_as_modules_are_one_group_each_pruned_independently_and_the_router_untouched():
    torch.manual_seed(0)
    model = ModuleListMoE().eval()
    result = upop_fx.compress(model, torch.randn(2, 5, 16), 0.5, method="magnitude", retrain_steps=0)
    mlp = [g for g in result.analysis.prunable if g.kind == "mlp"]
    assert [g.scope for g in mlp] == [f"experts.{e}" for e in range(4)] and not any(g.experts for g in mlp)
    kept = [len(result.keep[g.id]) for g in mlp]
    assert len(set(kept)) > 1  # each expert its own width
    assert result.model.router.weight.shape == (4, 16)
    other = torch.randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), result.reference()(other))


def test_sorting_the_experts_changes_no_output():
    torch.manual_seed(0)
    cap = upop_fx.capture(ExpertMLP().eval(), torch.randn(6, 16))
    FindGroups()(cap.gm)
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = cap.gm(x)
        assert SortExperts()(cap.gm).value == [0]
        torch.testing.assert_close(cap.gm(x), before)


def test_stacked_expert_weights_computed_in_the_forward_are_reported():
    cap = upop_fx.capture(ExpertMLP(computed=True).eval(), torch.randn(6, 16))
    analysis = FindGroups()(cap.gm).value
    reasons = [g.reason for g in analysis.groups if not g.prunable]
    assert any("bmm with a computed weight" in r for r in reasons), reasons


def test_alibi_bias_fixes_the_heads_and_heads_granularity_prunes_head_dims():
    zoo = ZOO["bloom"]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, 0.5, method="magnitude", retrain_steps=0,
                              granularity="heads")
    assert all(s.fixed_heads and "differs per head" in s.fixed_heads for s in result.analysis.sites)
    attn = [row for row in result.report.groups if row.kind in ("qk", "v")]
    assert all(row.kept_heads == row.heads for row in attn)  # every head stays, thinner
    assert any(row.kept < row.total for row in attn)
    with torch.no_grad():
        out, ref = result.model(**zoo.other_inputs), result.reference()(**zoo.other_inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_relative_position_bias_is_not_a_channel_and_fixes_the_heads():
    zoo = ZOO["mpnet"]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, 0.5, method="magnitude", retrain_steps=0, own_class=False,
                              granularity="heads")
    kinds = sorted(g.kind for g in result.analysis.prunable)
    assert kinds == ["mlp", "mlp", "qk", "qk", "v", "v"]  # v is not poisoned by the bias
    bias = [g for g in result.analysis.groups if "relative_attention_bias" in g.scope]
    assert bias and not bias[0].prunable and "spans a channel axis" in bias[0].reason
    assert all(s.fixed_heads for s in result.analysis.sites)
    with torch.no_grad():
        out = result.model(**zoo.other_inputs).last_hidden_state
        ref = result.reference()(**zoo.other_inputs).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_qk_v_on_a_per_head_fused_projection_shares_the_head_dim():
    """BLOOM's query_key_value is viewed as (B, T, H, 3, d): q, k and v must keep one head dim, so qk_v falls back
    to UPop's shared entries there instead of failing at the cut."""
    zoo = ZOO["bloom"]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, 0.5, method="magnitude", retrain_steps=0,
                              granularity="qk_v")
    rows = {(row.layer, row.kind): row.kept for row in result.report.groups}
    assert all(rows[(layer, "qk")] == rows[(layer, "v")] for layer in (0, 1))
    with torch.no_grad():
        out, ref = result.model(**zoo.other_inputs), result.reference()(**zoo.other_inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gptj", "bloom", "llava", "segformer", "mixtral"])
def test_upop_search_on_modern_layouts(name):
    """The masked search (masks on rotary pairs, grouped heads, fused and per-head projections, depthwise
    convolutions), then the cut: equal to the final masked model (checked inside) and to the zeroed reference."""
    zoo = ZOO[name]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, 0.5, search_steps=4, interval=2, retrain_steps=0)
    assert result.report.prunable_cost_removed >= 0.5
    with torch.no_grad():
        args = zoo.split(zoo.other_inputs)
        out, ref = result.model(*args[0], **args[1]), result.reference()(*args[0], **args[1])
    for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class SharedMLP(torch.nn.Module):
    """One MLP applied twice (ALBERT-style shared layers): its weight rows serve both applications."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 48), torch.nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = x + self.fc2(torch.relu(self.fc1(x)))
        return x


def test_a_weight_applied_twice_is_one_group():
    torch.manual_seed(0)
    model = SharedMLP().eval()
    result = upop_fx.compress(model, torch.randn(2, 5, 16), 0.5, method="magnitude", retrain_steps=0)
    mlp = [g for g in result.analysis.prunable if g.kind == "mlp"]
    assert len(mlp) == 1 and mlp[0].width == 48  # both applications' neurons are the same channels
    assert result.model.fc1.weight.shape[0] == len(result.keep[mlp[0].id]) < 48
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), result.reference()(x), rtol=1e-5, atol=1e-6)


def test_disentangled_attention_prunes_q_k_with_their_relative_projections():
    zoo = ZOO["deberta_v2"]()
    result = upop_fx.compress(zoo.model, zoo.example_inputs, 0.5, method="magnitude", retrain_steps=0)
    qk = [g for g in result.analysis.prunable if g.kind == "qk"]
    assert len(qk) == 2
    producers = {name.rsplit(".", 1)[0].rsplit(".", 1)[-1] for g in qk for name, _, _ in g.producers}
    assert {"query_proj", "key_proj", "pos_key_proj", "pos_query_proj"} <= producers
    with torch.no_grad():
        out = result.model(**zoo.other_inputs).last_hidden_state
        ref = result.reference()(**zoo.other_inputs).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_a_weight_on_the_left_of_a_matmul_is_reported():
    """``W @ x`` over an activation whose channels are on its last axis mixes rows (tokens), not channels: the
    weight's rows are listed as not prunable with its name instead of being missing from the report."""

    class LeftWeight(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)
            self.mix = torch.nn.Parameter(torch.randn(5, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mix @ self.fc(x)

    cap = upop_fx.capture(LeftWeight().eval(), torch.randn(2, 5, 16))
    analysis = FindGroups()(cap.gm).value
    assert unlisted_weights(cap.gm, analysis) == []
    reasons = [g.reason for g in analysis.groups if not g.prunable]
    assert any("its weight mix stands on the left (W @ x)" in (r or "") for r in reasons), reasons
