"""Weights that are views of a parameter (chunks of a packed projection, ``x @ W.T``, a fused gate/up weight):
the analysis ties the parameter's entries at the view's positions, surgery slices the parameter and rewrites
the view ops; every cut equals the zeroed reference at two shapes, and the graph lints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import upop_fx
from upop_fx.compare import relative_error

from .test_capture import CrossAttend


class CrossSameWidth(torch.nn.Module):
    """``nn.MultiheadAttention`` with query ≠ key/value: ``_in_projection_packed`` splits ``in_proj_weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(x, memory, memory, need_weights=False)[0]
        return h + self.fc2(torch.relu(self.fc1(h)))


class TransposedWeights(torch.nn.Module):
    """Falcon-style linears: ``x @ W.T + b`` (``aten.numpy_T`` + ``matmul``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(64, 32) / 6), torch.nn.Parameter(torch.randn(64) / 6)
        self.w2, self.b2 = torch.nn.Parameter(torch.randn(32, 64) / 8), torch.nn.Parameter(torch.randn(32) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


class FusedGateUp(torch.nn.Module):
    """A SwiGLU MLP with one fused ``gate_up`` weight, chunked in two (Phi-3 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = torch.nn.Linear(32, 128, bias=False)
        self.down = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up.weight.chunk(2, dim=0)
        return x + self.down(F.silu(F.linear(x, gate)) * F.linear(x, up))


CASES = {
    "mha_kdim_vdim": (CrossAttend, lambda b, t: (torch.randn(b, t, 32), torch.randn(b, t + 2, 16))),
    "mha_query_ne_key": (CrossSameWidth, lambda b, t: (torch.randn(b, t, 32), torch.randn(b, t + 3, 32))),
    "x_at_w_t": (TransposedWeights, lambda b, t: (torch.randn(b, t, 32),)),
    "fused_gate_up": (FusedGateUp, lambda b, t: (torch.randn(b, t, 32),)),
}
KINDS = {
    "mha_kdim_vdim": ["mlp", "qk", "v"], "mha_query_ne_key": ["mlp", "qk", "v"], "x_at_w_t": ["mlp"],
    "fused_gate_up": ["mlp"],
}  # fmt: skip


@pytest.mark.parametrize("granularity", ["upop", "qk_v", "heads"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_views_of_parameters_compress_exactly(name, granularity):
    torch.manual_seed(0)
    build, inputs = CASES[name]
    model = build().eval()
    result = upop_fx.compress(model, inputs(2, 5), 0.5, method="magnitude", retrain_steps=0, own_class=False, granularity=granularity)
    assert sorted(g.kind for g in result.analysis.prunable) == KINDS[name]
    assert result.report.params_after < result.report.params_before
    result.model.graph.lint()
    reference = result.reference()
    with torch.no_grad():
        for shape in ((2, 5), (3, 7)):
            x = inputs(*shape)
            assert relative_error(result.model(*x), reference(*x)) <= 1e-5, shape


def test_packed_bias_chunk_becomes_a_split_of_the_kept_sizes():
    torch.manual_seed(0)
    model = CrossAttend().eval()
    result = upop_fx.compress(model, (torch.randn(2, 5, 32), torch.randn(2, 7, 16)), 0.5, method="magnitude",
                              retrain_steps=0, own_class=False, granularity="qk_v")
    splits = [n for n in result.model.graph.nodes if n.target == torch.ops.aten.split_with_sizes.default]
    assert len(splits) == 1
    sizes = splits[0].args[1]
    kept = {g.kind: len(result.keep[g.id]) for g in result.analysis.prunable}
    assert sizes == [kept["qk"], kept["qk"], kept["v"]]
    assert result.model.get_submodule("attn").in_proj_bias.shape == (sum(sizes),)


def test_a_view_that_mixes_parameter_axes_is_refused():
    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 8))
            self.out = torch.nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.out(torch.relu(x @ self.w.reshape(8, 16)))  # a reshape is not followed

    cap = upop_fx.capture(Mixed().eval(), torch.randn(2, 3, 8))
    analysis = upop_fx.passes.FindGroups()(cap.gm).value
    assert not analysis.prunable
    assert any("computed" in (g.reason or "") for g in analysis.groups), [g.reason for g in analysis.groups]
