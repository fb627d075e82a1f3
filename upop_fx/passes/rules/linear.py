"""Matmul-like ops with a parameter weight: each consumes the labels of its contracted input axis (an ``in``
use of the weight) and creates fresh labels for its output features (``out`` uses of weight rows and bias).

Covers ``linear`` (weight ``[out, in]``), ``addmm``/``mm``/``matmul`` with a parameter ``[in, out]`` (GPT-2's
Conv1D), ``conv2d``/``convolution`` (groups=1) and ``embedding``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from ...groups import Block
from ._util import arg, contract, numel, rank, val
from .attention import activation_matmul
from .registry import rule

aten = torch.ops.aten


def _seed(ctx: Any, node: Node, axis: int, weight: Node, weight_axis: int, bias: Any) -> Block:
    size = int(val(weight).shape[weight_axis])
    labels = ctx.new_labels((size,))
    w_numel = val(weight).numel()
    rows = numel(node) // size  # how many times each output feature is computed
    ctx.use(weight, weight_axis, labels, "out", 2.0 * rows * w_numel / size)
    if ctx.is_param(bias):
        ctx.use(bias, 0, labels, "out")
    return Block((axis,), labels)


def _refuse_inputs(ctx: Any, node: Node, why: str) -> None:
    for n in node.all_input_nodes:
        ctx.refuse_block(ctx.block(n), why)


@rule(aten.linear, seeding=True)
def linear(ctx: Any, node: Node) -> Block | None:
    x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    if not ctx.is_param(w):
        _refuse_inputs(ctx, node, "linear with a computed (non-parameter) weight")
        return None
    out_features, in_features = (int(s) for s in val(w).shape)
    rows = numel(node) // out_features
    contract(ctx, ctx.block(x), rank(x) - 1, w, 1, 2.0 * rows * out_features)
    return _seed(ctx, node, rank(node) - 1, w, 0, b)


@rule(aten.addmm, aten.mm, aten.matmul, aten.bmm, seeding=True)
def matmul_param(ctx: Any, node: Node) -> Block | None:
    if node.target == aten.addmm.default:
        bias, x, w = node.args[0], node.args[1], node.args[2]
    else:
        bias, x, w = None, node.args[0], node.args[1]
    if not ctx.is_param(w) or rank(w) != 2:
        if bias is None and any(ctx.block(n) is not None for n in node.all_input_nodes):
            return activation_matmul(ctx, node)
        _refuse_inputs(ctx, node, "addmm with a computed weight")
        return None
    in_features, out_features = (int(s) for s in val(w).shape)
    rows = numel(node) // out_features
    contract(ctx, ctx.block(x), rank(x) - 1, w, 0, 2.0 * rows * out_features)
    if bias is not None and ctx.is_param(bias) and rank(bias) != 1:
        bias = None
    return _seed(ctx, node, rank(node) - 1, w, 1, bias)


@rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, seeding=True)
def conv(ctx: Any, node: Node) -> Block | None:
    x, w, b = node.args[0], node.args[1], arg(node, 2, "bias")
    groups = arg(node, 8, "groups", 1) if node.target == aten.convolution.default else arg(node, 6, "groups", 1)
    transposed = node.target == aten.convolution.default and arg(node, 7, "transposed", False)
    if not ctx.is_param(w) or groups != 1 or transposed:
        _refuse_inputs(ctx, node, "convolution with groups, transposition or a computed weight")
        return None
    out_ch = int(val(w).shape[0])
    per_out = numel(node) // out_ch
    contract(ctx, ctx.block(x), 1, w, 1, 2.0 * per_out * val(w).numel() / int(val(w).shape[1]))
    return _seed(ctx, node, 1, w, 0, b)


@rule(aten.embedding, seeding=True)
def embedding(ctx: Any, node: Node) -> Block | None:
    w, idx = node.args[0], node.args[1]
    if ctx.block(idx) is not None:
        ctx.refuse_block(ctx.block(idx), "channels used as embedding indices")
    if not ctx.is_param(w):
        return None
    dim = int(val(w).shape[1])
    labels = ctx.new_labels((dim,))
    ctx.use(w, 1, labels, "out")
    return Block((rank(node) - 1,), labels)


__all__: list[str] = []
