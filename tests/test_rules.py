"""Per-rule unit tests: each channel rule of ``upop_fx/passes/rules`` on a minimal captured graph.

Every test captures a few lines of torch (tiny sizes, batch 2) and runs the :class:`LabelTracer` alone, then
checks what the rule produced: the block on the node (axes, labels shape, outer factors, ``zero``), the
parameter uses it recorded, the union-find roots it coupled, the attention sites, and the reason text where it
refuses. Rewrites are called with a small stand-in for surgery's context (old and new blocks, removed labels).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import upop_fx
from upop_fx.ir.groups import DIMS_KEY, Block
from upop_fx.passes import FindGroups, Surgery
from upop_fx.passes.rules import REWRITES, RULES, SEEDING, key_of
from upop_fx.passes.rules._util import dim_expr
from upop_fx.passes.surgery import removed_labels, zeroed_reference
from upop_fx.passes.trace import LabelTracer

aten = torch.ops.aten
NOT_ZERO = "a removed channel would not be exactly zero at this matmul input"


# --------------------------------------------------------------------------------------------- helpers
class Net(nn.Module):
    """A module whose forward is ``fn(self, *inputs)``; keyword arguments become its submodules/parameters."""

    def __init__(self, fn: Callable[..., Any], **parts: Any) -> None:
        super().__init__()
        for name, part in parts.items():
            setattr(self, name, part)
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.fn(self, *inputs)


def _p(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape))


class Traced:
    """A captured graph after :class:`LabelTracer` ran on it, with accessors for assertions."""

    def __init__(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], parts: dict[str, Any]) -> None:
        torch.manual_seed(0)
        self.model = Net(fn, **parts).eval()
        self.inputs = inputs
        self.gm = upop_fx.capture(self.model, inputs if len(inputs) > 1 else inputs[0]).gm
        self.tracer = LabelTracer(self.gm)
        self.tracer.run()

    def nodes(self, target: Any) -> list[torch.fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function" and key_of(n.target) == key_of(target)]

    def node(self, target: Any, i: int = 0) -> torch.fx.Node:
        return self.nodes(target)[i]

    def placeholder(self, i: int = 0) -> torch.fx.Node:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"][i]

    @staticmethod
    def block(node: torch.fx.Node) -> Any:
        return node.meta[DIMS_KEY]

    def use(self, param: str, role: str) -> Any:
        found = [u for u in self.tracer.uses if u.name == param and u.role == role]
        assert len(found) == 1, (param, role, [(u.name, u.role) for u in self.tracer.uses])
        return found[0]

    def has_use(self, param: str, role: str | None = None) -> bool:
        return any(u.name == param and (role is None or u.role == role) for u in self.tracer.uses)

    def labels(self, param: str) -> np.ndarray:
        """The labels a parameter produces (its one ``out`` use)."""
        return self.use(param, "out").labels

    def roots(self, labels: Any) -> np.ndarray:
        return self.tracer.roots()[np.asarray(labels)]

    def reasons(self, labels: Any) -> list[str]:
        """Refusal reasons recorded on any label of the classes of ``labels``."""
        roots = self.tracer.roots()
        want = set(roots[np.asarray(labels).reshape(-1)].tolist())
        return sorted({r for lab, r in self.tracer.refusals.items() if roots[lab] in want})

    def reason(self, labels: Any) -> str:
        return " | ".join(self.reasons(labels))


def trace(fn: Callable[..., Any], *inputs: torch.Tensor, **parts: Any) -> Traced:
    return Traced(fn, inputs, parts)


def x3(t: int = 5, c: int = 4) -> torch.Tensor:
    return torch.randn(2, t, c)


class RewriteCtx:
    """What a rewrite sees (mirrors surgery's context): old blocks from the tracer, new blocks given here."""

    def __init__(self, tr: Traced, removed: Any = (), new: dict[str, Any] | None = None) -> None:
        self.removed = np.zeros(len(tr.tracer.parent), dtype=bool)
        self.removed[list(removed)] = True
        self.new = new or {}

    def old_block(self, node: Any) -> Any:
        return node.meta.get(DIMS_KEY) if isinstance(node, torch.fx.Node) else None

    def new_block(self, node: Any) -> Any:
        if not isinstance(node, torch.fx.Node):
            return None
        return self.new.get(node.name, node.meta.get(DIMS_KEY))

    def kept_positions(self, node: torch.fx.Node, i: int) -> list[int]:
        kept = ~self.removed[self.old_block(node).labels]
        other = tuple(j for j in range(kept.ndim) if j != i)
        return np.nonzero(kept.any(axis=other) if other else kept)[0].tolist()


def _heads(b: Block, i: int, keep: Any) -> Block:
    return Block(b.axes, np.take(b.labels, keep, axis=i), b.outer, b.zero)


# --------------------------------------------------------------------------------------------- registry
def test_registry_tables():
    assert key_of(aten.linear.default) is aten.linear
    assert key_of(operator.getitem) is operator.getitem
    for op in (aten.linear, aten.addmm, aten.mm, aten.matmul, aten.bmm, aten.conv2d, aten.convolution,
               aten.embedding):
        assert op in SEEDING and op in RULES
    for op in (aten.relu, aten.sigmoid, aten.add, aten.layer_norm, aten.softmax, aten.mean, aten.view,
               aten.permute, aten.expand, aten.split, aten.select, aten.slice, aten.cat,
               aten.scaled_dot_product_attention):
        assert op in RULES and op not in SEEDING
    assert aten.cumsum not in RULES
    assert set(REWRITES) == {
        aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.unflatten, aten.split,
        aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.select, aten.slice,
        aten.scaled_dot_product_attention, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- tracer
def test_tracer_does_not_modify_graph_or_outputs():
    def fn(m, x):
        B, T, _ = x.shape
        q, k, v = m.qkv(x).view(B, T, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        return m.o(F.gelu(a.transpose(1, 2).reshape(B, T, 4)))

    torch.manual_seed(0)
    model = Net(fn, qkv=nn.Linear(4, 12), o=nn.Linear(4, 4)).eval()
    x = x3()
    gm = upop_fx.capture(model, x).gm
    before_graph, before_code, before_out = str(gm.graph), gm.code, gm(x)
    tracer = LabelTracer(gm)
    tracer.run()
    assert len(tracer.sites) == 1 and tracer.uses  # it did analyse the graph
    gm.graph.lint()
    assert str(gm.graph) == before_graph and gm.code == before_code
    torch.testing.assert_close(gm(x), before_out, rtol=0, atol=0)
    torch.testing.assert_close(gm(x), model(x))


def test_op_without_rule_is_refused():
    tr = trace(lambda m, x: m.b(torch.cumsum(m.a(x), dim=-1)), x3(), a=nn.Linear(4, 6), b=nn.Linear(6, 3))
    cumsum = tr.node(aten.cumsum)
    assert tr.block(cumsum) is None
    assert tr.reasons(tr.labels("a.weight")) == [f"node {cumsum.name} (aten.cumsum.default): no channel rule for "
                                                 "aten.cumsum.default"]
    assert not tr.has_use("b.weight", "in")  # nothing follows the labels past the op


def test_channels_reaching_output_are_refused():
    tr = trace(lambda m, x: (m.a(x), m.b(x).sum(-1)), x3(), a=nn.Linear(4, 6), b=nn.Linear(4, 3))
    assert tr.reasons(tr.labels("a.weight")) == ["node output (output): its channels reach the model output"]
    assert "reduction over channels" in tr.reason(tr.labels("b.weight"))


# --------------------------------------------------------------------------------------------- linear.py
def test_linear_seeds_out_uses_and_next_linear_consumes():
    tr = trace(lambda m, x: m.b(torch.relu(m.a(x))).sum(-1), x3(), a=nn.Linear(4, 6), b=nn.Linear(6, 3))
    first, second = tr.nodes(aten.linear)
    b1 = tr.block(first)
    assert b1.axes == (2,) and b1.labels.shape == (6,) and b1.outer == (1,) and b1.zero
    w, bias = tr.use("a.weight", "out"), tr.use("a.bias", "out")
    assert (w.axis, bias.axis, w.node) == (0, 0, first.name)
    np.testing.assert_array_equal(w.labels, b1.labels)
    np.testing.assert_array_equal(bias.labels, b1.labels)
    assert w.flops == 2 * 10 * 24 / 6  # 10 rows (2x5 tokens), 24 weights, per output feature
    consumed = tr.use("b.weight", "in")
    assert consumed.axis == 1 and consumed.node == second.name and consumed.flops == 2 * 10 * 3
    np.testing.assert_array_equal(consumed.labels, b1.labels)
    b2 = tr.block(second)
    assert b2.axes == (2,) and b2.labels.shape == (3,)
    assert not set(b2.labels.tolist()) & set(b1.labels.tolist())  # fresh labels
    assert len(set(tr.roots(np.concatenate([b1.labels, b2.labels])).tolist())) == 9  # nothing coupled
    assert [name for name, _ in tr.tracer.seeds] == [first.name, second.name]
    assert tr.reasons(b1.labels) == []


def test_a_parameter_expanded_to_a_labelled_activation_carries_none_of_its_channels():
    """Segmenter's class tokens: ``cls.expand_as(h)`` with ``h`` labelled by a Linear; the output joins the
    stream by ``cat`` as plain values, and the Linear's channels stay prunable."""
    def fn(m, x):
        h = m.a(x)
        return m.b(torch.relu(torch.cat([h, m.cls.expand_as(h)], dim=1))).sum(-1)

    tr = trace(fn, x3(), a=nn.Linear(4, 6), b=nn.Linear(6, 3), cls=_p(1, 5, 6))
    assert tr.block(tr.node(aten.expand_as if tr.nodes(aten.expand_as) else aten.expand, 0)) is None
    assert tr.reasons(tr.labels("a.weight"))  # the cat with unlabelled values: the a-channels are refused, no crash


def test_linear_with_computed_weight_is_refused():
    tr = trace(lambda m, x: F.linear(m.a(x), m.w * 2.0).sum(-1), x3(), a=nn.Linear(4, 6), w=_p(3, 6))
    lin = tr.node(aten.linear, 1)
    assert tr.block(lin) is None
    assert "linear with a computed (non-parameter) weight" in tr.reason(tr.labels("a.weight"))
    assert f"node {lin.name} " in tr.reason(tr.labels("a.weight"))


def test_addmm_with_in_out_parameter_gpt2_conv1d():
    def fn(m, x):
        B, T, _ = x.shape
        h = torch.addmm(m.b1, x.view(-1, 4), m.w1).view(B, T, 6)
        return torch.addmm(m.b2, h.view(-1, 6), m.w2).sum(-1)

    tr = trace(fn, x3(), w1=_p(4, 6), b1=_p(6), w2=_p(6, 3), b2=_p(3))
    first, second = tr.nodes(aten.addmm)
    b = tr.block(first)
    assert b.axes == (1,) and b.labels.shape == (6,)
    assert tr.use("w1", "out").axis == 1 and tr.use("b1", "out").axis == 0  # W is [in, out]
    np.testing.assert_array_equal(tr.use("b1", "out").labels, b.labels)
    assert tr.block(tr.node(aten.view, 1)).axes == (2,)  # back to (B, T, 6)
    consumed = tr.use("w2", "in")
    assert consumed.axis == 0 and consumed.node == second.name
    np.testing.assert_array_equal(consumed.labels, b.labels)
    assert tr.block(second).labels.shape == (3,) and tr.use("w2", "out").axis == 1


def test_matmul_with_parameter_weight():
    tr = trace(lambda m, x: m.o(x @ m.w).sum(-1), x3(), w=_p(4, 6), o=nn.Linear(6, 2))
    mm = tr.node(aten.matmul)
    assert tr.block(mm).axes == (2,) and tr.use("w", "out").axis == 1
    np.testing.assert_array_equal(tr.use("o.weight", "in").labels, tr.labels("w"))


def test_a_parameter_on_the_left_of_a_matmul_seeds_the_second_last_axis():
    """``W1 @ x`` (channels first: a token-mixing MLP): x's axis -2 meets W1's columns, the output's axis -2 carries
    W1's rows, a bias of shape [out, 1] follows them, and ``W2 @ h`` consumes them."""
    def fn(m, x):  # x: (B, 4, T)
        return (m.w2 @ torch.relu(m.w1 @ x + m.b1)).sum(-1)

    tr = trace(fn, torch.randn(2, 4, 5), w1=_p(6, 4), b1=_p(6, 1), w2=_p(3, 6))
    first, second = tr.nodes(aten.matmul)
    b = tr.block(first)
    assert b.axes == (1,) and b.labels.shape == (6,)
    assert tr.use("w1", "out").axis == 0
    consumed = tr.use("w2", "in")
    assert consumed.axis == 1 and consumed.node == second.name
    np.testing.assert_array_equal(consumed.labels, b.labels)
    assert tr.reasons(b.labels) == []


def test_channels_on_the_last_axis_pass_through_a_weight_on_the_left():
    """``mix @ h`` with ``h``'s channels on its last axis mixes its rows: every column, a removed (zero) one
    included, is kept, so ``fc``'s channels reach ``o`` and stay prunable."""
    tr = trace(lambda m, x: m.o(m.mix @ F.gelu(m.fc(x))).sum(-1), x3(), fc=nn.Linear(4, 6), mix=_p(5, 5),
               o=nn.Linear(6, 2))
    mm = tr.block(tr.node(aten.matmul))
    assert mm.axes == (2,) and mm.zero
    np.testing.assert_array_equal(mm.labels, tr.labels("fc.weight"))
    np.testing.assert_array_equal(tr.use("o.weight", "in").labels, tr.labels("fc.weight"))
    assert tr.reasons(tr.labels("fc.weight")) == []


def test_a_token_mixing_mlp_with_weights_on_the_left_is_cut_exactly():
    """Hidden channels of ``W2 @ gelu(W1 @ x + b1)`` are pruned; with the removed ones dead in the original, the
    cut computes exactly what it did, the class comes back, and the zeroed reference agrees at another batch."""
    def fn(m, x):
        return x + m.w2 @ F.gelu(m.w1 @ x + m.b1)

    torch.manual_seed(0)
    model = Net(fn, w1=_p(32, 8), b1=_p(32, 1), w2=_p(8, 32)).eval()
    with torch.no_grad():  # the 16 smallest hidden channels feed nothing: removing them changes nothing
        model.w1.mul_(torch.linspace(0.1, 1.0, 32)[:, None])
        model.w2[:, :16] = 0.0
    x = torch.randn(2, 8, 5)
    result = upop_fx.compress(model, x, 0.4, "magnitude", retrain_steps=0)
    mlp = [g for g in result.report.groups if g.kind == "mlp"]
    assert len(mlp) == 1 and mlp[0].kept < 32
    result.model.graph.lint()
    assert type(result.module) is Net and result.module.w1.shape[0] == mlp[0].kept
    other = torch.randn(3, 8, 5)
    with torch.no_grad():
        torch.testing.assert_close(result.module(other), model(other))  # exact: only dead channels went
        torch.testing.assert_close(result.model(other), result.module(other))
        torch.testing.assert_close(result.model(other), result.reference()(other))


def test_addmm_with_computed_weight_is_refused():
    def fn(m, x):
        return torch.addmm(m.b, m.a(x).view(-1, 6), m.w * 1.0).sum(-1)

    tr = trace(fn, x3(), a=nn.Linear(4, 6), w=_p(6, 3), b=_p(3))
    assert tr.block(tr.node(aten.addmm)) is None
    assert "addmm with a computed weight" in tr.reason(tr.labels("a.weight"))


def test_conv2d_seeds_channels_on_axis_1():
    tr = trace(lambda m, x: m.d(torch.relu(m.c(x))).sum(1), torch.randn(2, 3, 5, 5),
               c=nn.Conv2d(3, 4, 3, padding=1), d=nn.Conv2d(4, 5, 3, padding=1))
    c1, c2 = tr.nodes(aten.conv2d)
    b = tr.block(c1)
    assert b.axes == (1,) and b.labels.shape == (4,) and b.zero
    assert tr.use("c.weight", "out").axis == 0 and tr.use("c.bias", "out").axis == 0
    consumed = tr.use("d.weight", "in")
    assert consumed.axis == 1 and consumed.node == c2.name
    np.testing.assert_array_equal(consumed.labels, b.labels)
    assert tr.block(c2).axes == (1,) and tr.block(c2).labels.shape == (5,)
    assert tr.reasons(b.labels) == []


def test_depthwise_conv_passes_channels_through():
    tr = trace(lambda m, x: m.d(m.c(x)).sum(1), torch.randn(2, 3, 5, 5),
               c=nn.Conv2d(3, 4, 1), d=nn.Conv2d(4, 4, 3, padding=1, groups=4))
    depthwise = tr.node(aten.conv2d, 1)
    assert tr.block(depthwise).axes == (1,)
    assert (tr.block(depthwise).labels == tr.labels("c.weight")).all()
    assert tr.has_use("d.weight") and tr.has_use("d.bias")


def test_grouped_conv_is_refused():
    tr = trace(lambda m, x: m.d(m.c(x)).sum(1), torch.randn(2, 3, 5, 5),
               c=nn.Conv2d(3, 4, 1), d=nn.Conv2d(4, 4, 3, padding=1, groups=2))
    grouped = tr.node(aten.conv2d, 1)
    assert tr.block(grouped) is None
    assert not tr.has_use("d.weight")
    assert tr.reasons(tr.labels("c.weight")) == [
        f"node {grouped.name} (aten.conv2d.default): convolution with groups, transposition or a computed weight"
    ]


def test_transposed_conv_is_refused():
    tr = trace(lambda m, x: m.d(m.c(x)).sum(1), torch.randn(2, 3, 4, 4), c=nn.Conv2d(3, 4, 1),
               d=nn.ConvTranspose2d(4, 2, 2))
    assert not tr.has_use("d.weight")
    reason = tr.reason(tr.labels("c.weight"))
    assert "conv_transpose2d" in reason or "transposition" in reason


def test_embedding_seeds_and_linear_consumes():
    tr = trace(lambda m, ids: m.o(m.e(ids)).sum(-1), torch.randint(0, 10, (2, 5)), e=nn.Embedding(10, 6),
               o=nn.Linear(6, 2))
    emb = tr.node(aten.embedding)
    b = tr.block(emb)
    assert b.axes == (2,) and b.labels.shape == (6,)
    assert tr.use("e.weight", "out").axis == 1
    assert [name for name, _ in tr.tracer.seeds][0] == emb.name  # seeded without labelled inputs
    np.testing.assert_array_equal(tr.use("o.weight", "in").labels, b.labels)


def test_embedding_indices_carrying_channels_are_refused():
    a = nn.Linear(4, 3)
    nn.init.zeros_(a.weight)
    nn.init.ones_(a.bias)
    tr = trace(lambda m, x: m.e(m.a(x).long()).sum(-1), torch.randn(2, 4), a=a, e=nn.Embedding(10, 6))
    assert "channels used as embedding indices" in tr.reason(tr.labels("a.weight"))
    assert tr.block(tr.node(aten.embedding)).labels.shape == (6,)  # the table's own dims still seeded


def test_linear_over_a_non_channel_axis_refuses_the_channels():
    def fn(m, x):
        return m.o(m.t(m.a(x).transpose(1, 2)).transpose(1, 2)).sum(-1)  # MLP-Mixer token mixing

    tr = trace(fn, x3(), a=nn.Linear(4, 6), t=nn.Linear(5, 5), o=nn.Linear(6, 2))
    assert "non-contracted axis" in tr.reason(tr.labels("a.weight"))


# --------------------------------------------------------------------------------------------- elementwise.py
def test_residual_add_unions_streams():
    tr = trace(lambda m, x: m.o(m.a(x) + m.b(x)).sum(-1), x3(), a=nn.Linear(4, 6), b=nn.Linear(4, 6),
               o=nn.Linear(6, 2))
    la, lb = tr.labels("a.weight"), tr.labels("b.weight")
    assert not np.array_equal(la, lb)
    np.testing.assert_array_equal(tr.roots(la), tr.roots(lb))
    assert len(set(tr.roots(la).tolist())) == 6  # elementwise, not all into one class
    add = tr.block(tr.node(aten.add))
    assert add.axes == (2,) and add.zero
    np.testing.assert_array_equal(tr.use("o.weight", "in").labels, la)


def test_parameter_spanning_channels_becomes_out_use():
    def fn(m, x):
        return m.o((m.a(x) * m.g) + m.pos).sum(-1)

    tr = trace(fn, x3(), a=nn.Linear(4, 6), g=nn.Parameter(torch.ones(6)), pos=_p(1, 5, 6), o=nn.Linear(6, 2))
    la = tr.labels("a.weight")
    g, pos = tr.use("g", "out"), tr.use("pos", "out")
    assert g.axis == 0 and pos.axis == 2
    np.testing.assert_array_equal(g.labels, la)
    np.testing.assert_array_equal(pos.labels, la)
    assert tr.block(tr.node(aten.add)).zero  # the bias entry is removed with its channel
    assert tr.reasons(la) == []


def test_operand_of_unknown_channels_is_refused():
    tr = trace(lambda m, x, y: m.o(m.a(x) + y).sum(-1), x3(), torch.randn(2, 5, 6), a=nn.Linear(4, 6),
               o=nn.Linear(6, 2))
    add, y = tr.node(aten.add), tr.placeholder(1)
    assert add.args[1] is y
    assert tr.reasons(tr.labels("a.weight")) == [
        f"node {add.name} (aten.add.Tensor): operand {y.name} of unknown channels spans a channel axis"
    ]


def test_operands_with_channels_on_different_axes_are_refused():
    tr = trace(lambda m, x: (m.a(x) + m.b(x).transpose(1, 2)).sum(), x3(t=6), a=nn.Linear(4, 6),
               b=nn.Linear(4, 6))
    assert tr.block(tr.node(aten.add)) is None
    for p in ("a.weight", "b.weight"):
        assert "operands carry channels on different axes" in tr.reason(tr.labels(p))
    assert tr.roots(tr.labels("a.weight")).tolist() != tr.roots(tr.labels("b.weight")).tolist()


def _quick_gelu(h: torch.Tensor) -> torch.Tensor:
    return h * torch.sigmoid(1.702 * h)


@pytest.mark.parametrize(
    "act, zero",
    [
        (torch.relu, True), (F.gelu, True), (F.silu, True), (torch.tanh, True),
        (lambda h: h * 3.0, True), (lambda h: h / 2.0, True), (lambda h: h**2, True), (_quick_gelu, True),
        (lambda h: torch.square(torch.relu(h)), True),  # squared ReLU (aten.square)
        (torch.sigmoid, False), (torch.exp, False), (lambda h: h + 1.0, False), (lambda h: 2.0 / h, False),
    ],
    ids=["relu", "gelu", "silu", "tanh", "mul_scalar", "div_scalar", "square", "quick_gelu", "squared_relu",
         "sigmoid", "exp", "add_scalar", "reciprocal"],
)  # fmt: skip
def test_zero_tracking_through_activations(act, zero):
    tr = trace(lambda m, x: m.b(m.f(m.a(x))).sum(-1), x3(), a=nn.Linear(4, 6), b=nn.Linear(6, 2), f=_Fn(act))
    consumer = tr.node(aten.linear, 1)
    assert tr.block(consumer.args[0]).zero is zero
    assert tr.block(consumer.args[0]).labels.shape == (6,)
    reasons = tr.reasons(tr.labels("a.weight"))
    if zero:
        assert reasons == []
    else:
        assert reasons == [f"node {consumer.name} (aten.linear.default): {NOT_ZERO}"]
    assert tr.has_use("b.weight", "in")  # the use is still recorded; the class is refused


class _Fn(nn.Module):
    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.f = f

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.f(h)


def test_broadcast_of_unlabelled_activation():
    def fn(m, x, y):
        h = m.a(x)
        return m.o1(h * y).sum(-1), m.o2(m.b(x) + y).sum(-1)  # y: (B, T, 1)

    tr = trace(fn, x3(), torch.randn(2, 5, 1), a=nn.Linear(4, 6), b=nn.Linear(4, 6), o1=nn.Linear(6, 2),
               o2=nn.Linear(6, 2))
    assert tr.block(tr.node(aten.mul)).zero  # 0 * y = 0
    assert not tr.block(tr.node(aten.add)).zero  # 0 + y != 0
    assert tr.reasons(tr.labels("a.weight")) == []
    assert NOT_ZERO in tr.reason(tr.labels("b.weight"))


def test_pow_with_scalar_base_is_not_zero_preserving():
    tr = trace(lambda m, x: m.b(torch.pow(2.0, m.a(x))).sum(-1), x3(), a=nn.Linear(4, 6), b=nn.Linear(6, 2))
    assert not tr.block(tr.node(aten.pow)).zero
    assert NOT_ZERO in tr.reason(tr.labels("a.weight"))


def test_division_by_a_removed_channel_is_not_zero():
    tr = trace(lambda m, x: m.o(m.a(x) / m.b(x)).sum(-1), x3(), a=nn.Linear(4, 6), b=nn.Linear(4, 6),
               o=nn.Linear(6, 2))
    assert not tr.block(tr.node(aten.div)).zero


def test_layer_norm_over_channels_is_refused_and_records_affine_uses():
    tr = trace(lambda m, x: m.o(m.ln(m.a(x))).sum(-1), x3(), a=nn.Linear(4, 6), ln=nn.LayerNorm(6),
               o=nn.Linear(6, 2))
    ln = tr.node(aten.layer_norm)
    la = tr.labels("a.weight")
    b = tr.block(ln)
    assert b.axes == (2,) and not b.zero
    np.testing.assert_array_equal(tr.use("ln.weight", "out").labels, la)
    np.testing.assert_array_equal(tr.use("ln.bias", "out").labels, la)
    assert (f"node {ln.name} (aten.layer_norm.default): normalisation statistics change when channels are "
            "removed") in tr.reasons(la)


def test_softmax_over_channels_and_over_tokens():
    tr = trace(lambda m, x: (torch.softmax(m.a(x), -1).sum(), m.o(torch.softmax(m.b(x), 1)).sum(-1)), x3(),
               a=nn.Linear(4, 6), b=nn.Linear(4, 6), o=nn.Linear(6, 2))
    over_c, over_t = tr.nodes(aten.softmax)
    assert tr.block(over_c) is None
    assert tr.reasons(tr.labels("a.weight")) == [f"node {over_c.name} (aten.softmax.int): softmax over channels"]
    b = tr.block(over_t)
    assert b.axes == (2,) and not b.zero
    np.testing.assert_array_equal(b.labels, tr.labels("b.weight"))
    assert tr.reasons(tr.labels("b.weight")) == [f"node {tr.node(aten.linear, 2).name} (aten.linear.default): "
                                                 f"{NOT_ZERO}"]


def test_reductions():
    def fn(m, x):
        return (m.o1(m.a(x).mean(1)).sum(-1), m.o2(m.b(x).sum(1, keepdim=True)).sum(-1), m.c(x).amax(-1))

    tr = trace(fn, x3(), a=nn.Linear(4, 6), b=nn.Linear(4, 6), c=nn.Linear(4, 6), o1=nn.Linear(6, 2),
               o2=nn.Linear(6, 2))
    mean = tr.block(tr.node(aten.mean))
    assert mean.axes == (1,) and mean.zero  # token axis removed: the channel axis moves from 2 to 1
    keep = tr.block(next(n for n in tr.nodes(aten.sum) if n.args[1] == [1]))
    assert keep.axes == (2,)
    amax = tr.node(aten.amax)
    assert tr.block(amax) is None
    assert tr.reasons(tr.labels("c.weight")) == [f"node {amax.name} (aten.amax.default): reduction over channels"]
    assert tr.reasons(tr.labels("a.weight")) == [] and tr.reasons(tr.labels("b.weight")) == []


def test_a_norm_over_each_heads_dims_makes_a_head_one_class():
    """A reduction over a head's dims (a per-head RMSNorm, decomposed or ``F.layer_norm`` over the last axis)
    with the heads axis still labelled: a head goes whole or not at all, so its dims are one class; the norm's
    weight runs within every head and is never cut; a norm over the only labelled axis is still refused."""

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def fn(m, x):
        B, T, _ = x.shape
        q = rms(m.a(x).view(B, T, 3, 4), m.w)  # decomposed RMSNorm per head
        k = torch.nn.functional.layer_norm(m.b(x).view(B, T, 3, 4), (4,), m.ln.weight)
        return m.o(torch.cat([q, k], -1).flatten(2)).sum(-1), m.o2(rms(m.c(x), m.w6)).sum(-1)

    tr = trace(fn, x3(), a=nn.Linear(4, 12), b=nn.Linear(4, 12), c=nn.Linear(4, 6), w=_p(4), w6=_p(6),
               ln=nn.LayerNorm(4), o=nn.Linear(24, 2), o2=nn.Linear(6, 2))
    for name in ("a.weight", "b.weight"):
        heads = tr.roots(tr.labels(name)).reshape(3, 4)
        assert (heads == heads[:, :1]).all() and len(set(heads[:, 0].tolist())) == 3, heads
        assert tr.reasons(tr.labels(name)) == []
    assert not tr.has_use("w") and not tr.has_use("ln.weight")  # shared by whole heads: never sliced
    mean = tr.node(aten.mean)
    slices = {tr.tracer.find(k): v for k, v in tr.tracer.slices.items()}
    assert slices[int(tr.roots(tr.labels("a.weight"))[0])].startswith(f"node {mean.name} (aten.mean.dim)")
    assert tr.block(mean).axes == (2,) and tr.block(mean).labels.shape == (3,)
    whole = tr.nodes(aten.mean)[1]  # the RMSNorm over all of c's channels
    assert tr.reasons(tr.labels("c.weight")) == [f"node {whole.name} (aten.mean.dim): reduction over channels"]


def test_per_head_norm_heads_are_cut_exactly_in_the_graph_and_the_class():
    """q/k under a per-head RMSNorm (Qwen3's layout): the heads go whole, the cut graph equals the zeroed
    reference, and the model's own class comes back."""
    from tests.models import get

    zoo = get("qwen3")
    result = upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.5, method="magnitude", retrain_steps=0)
    qk = [g for g in result.analysis.prunable if g.kind == "qk"]
    assert qk and all(g.whole_heads and "a per-head norm" in g.whole_heads for g in qk)
    assert len(result.report.whole_heads) == len(qk) and result.report.class_limits == []
    assert any(row.kept_heads < row.heads for row in result.report.groups if row.kind == "qk")
    assert type(result.module) is type(zoo.model)
    with torch.no_grad():
        torch.testing.assert_close(result.model(**zoo.other_inputs), result.reference()(**zoo.other_inputs))


# --------------------------------------------------------------------------------------------- shape.py
def test_view_splits_channels_into_heads_and_permutes():
    def fn(m, x):
        B, T, _ = x.shape
        h = m.a(x).view(B, T, 2, 3).permute(0, 2, 1, 3)  # (B, H, T, d)
        return m.o(h.transpose(1, 2).reshape(B, T, 6)).sum(-1)

    tr = trace(fn, x3(), a=nn.Linear(4, 6), o=nn.Linear(6, 2))
    la = tr.labels("a.weight")
    view = tr.block(tr.node(aten.view))
    assert view.axes == (2, 3) and view.outer == (1, 1)
    np.testing.assert_array_equal(view.labels, la.reshape(2, 3))
    perm = tr.block(tr.node(aten.permute))
    assert perm.axes == (1, 3)
    np.testing.assert_array_equal(perm.labels, la.reshape(2, 3))
    assert tr.block(tr.node(aten.transpose)).axes == (2, 3)
    merged = tr.block(tr.node(aten.reshape))
    assert merged.axes == (2,)
    np.testing.assert_array_equal(merged.labels, la)
    np.testing.assert_array_equal(tr.use("o.weight", "in").labels, la)
    assert tr.reasons(la) == []


def test_permute_that_swaps_head_and_dim_transposes_the_labels():
    def fn(m, x):
        B, T, _ = x.shape
        return m.a(x).view(B, T, 2, 3).permute(0, 1, 3, 2).sum(1)  # (B, d, H)

    tr = trace(fn, x3(), a=nn.Linear(4, 6))
    b = tr.block(tr.node(aten.permute))
    assert b.axes == (2, 3)
    np.testing.assert_array_equal(b.labels, tr.labels("a.weight").reshape(2, 3).T)


def test_reshape_keeps_outer_factors():
    def fn(m, x):
        B, T, _ = x.shape
        mha = m.a(x).transpose(0, 1).reshape(T, B * 2, 3)  # nn.MultiheadAttention's (T, B*H, d)
        flat = m.b(x).flatten(1)  # (B, T*C)
        return mha.sum(), flat.view(B, T, 6).sum()

    tr = trace(fn, x3(), a=nn.Linear(4, 6), b=nn.Linear(4, 6))
    batch = dim_expr(tr.placeholder().meta["val"].shape[0])
    tokens = dim_expr(tr.placeholder().meta["val"].shape[1])
    mha = tr.block(tr.node(aten.reshape))
    assert mha.axes == (1, 2) and mha.outer == (batch, 1)
    np.testing.assert_array_equal(mha.labels, tr.labels("a.weight").reshape(2, 3))
    flat = tr.block(tr.node(aten.flatten))
    assert flat.axes == (1,) and flat.outer == (tokens,)
    back = tr.block(tr.node(aten.view))
    assert back.axes == (2,) and back.outer == (1,)
    np.testing.assert_array_equal(back.labels, tr.labels("b.weight"))


def test_reshape_mixing_channels_is_refused():
    def fn(m, x):
        return m.a(x).transpose(1, 2).reshape(x.shape[0], -1).sum(-1)  # (B, C*T): T inside C

    tr = trace(fn, x3(), a=nn.Linear(4, 6))
    reshape = tr.node(aten.reshape)
    assert tr.block(reshape) is None
    assert tr.reasons(tr.labels("a.weight")) == [
        f"node {reshape.name} (aten.reshape.default): a reshape mixes channels with other dims"
    ]


def test_unsqueeze_expand_and_t_move_axes():
    def fn(m, x, y):
        e = m.a(x).unsqueeze(1).expand(-1, 3, -1, -1)
        return e.sum(1).sum(1), m.b(y).t().sum(1)

    tr = trace(fn, x3(), torch.randn(2, 4), a=nn.Linear(4, 6), b=nn.Linear(4, 6))
    assert tr.block(tr.node(aten.unsqueeze)).axes == (3,)
    assert tr.block(tr.node(aten.expand)).axes == (3,)
    assert tr.block(tr.node(aten.t)).axes == (0,)
    assert tr.reasons(tr.labels("b.weight")) == ["node output (output): its channels reach the model output"]


def test_expand_of_a_labelled_axis_is_refused():
    tr = trace(lambda m, x: m.o(m.a(x).expand(-1, 6)).sum(-1), torch.randn(2, 4), a=nn.Linear(4, 1),
               o=nn.Linear(6, 2))
    assert "expand" in tr.reason(tr.labels("a.weight"))


def _heads_view(m, x, literal=2):
    B, T, _ = x.shape
    return m.a(x).view(B, T, literal, 3).sum(-1).sum(-1)


def test_view_rewrite_sets_the_head_count():
    tr = trace(_heads_view, x3(), a=nn.Linear(4, 6))
    view = tr.node(aten.view)
    old = tr.block(view)
    b_sym, t_sym = view.args[1][:2]
    ctx = RewriteCtx(tr, removed=old.labels[1], new={view.name: _heads(old, 0, [0])})
    REWRITES[key_of(view.target)](ctx, view)
    assert view.args[0] is tr.node(aten.linear)
    assert view.args[1][0] is b_sym and view.args[1][1] is t_sym and view.args[1][2:] == [1, 3]


def test_view_rewrite_makes_minus_one_explicit():
    tr = trace(lambda m, x: _heads_view(m, x, literal=-1), x3(), a=nn.Linear(4, 6))
    view = tr.node(aten.view)
    assert view.args[1][2:] == [-1, 3]
    REWRITES[key_of(view.target)](RewriteCtx(tr), view)
    assert view.args[1][2:] == [2, 3]  # nothing removed, but no -1 is left to absorb a pruned dim


def test_unflatten_rewrite():
    tr = trace(lambda m, x: m.a(x).unflatten(-1, (2, 3)).sum(-1).sum(-1), x3(), a=nn.Linear(4, 6))
    node = tr.node(aten.unflatten)
    old = tr.block(node)
    assert old.axes == (2, 3)
    ctx = RewriteCtx(tr, removed=old.labels[:, 2], new={node.name: _heads(old, 1, [0, 1])})
    REWRITES[key_of(node.target)](ctx, node)
    assert list(node.args[2]) == [2, 2]


# --------------------------------------------------------------------------------------------- indexing.py
def test_packed_qkv_split_into_three_blocks():
    def fn(m, x):
        q, k, v = m.qkv(x).split(4, dim=-1)
        return m.oq(q).sum(-1), m.ok(k).sum(-1), m.ov(v).sum(-1)

    tr = trace(fn, x3(), qkv=nn.Linear(4, 12), oq=nn.Linear(4, 2), ok=nn.Linear(4, 2), ov=nn.Linear(4, 2))
    packed = tr.labels("qkv.weight")
    parts = tr.block(tr.node(aten.split))
    assert isinstance(parts, list) and len(parts) == 3
    for i, (part, consumer) in enumerate(zip(parts, ("oq", "ok", "ov"))):
        assert part.axes == (2,)
        np.testing.assert_array_equal(part.labels, packed[4 * i: 4 * i + 4])
        np.testing.assert_array_equal(tr.use(f"{consumer}.weight", "in").labels, packed[4 * i: 4 * i + 4])
    getitems = [n for n in tr.gm.graph.nodes if n.target is operator.getitem]
    assert [tr.block(n) for n in getitems] == parts
    assert len(set(tr.roots(packed).tolist())) == 12
    assert tr.reasons(packed) == []


def test_chunk_and_cat_along_unlabelled_and_labelled_axes():
    def fn(m, x):
        p, q = m.a(x).chunk(2, dim=1)  # tokens: labels pass through
        u = torch.cat([p, m.b(x)[:, :3]], dim=1)  # tokens: streams coupled
        lo, hi = m.c(x).chunk(2, dim=-1)
        w = torch.cat([hi, lo], dim=-1)  # channels: labels concatenated
        return m.o1(u).sum(-1), m.o2(w).sum(-1), q.sum(1)

    tr = trace(fn, x3(t=6), a=nn.Linear(4, 6), b=nn.Linear(4, 6), c=nn.Linear(4, 6), o1=nn.Linear(6, 2),
               o2=nn.Linear(6, 2))
    la, lb, lc = tr.labels("a.weight"), tr.labels("b.weight"), tr.labels("c.weight")
    tokens, channels = tr.block(tr.node(aten.chunk, 0)), tr.block(tr.node(aten.chunk, 1))
    assert all(np.array_equal(b.labels, la) and b.axes == (2,) for b in tokens)
    np.testing.assert_array_equal(channels[0].labels, lc[:3])
    np.testing.assert_array_equal(channels[1].labels, lc[3:])
    np.testing.assert_array_equal(tr.roots(la), tr.roots(lb))
    cat_c = tr.block(tr.node(aten.cat, 1))
    np.testing.assert_array_equal(cat_c.labels, np.concatenate([lc[3:], lc[:3]]))
    np.testing.assert_array_equal(tr.use("o2.weight", "in").labels, cat_c.labels)
    assert len(set(tr.roots(lc).tolist())) == 6


def test_unbind_select_and_slice():
    def fn(m, x):
        B, T, _ = x.shape
        h = m.a(x).unflatten(-1, (3, 2, 2))  # (B, T, 3, H, d), packed
        q = h.select(2, 0)
        k, v = h.unbind(2)[1:]
        tok = m.b(x).select(1, -1)  # a token: labels pass
        rows = m.c(x).unbind(1)[0]
        cols = m.d(x)[..., 2:5]
        return (q.sum(1), k.sum(1), v.sum(1), m.o1(tok).sum(-1), m.o2(rows).sum(-1), m.o3(cols).sum(-1),
                m.o4(m.e(x)[:, 1:3]).sum(-1))

    tr = trace(fn, x3(), a=nn.Linear(4, 12), b=nn.Linear(4, 6), c=nn.Linear(4, 6), d=nn.Linear(4, 6),
               e=nn.Linear(4, 6), o1=nn.Linear(6, 2), o2=nn.Linear(6, 2), o3=nn.Linear(3, 2), o4=nn.Linear(6, 2))
    packed = tr.labels("a.weight").reshape(3, 2, 2)
    unflat = tr.block(tr.node(aten.unflatten))
    assert unflat.axes == (2, 3, 4)
    sel = tr.block(tr.node(aten.select, 0))
    assert sel.axes == (2, 3)
    np.testing.assert_array_equal(sel.labels, packed[0])
    parts = tr.block(tr.node(aten.unbind, 0))
    assert [p.axes for p in parts] == [(2, 3)] * 3
    for i, p in enumerate(parts):
        np.testing.assert_array_equal(p.labels, packed[i])
    tok = tr.block(tr.node(aten.select, 1))
    assert tok.axes == (1,)
    np.testing.assert_array_equal(tok.labels, tr.labels("b.weight"))
    rows = tr.block(tr.node(aten.unbind, 1))[0]
    assert rows.axes == (1,)
    np.testing.assert_array_equal(tr.use("o2.weight", "in").labels, tr.labels("c.weight"))
    np.testing.assert_array_equal(tr.use("o3.weight", "in").labels, tr.labels("d.weight")[2:5])
    np.testing.assert_array_equal(tr.use("o4.weight", "in").labels, tr.labels("e.weight"))
    for p in ("b", "c", "d", "e"):
        assert tr.reasons(tr.labels(f"{p}.weight")) == []


def test_select_of_a_single_channel_is_refused():
    tr = trace(lambda m, x: m.a(x)[..., 0].sum(-1), x3(), a=nn.Linear(4, 6))
    sel = tr.node(aten.select)
    assert tr.block(sel) is None
    assert tr.reasons(tr.labels("a.weight")) == [f"node {sel.name} (aten.select.int): select of a single channel"]


def test_unbind_of_the_only_channel_axis_is_refused():
    tr = trace(lambda m, x: torch.stack(m.a(x).unbind(-1)[:2]).sum(), x3(), a=nn.Linear(4, 3))
    assert "single channel" in tr.reason(tr.labels("a.weight"))


def _mixed(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 2, 1, 4) -> Linear(4, 6) -> (B, 12), whose axis 1 is 2 (unlabelled, outside) x 6 channels."""
    return lin(x).reshape(x.shape[0], 12)


@pytest.mark.parametrize(
    "cut, reason",
    [
        (lambda h: h.split(6, dim=1)[0], "split of an axis that mixes channels with other dims"),
        (lambda h: h.select(1, 0), "select on an axis that mixes channels with other dims"),
        (lambda h: h[:, 0:6], "slice of an axis that mixes channels with other dims"),
        (lambda h: torch.cat([h, h], dim=1), "concatenation along a mixed axis"),
    ],
    ids=["split", "select", "slice", "cat"],
)
def test_cutting_a_mixed_axis_is_refused(cut, reason):
    tr = trace(lambda m, x: m.f(_mixed(m.a, x)).sum(-1), torch.randn(2, 2, 1, 4), a=nn.Linear(4, 6), f=_Fn(cut))
    mixed = tr.block(tr.node(aten.reshape))
    assert mixed.axes == (1,) and mixed.outer == (2,)
    assert reason in tr.reason(tr.labels("a.weight"))


def test_cat_refusals():
    def fn(m, x, y, z, w):
        unknown = torch.cat([m.a(x), y], dim=1)
        axes = torch.cat([m.b(x), m.c(x).transpose(1, 2)], dim=0)
        different = torch.cat([_mixed(m.d, z), m.e(w)], dim=0)  # 2 x 6 channels, then 12 channels
        return unknown.sum(1), axes.sum(), different.sum()

    tr = trace(fn, torch.randn(2, 4, 3), torch.randn(2, 4, 6), torch.randn(2, 2, 1, 4), torch.randn(2, 5),
               a=nn.Linear(3, 6), b=nn.Linear(3, 4), c=nn.Linear(3, 4), d=nn.Linear(4, 6), e=nn.Linear(5, 12))
    assert "concatenation with an operand of unknown channels" in tr.reason(tr.labels("a.weight"))
    assert tr.block(tr.node(aten.cat, 0)) is not None  # along tokens the labels still pass
    for p in ("b.weight", "c.weight"):
        assert "concatenated operands carry channels on different axes" in tr.reason(tr.labels(p))
    assert "concatenated operands carry different channels" in tr.reason(tr.labels("e.weight"))


def test_split_rewrite_recomputes_sizes():
    def fn(m, x):
        return [p.sum(-1) for p in m.qkv(x).chunk(3, dim=-1)]

    tr = trace(fn, x3(), qkv=nn.Linear(4, 12))
    node = tr.node(aten.chunk)
    parts = tr.block(node)
    new = [_heads(p, 0, [0, 1, 2]) if i != 1 else _heads(p, 0, [0, 1]) for i, p in enumerate(parts)]
    REWRITES[key_of(node.target)](RewriteCtx(tr, new={node.name: new}), node)
    assert node.target is aten.split_with_sizes.default
    assert node.args == (tr.node(aten.linear), [3, 2, 3], 2) and node.kwargs == {}


def test_select_and_slice_rewrites_renumber_positions():
    def fn(m, x):
        h = m.a(x).unflatten(-1, (3, 4))
        return h.select(2, 2).sum(-1), m.b(x)[..., 2:8].sum(-1)

    tr = trace(fn, x3(), a=nn.Linear(4, 12), b=nn.Linear(4, 12))
    packed, lb = tr.labels("a.weight").reshape(3, 4), tr.labels("b.weight")
    sel, sl = tr.node(aten.select), tr.nodes(aten.slice)[-1]
    assert sl.args[1:] == (2, 2, 8)
    ctx = RewriteCtx(tr, removed=[*packed[0].tolist(), lb[0], lb[3]])
    REWRITES[key_of(sel.target)](ctx, sel)
    assert sel.args[1:] == (2, 1)  # slice 0 removed: slice 2 is now slice 1
    REWRITES[key_of(sl.target)](ctx, sl)
    assert sl.args[1:] == (2, 1, 6, 1)  # positions 2..7 of the kept 1, 2, 4, 5, ... are 1..6
    gone = trace(fn, x3(), a=nn.Linear(4, 12), b=nn.Linear(4, 12))
    sel2 = gone.node(aten.select)
    with pytest.raises(ValueError, match="removed entirely"):
        REWRITES[key_of(sel2.target)](RewriteCtx(gone, removed=gone.labels("a.weight")[8:]), sel2)


class _PaddedHeads(nn.Module):
    """Attention whose head dim (6) is padded to a kernel's size (8) before attention and sliced back after; the
    scale is computed from the head dim, as a class writes it."""

    def __init__(self, eager: bool = False, heads: int = 3, d: int = 6) -> None:
        super().__init__()
        self.eager, self.heads, self.d = eager, heads, d
        self.q, self.k, self.v = (nn.Linear(16, heads * d) for _ in range(3))
        self.o = nn.Linear(heads * d, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (F.pad(p(x).view(B, T, self.heads, self.d).transpose(1, 2), (0, 8 - self.d))
                   for p in (self.q, self.k, self.v))
        if self.eager:
            a = torch.softmax(q @ k.transpose(-2, -1) * self.d**-0.5, -1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, scale=self.d**-0.5)
        return x + self.o(a[..., : self.d].transpose(1, 2).reshape(B, T, self.heads * self.d))


@pytest.mark.parametrize("eager", [False, True])
def test_a_padded_head_dim_follows_its_heads(eager):
    """The positions a pad adds to a head dim are no channel: each pad records the rows (heads) its positions
    extend, the attention's site holds the projections' (heads, 6) labels alone, and nothing is refused."""
    model = _PaddedHeads(eager).eval()
    tr = Traced(lambda n, x: n.m(x), (torch.randn(2, 5, 16),), {"m": model})
    (site,) = tr.tracer.sites
    for role in "qkv":
        np.testing.assert_array_equal(getattr(site, role), tr.labels(f"m.{role}.weight").reshape(3, 6))
        assert tr.reasons(tr.labels(f"m.{role}.weight")) == []
    pads = tr.tracer.paddings
    assert [p.labels.shape for p in pads] == [(3, 2)] * 3
    np.testing.assert_array_equal(pads[0].rows, tr.labels("m.q.weight").reshape(3, 6))
    assert tr.tracer.is_padding(pads[0].labels).all() and not tr.tracer.is_padding(site.q).any()
    padded_q = tr.block(tr.node(aten.pad))
    assert padded_q.labels.shape == (3, 8) and (padded_q.labels[:, 6:] == pads[0].labels).all()


@pytest.mark.parametrize("eager", [False, True])
def test_padded_heads_are_cut_exactly_and_the_class_comes_back(eager):
    """Removing a head takes its padding along, removing a head dim keeps it: the pad widths stay, the cut graph
    equals the zeroed reference at another shape, and the class comes back (its own pad and scale, verified)."""
    torch.manual_seed(0)
    model = _PaddedHeads(eager).eval()
    cap = upop_fx.capture(model, torch.randn(2, 5, 16))
    analysis = FindGroups()(cap.gm).value
    qk, v = (next(g for g in analysis.prunable if g.kind == kind) for kind in ("qk", "v"))
    assert (qk.heads, qk.head_dim, v.heads, v.head_dim) == (3, 6, 3, 6)
    no_head_1 = [j for j in range(18) if j // 6 != 1]
    no_dim_0, no_dim_2 = [j for j in range(18) if j % 6], [j for j in range(18) if j % 6 != 2]
    x = torch.randn(3, 7, 16)
    for keep in ({qk.id: no_head_1, v.id: no_head_1}, {qk.id: no_dim_0, v.id: no_dim_2}):
        cut = Surgery(keep)(cap.gm).gm
        cut.graph.lint()
        assert [n.args[1] for n in cut.graph.nodes if n.target == aten.pad.default] == [[0, 2]] * 3
        reference = zeroed_reference(cap.gm, removed_labels(analysis, keep))
        torch.testing.assert_close(cut(x), reference(x))
    result = upop_fx.compress(model, torch.randn(2, 5, 16), ratio=0.4, method="magnitude", retrain_steps=0)
    assert type(result.module) is _PaddedHeads and result.module.d < 6
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), result.model(x))


def test_pads_of_channels_and_of_tokens():
    """A padded hidden layer read by a wider weight: its neurons stay free, the weight's padded columns follow them.
    Refused: a reflect pad of channels, a query padded where its key has channels; a non-zero pad of the tokens
    makes a removed channel non-zero there."""
    tr = trace(lambda m, x: m.down(F.pad(F.relu(m.up(x)), (0, 2))).sum(-1), x3(c=8),
               up=nn.Linear(8, 6), down=nn.Linear(8, 3))
    up = tr.labels("up.weight")
    assert tr.reasons(up) == [] and len(set(tr.roots(up).tolist())) == 6
    np.testing.assert_array_equal(tr.use("down.weight", "in").labels[:6], up)
    reflect = trace(lambda m, x: m.down(F.pad(m.up(x), (1, 1), mode="reflect")).sum(-1), x3(c=8),
                    up=nn.Linear(8, 6), down=nn.Linear(8, 3))
    assert reflect.reasons(reflect.labels("up.weight")) == [
        f"node {reflect.node(aten.pad).name} (aten.pad.default): a reflect pad of a channel axis (it copies "
        "channels into the padding)"]
    tokens = trace(lambda m, x: m.down(F.pad(m.up(x).transpose(1, 2), (0, 2), value=1.0).transpose(1, 2)).sum(-1),
                   x3(c=8), up=nn.Linear(8, 6), down=nn.Linear(6, 3))
    assert tokens.reasons(tokens.labels("up.weight")) == [
        f"node {tokens.node(aten.linear, 1).name} (aten.linear.default): {NOT_ZERO}"]

    def mixed(m, x):
        B, T, _ = x.shape
        q = F.pad(m.q(x).view(B, T, 2, 2).transpose(1, 2), (0, 2))
        k, v = (p(x).view(B, T, 2, 4).transpose(1, 2) for p in (m.k, m.v))
        return m.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, 8)).sum(-1)

    def partly(m, x):  # the key padded by one where the query is padded by two: one position of each is padding
        B, T, _ = x.shape
        q = F.pad(m.q(x).view(B, T, 2, 2).transpose(1, 2), (0, 2))
        k = F.pad(m.k(x).view(B, T, 2, 3).transpose(1, 2), (0, 1))
        v = m.v(x).view(B, T, 2, 4).transpose(1, 2)
        return m.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, 8)).sum(-1)

    for fn, k_width in ((mixed, 8), (partly, 6)):
        model = Net(fn, q=nn.Linear(8, 4), k=nn.Linear(8, k_width), v=nn.Linear(8, 8), o=nn.Linear(8, 3)).eval()
        analysis = FindGroups()(upop_fx.capture(model, x3(c=8)).gm).value
        qk = next(g for g in analysis.groups if g.kind == "qk")
        assert not qk.prunable and "its padded positions are coupled with channels of a weight" in qk.reason
        assert next(g for g in analysis.groups if g.kind == "v").prunable
        assert analysis.paddings == []  # both pads forgotten: their positions joined the refused class


# --------------------------------------------------------------------------------------------- attention.py
def _attn(mode: str = "sdpa", hk: int = 2, heads: int = 2, **kw: Any) -> Callable[..., Any]:
    def fn(m, x):
        B, T, _ = x.shape
        q = m.q(x).view(B, T, heads, 2).transpose(1, 2)
        k = m.k(x).view(B, T, hk, 2).transpose(1, 2)
        v = m.v(x).view(B, T, heads, 2).transpose(1, 2)
        if mode == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=hk != heads, **kw)
        else:
            if mode == "sigmoid_q":
                q = torch.sigmoid(q)
            a = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
        return m.o(a.transpose(1, 2).reshape(B, T, 2 * heads))

    return fn


def _attn_parts(hk: int = 2, heads: int = 2) -> dict[str, nn.Module]:
    return dict(q=nn.Linear(8, 2 * heads), k=nn.Linear(8, 2 * hk), v=nn.Linear(8, 2 * heads),
                o=nn.Linear(2 * heads, 8))


def _check_site(tr: Traced, site: Any, heads: int = 2) -> None:
    lq, lk, lv = (tr.labels(f"{p}.weight").reshape(heads, 2) for p in "qkv")
    np.testing.assert_array_equal(site.q, lq)
    np.testing.assert_array_equal(site.k, lk)
    np.testing.assert_array_equal(site.v, lv)
    np.testing.assert_array_equal(tr.roots(lq), tr.roots(lk))  # q[h, j] meets k[h, j]
    assert len(set(tr.roots(lq).ravel().tolist())) == 2 * heads
    assert not set(tr.roots(lv).ravel().tolist()) & set(tr.roots(lq).ravel().tolist())
    np.testing.assert_array_equal(tr.use("o.weight", "in").labels, lv.reshape(-1))  # v's labels reach o
    for p in "qkv":
        assert tr.reasons(tr.labels(f"{p}.weight")) == []


def test_sdpa_unions_q_k_and_passes_v():
    tr = trace(_attn(), x3(c=8), **_attn_parts())
    node = tr.node(aten.scaled_dot_product_attention)
    (site,) = tr.tracer.sites
    assert site.node == node.name and site.index == 0 and site.scale is None and not site.cross
    assert site.flops_qk == site.flops_v == 2.0 * 2 * 5 * 5  # 2 * batch * T_q * T_k
    _check_site(tr, site)
    out = tr.block(node)
    assert out.axes == (1, 3) and out.zero
    np.testing.assert_array_equal(out.labels, site.v)


def test_sdpa_records_an_explicit_scale():
    tr = trace(_attn(scale=0.25), x3(c=8), **_attn_parts())
    assert tr.tracer.sites[0].scale == 0.25


def test_sdpa_single_head_without_head_axis_labels():
    tr = trace(_attn(hk=1, heads=1), x3(c=8), **_attn_parts(hk=1, heads=1))
    assert tr.block(tr.node(aten.transpose, 0)).axes == (3,)  # the size-1 head axis holds no labels
    _check_site(tr, tr.tracer.sites[0], heads=1)


def test_eager_attention_matmuls_record_one_site():
    tr = trace(_attn("eager"), x3(c=8), **_attn_parts())
    scores, mix = tr.nodes(aten.matmul)
    assert tr.block(scores) is None
    (site,) = tr.tracer.sites
    assert site.node == scores.name and site.scale is None
    assert site.flops_qk == site.flops_v == 2.0 * 2 * 5 * 5
    _check_site(tr, site)
    out = tr.block(mix)
    assert out.axes == (1, 3)
    np.testing.assert_array_equal(out.labels, site.v)


def test_sdpa_grouped_query_heads_are_refused():
    tr = trace(_attn(hk=1), x3(c=8), **_attn_parts(hk=1))
    node = tr.node(aten.scaled_dot_product_attention)
    (site,) = tr.tracer.sites
    assert site.q is None and site.k is None
    np.testing.assert_array_equal(site.v, tr.labels("v.weight").reshape(2, 2))
    why = f"node {node.name} (aten.scaled_dot_product_attention.default): q and k head layouts differ"
    for p in "qk":
        assert why in tr.reason(tr.labels(f"{p}.weight"))
    assert tr.reasons(tr.labels("v.weight")) == []
    assert not set(tr.roots(tr.labels("q.weight")).tolist()) & set(tr.roots(tr.labels("k.weight")).tolist())


def test_eager_attention_with_one_shared_key_head_is_multi_query():
    """``q @ kᵀ`` where the matmul broadcasts one key head over the query heads: the matmul copies it per query
    head, so q dim j of head h meets head h's copy of k dim j alone, as under SDPA; ``probs @ v`` still records v
    (here of two heads)."""
    tr = trace(_attn("eager", hk=1), x3(c=8), **_attn_parts(hk=1))
    q, k = tr.roots(tr.labels("q.weight")), tr.roots(tr.labels("k.weight"))
    assert len(set(q.tolist())) == 4 and not set(q.tolist()) & set(k.tolist())
    assert [c.node for c in tr.tracer.copies] == [tr.node(aten.matmul, 0).name]
    (site,) = tr.tracer.sites
    assert site.node == tr.node(aten.matmul, 0).name and site.v is not None
    for p in "qkv":
        assert tr.reasons(tr.labels(f"{p}.weight")) == []


def test_eager_scores_with_non_zero_q_are_refused():
    tr = trace(_attn("sigmoid_q"), x3(c=8), **_attn_parts())
    assert "attention scores with mismatched q/k head layouts" in tr.reason(tr.labels("q.weight"))
    assert "attention scores with mismatched q/k head layouts" in tr.reason(tr.labels("k.weight"))


def test_matmul_of_two_activations_is_refused():
    tr = trace(lambda m, x: (m.a(x) @ m.b(x).transpose(1, 2)).sum(), x3(), a=nn.Linear(4, 6), b=nn.Linear(4, 6))
    mm = tr.node(aten.matmul)
    assert tr.block(mm) is None and tr.tracer.sites == []
    why = f"node {mm.name} (aten.matmul.default): matmul of two activations that is not an attention pattern"
    assert tr.reasons(tr.labels("a.weight")) == [why] and tr.reasons(tr.labels("b.weight")) == [why]


def test_attention_mask_carrying_channels_is_refused():
    def fn(m, x):
        B, T, _ = x.shape
        heads = x.view(B, T, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(heads, heads, heads, attn_mask=m.m(x).unsqueeze(1)).sum()

    tr = trace(fn, x3(c=8), m=nn.Linear(8, 5))
    assert tr.reasons(tr.labels("m.weight")) == [
        f"node {tr.node(aten.scaled_dot_product_attention).name} (aten.scaled_dot_product_attention.default): "
        "channels used as an attention mask"
    ]


def test_attention_operand_without_head_layout_is_refused():
    def fn(m, x):
        B, T, _ = x.shape
        q = m.q(x).view(B, T, 2, 2).transpose(1, 2)
        kv = m.kv(x).view(B, T * 2, 2).unsqueeze(1)  # heads folded into the token axis: no (heads, d) layout
        return F.scaled_dot_product_attention(q, kv, kv).sum()

    tr = trace(fn, x3(c=8), q=nn.Linear(8, 4), kv=nn.Linear(8, 4))
    assert "attention operand without a clean (heads, head_dim) layout" in tr.reason(tr.labels("q.weight"))
    assert tr.tracer.sites == []


def _multi_query(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Two query heads over one key/value head ``expand``-ed to both (their labels only on the head-dim axis)."""
    B, T, _ = x.shape
    q = m.q(x).view(B, T, 2, 4).transpose(1, 2)
    k, v = (p(x).unsqueeze(1).expand(B, 2, T, 4) for p in (m.k, m.v))
    return m.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, 8))


def _multi_query_parts() -> dict[str, nn.Module]:
    return dict(q=nn.Linear(8, 8), k=nn.Linear(8, 4), v=nn.Linear(8, 4), o=nn.Linear(8, 8))


def test_one_key_value_head_broadcast_to_every_query_head_is_copied_per_head():
    """k and v of one head, expanded over the query heads: the expand's head axis gets fresh labels per head (a
    copy of k and of v for each query head), so q dim j of head 0 and of head 1 are different classes — a query
    head can go alone — and k's and v's own rows are the copies' sources, in no class of the attention."""
    tr = trace(_multi_query, x3(c=8), **_multi_query_parts())
    q, k = tr.roots(tr.labels("q.weight")), tr.roots(tr.labels("k.weight"))
    assert len(set(q.tolist())) == 8 and not set(q.tolist()) & set(k.tolist())
    copies = {c.node: c for c in tr.tracer.copies}
    assert len(copies) == 2 and all(c.copies.shape == (2, 4) for c in copies.values())
    by_source = {tuple(c.source.tolist()): c for c in copies.values()}
    kc = by_source[tuple(tr.labels("k.weight").tolist())]
    assert tr.roots(kc.copies).reshape(-1).tolist() == q.tolist()  # head h's copy of k dim j meets q head h dim j
    expand = tr.node(aten.expand)
    assert tr.block(expand).axes == (1, 3)  # the head axis carries the copies: surgery rewrites its literal
    assert len(tr.tracer.sites) == 1 and not tr.reasons(tr.labels("v.weight"))


@pytest.mark.parametrize("norm", ["rms_norm", "mean"])
def test_one_key_head_normalised_before_its_broadcast_is_one_class_with_its_query_heads_apart(norm):
    """The one key head normalised over its dims (Gemma 3's k_norm, as ``F.rms_norm`` or written with ``mean``)
    before it is expanded over the query heads: its dims are one class (they go together, with the last query
    head), not refused; each query head's q dims meet only that head's copy."""
    def fn(m, x):
        B, T, _ = x.shape
        q = m.q(x).view(B, T, 2, 4).transpose(1, 2)
        k = m.k(x).view(B, T, 1, 4)
        k = F.rms_norm(k, (4,)) if norm == "rms_norm" else k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6)
        k = k.transpose(1, 2).expand(B, 2, T, 4)
        v = m.v(x).unsqueeze(1).expand(B, 2, T, 4)
        return m.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, 8))

    tr = trace(fn, x3(c=8), **_multi_query_parts())
    k = tr.roots(tr.labels("k.weight"))
    assert len(set(k.tolist())) == 1 and not tr.reasons(tr.labels("k.weight"))
    q = tr.roots(tr.labels("q.weight"))
    assert len(set(q.tolist())) == 8 and not set(q.tolist()) & set(k.tolist())
    assert len(tr.tracer.copies) == 2


def test_a_query_head_goes_alone_and_the_shared_head_goes_with_its_last_copy():
    """Surgery on the multi-query attention (checked against the zeroed reference): removing query head 1 keeps
    every row of k and v and rewrites the expand's head count; removing head dim 0 from both query heads removes
    k's and v's row 0 with it."""
    model = Net(_multi_query, **_multi_query_parts()).eval()
    x = x3(c=8)
    cap = upop_fx.capture(model, x)
    analysis = FindGroups()(cap.gm).value
    qk, v = (next(g for g in analysis.prunable if g.kind == kind) for kind in ("qk", "v"))
    assert (qk.heads, qk.head_dim, v.heads, v.head_dim) == (2, 4, 2, 4)
    one_head = Surgery({qk.id: range(4), v.id: range(4)})(cap.gm).gm
    assert one_head.k.weight.shape == one_head.v.weight.shape == (4, 8)
    assert one_head.q.weight.shape == (4, 8) and one_head.o.weight.shape == (8, 4)
    expand = next(n for n in one_head.graph.nodes if n.target == aten.expand.default)
    assert expand.args[1][1] == 1
    no_dim0 = Surgery({qk.id: [1, 2, 3, 5, 6, 7], v.id: [1, 2, 3, 5, 6, 7]})(cap.gm).gm
    assert no_dim0.k.weight.shape == no_dim0.v.weight.shape == (3, 8)
    torch.testing.assert_close(no_dim0.k.weight, model.k.weight[1:])


def test_sdpa_rewrite_pins_the_scale_where_the_head_dim_shrinks():
    implicit = trace(_attn(), x3(c=8), **_attn_parts())
    node = implicit.node(aten.scaled_dot_product_attention)
    REWRITES[key_of(node.target)](RewriteCtx(implicit), node)  # nothing cut (or whole heads): the default holds
    assert "scale" not in node.kwargs and len(node.args) <= 6
    q = node.args[0]
    b, last = q.meta[DIMS_KEY], q.meta["val"].dim() - 1
    narrower = Block(b.axes, np.take(b.labels, [0], axis=b.axes.index(last)), b.outer, b.zero)
    REWRITES[key_of(node.target)](RewriteCtx(implicit, new={q.name: narrower}), node)
    assert node.kwargs["scale"] == pytest.approx(1 / math.sqrt(2))
    explicit = trace(_attn(scale=0.25), x3(c=8), **_attn_parts())
    node = explicit.node(aten.scaled_dot_product_attention)
    before = (node.args, dict(node.kwargs))
    REWRITES[key_of(node.target)](RewriteCtx(explicit), node)
    assert (node.args, dict(node.kwargs)) == before


class _ExpertBias(nn.Module):
    """A linear layer's output plus a bias row gathered per token by expert id (``bias[expert_ids]``), clamped."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 6, bias=False), nn.Linear(6, 8)
        self.bias = nn.Parameter(torch.randn(3, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert = (x[..., 0] > 0).long() + (x[..., 1] > 0).long()  # 0, 1 or 2 per token
        h = (self.up(x) + self.bias[expert]).clamp(min=-1.0, max=1.0)
        return self.down(h)


def test_an_expert_bias_gathered_by_index_is_a_use_of_its_last_axis():
    tr = trace(lambda m, x: m.e(x), x3(c=8), e=_ExpertBias())
    use = tr.use("e.bias", "out")
    assert use.axis == 1
    # the gathered bias entry j is neuron j of the up projection: one class, kept zero by the clamp (0 in bounds)
    assert tr.roots(use.labels).tolist() == tr.roots(tr.labels("e.up.weight")).tolist()
    assert not tr.reasons(tr.labels("e.up.weight"))


def test_a_clamp_that_excludes_zero_does_not_keep_a_removed_channel_zero():
    def fn(m, x):
        return m.down(m.up(x).clamp(min=0.5))

    tr = trace(fn, x3(c=8), up=nn.Linear(8, 6), down=nn.Linear(6, 8))
    assert tr.reasons(tr.labels("up.weight"))  # clamp(0, min=0.5) = 0.5: removing a channel would change down's input


def test_attention_with_windows_between_heads_and_tokens_and_max_pooled_queries():
    """``(B, H, windows, T, d)`` attention (Hiera's mask units) with queries pooled by ``max`` over a stride:
    q[h, j] meets k[h, j] as in ``(B, H, T, d)``; the pooling keeps the channels; v passes to the output."""

    def fn(m, x):  # x: (B, tokens per window, windows, C)
        B, T, W, _ = x.shape
        q, k, v = (p(x).view(B, T, W, 2, 4).permute(0, 3, 2, 1, 4) for p in (m.q, m.k, m.v))  # (B, H, W, T, d)
        q = q.reshape(B, 2, W, 2, T // 2, 4).max(dim=3).values
        out = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return m.o(out.transpose(1, 3).reshape(B, -1, 8)).sum(-1)

    tr = trace(fn, torch.randn(2, 4, 3, 8), q=nn.Linear(8, 8), k=nn.Linear(8, 8), v=nn.Linear(8, 8), o=nn.Linear(8, 2))
    (site,) = tr.tracer.sites
    np.testing.assert_array_equal(tr.roots(site.q), tr.roots(site.k))
    np.testing.assert_array_equal(site.v, tr.labels("v.weight").reshape(2, 4))
    for p in "qkv":
        assert tr.reasons(tr.labels(f"{p}.weight")) == []
    values, indices = tr.block(tr.node(aten.max))
    assert values.axes == (1, 4) and values.zero and not indices.zero


def test_max_over_channels_is_refused():
    tr = trace(lambda m, x: m.a(x).max(dim=-1).values.sum(), x3(), a=nn.Linear(4, 6))
    assert tr.reasons(tr.labels("a.weight")) == [f"node {tr.node(aten.max).name} (aten.max.dim): reduction over channels"]
