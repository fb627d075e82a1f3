"""Matmul-like ops with a parameter weight: each consumes the labels of its contracted input axis (an ``in``
use of the weight) and creates fresh labels for its output features (``out`` uses of weight rows and bias).

Covers ``linear`` (weight ``[out, in]``), ``addmm``/``mm``/``matmul`` with a parameter ``[in, out]`` (GPT-2's
Conv1D) or a parameter ``[out, in]`` on the left (``W @ x``: features on the second last axis), ``conv2d``/``convolution`` (groups=1) and ``embedding``; the weight may be a view of a parameter (a chunk
of a packed projection, ``W.T``: :mod:`..param_views`). A *depthwise* convolution (``groups`` = channels, one
filter per channel: Segformer's Mix-FFN) passes its input's channels through, its filters and bias re-producing
them, and surgery rewrites ``groups`` to the kept count.

Where the weight is computed (not a parameter nor a view of one), or the convolution groups channels otherwise,
the output's channels are still labelled — and refused, with the node and the reason — so that every output
channel of every weight is either in a prunable group or reported as not prunable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ...ir.groups import Block
from ._util import arg, contract, numel, rank, val
from .attention import activation_matmul
from .registry import rewrite, rule

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


def _opaque(ctx: Any, node: Node, axis: int, why: str) -> None:
    """Refuse the inputs' channels and label the output's ``axis`` as channels that cannot be removed (so they
    are reported, with ``why``, rather than left out of the analysis)."""
    _refuse_inputs(ctx, node, why)
    v = val(node)
    if isinstance(v, torch.Tensor) and v.dim() > axis and isinstance(v.shape[axis], int):
        ctx.refuse(ctx.new_labels((int(v.shape[axis]),)), why)


@rule(aten.linear, seeding=True)
def linear(ctx: Any, node: Node) -> Block | None:
    x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    if not ctx.is_param(w):
        _opaque(ctx, node, rank(node) - 1, "linear with a computed (non-parameter) weight")
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
    if ctx.is_param(w) and rank(w) == 3 and node.target != aten.addmm.default and rank(x) == 3:
        return _stacked(ctx, node, x, w)  # one weight per batch entry: stacked experts
    if bias is None and ctx.is_param(x) and rank(x) == 2 and not ctx.is_param(w) and rank(w) >= 2:
        return _weight_on_the_left(ctx, node, x, w)
    if not ctx.is_param(w) or rank(w) != 2:
        if bias is None and any(ctx.block(n) is not None for n in node.all_input_nodes):
            return activation_matmul(ctx, node)
        op = node.target.__name__.split(".")[0]
        why = (f"{op} with a {rank(w)}-D parameter weight" if ctx.is_param(w) else f"{op} with a computed weight")
        _opaque(ctx, node, rank(node) - 1, why)
        return None
    in_features, out_features = (int(s) for s in val(w).shape)
    rows = numel(node) // out_features
    contract(ctx, ctx.block(x), rank(x) - 1, w, 0, 2.0 * rows * out_features)
    if bias is not None and ctx.is_param(bias) and rank(bias) != 1:
        bias = None
    return _seed(ctx, node, rank(node) - 1, w, 1, bias)


def _weight_on_the_left(ctx: Any, node: Node, w: Node, x: Node) -> Block | None:
    """``W @ x`` with a parameter ``W [out, in]`` and an activation ``x [..., in, cols]``. Where ``x``'s channels
    are on its last axis (``cols``), ``W`` mixes rows (tokens) and keeps every column: the channels pass through
    unchanged (a removed one stays zero), and ``W``'s rows are reported as not prunable. Otherwise the features
    are on the second last axis (a channels-first layout, a token-mixing MLP): ``x``'s axis ``-2`` is contracted
    against ``W``'s columns and the output's axis ``-2`` carries ``W``'s rows, as ``linear`` does on the last
    axis."""
    block, r = ctx.block(x), rank(x)
    if block is not None and block.axes == (r - 1,):
        return Block((rank(node) - 1,), block.labels, block.outer, block.zero)
    out_features = int(val(w).shape[0])
    rows = numel(node) // out_features
    contract(ctx, block, r - 2, w, 1, 2.0 * rows * out_features)
    return _seed(ctx, node, rank(node) - 2, w, 0, None)


def _stacked(ctx: Any, node: Node, x: Node, w: Node) -> Block | None:
    """Stacked expert weights ``[E, in, out]``: each row of ``x`` is multiplied by one expert's matrix (a
    batched ``bmm`` over the expert axis, or a grouped matmul whose offsets say which rows go to which expert).
    Feature ``j`` of the output is column ``j`` of every expert: the experts of one stack share their feature
    indices, as UPop's heads share their head-dim mask (the stack stays dense: one width for all experts).
    Each output row costs one expert's matrix, so the FLOPs per feature are those of one ``[in, out]`` matrix."""
    _, in_features, out_features = (int(s) for s in val(w).shape)
    rows = numel(node) // out_features
    contract(ctx, ctx.block(x), rank(x) - 1, w, 1, 2.0 * rows * out_features)
    labels = ctx.new_labels((out_features,))
    ctx.use(w, 2, labels, "out", 2.0 * rows * in_features)
    return Block((rank(node) - 1,), labels)


@rule(aten._grouped_mm, "transformers::grouped_mm_fallback", seeding=True)
def grouped_mm(ctx: Any, node: Node) -> Block | None:
    """``grouped_mm(x [rows, in], w [E, in, out], offs)``: rows sorted by expert, ``offs`` their cumulative
    counts (Hugging Face MoE layers under ``torch.export``): the stacked-expert rule."""
    x, w = node.args[0], node.args[1]
    if not ctx.is_param(w) or rank(w) != 3 or rank(x) not in (2, 3) or arg(node, 3, "bias") is not None:
        _opaque(ctx, node, rank(node) - 1, "a grouped matmul other than rows × stacked parameter experts")
        return None
    return _stacked(ctx, node, x, w)


@rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, seeding=True)
def conv(ctx: Any, node: Node) -> Block | None:
    x, w, b = node.args[0], node.args[1], arg(node, 2, "bias")
    groups = arg(node, 8, "groups", 1) if node.target == aten.convolution.default else arg(node, 6, "groups", 1)
    transposed = node.target == aten.convolution.default and arg(node, 7, "transposed", False)
    if ctx.is_param(w) and not transposed and groups != 1 and _depthwise(node, w, groups):
        return _depthwise_channels(ctx, node, x, w, b)
    if not ctx.is_param(w) or groups != 1 or transposed:
        _opaque(ctx, node, 1, "convolution with groups, transposition or a computed weight")
        return None
    out_ch = int(val(w).shape[0])
    per_out = numel(node) // out_ch
    contract(ctx, ctx.block(x), 1, w, 1, 2.0 * per_out * val(w).numel() / int(val(w).shape[1]))
    return _seed(ctx, node, 1, w, 0, b)


def _depthwise(node: Node, w: Node, groups: int) -> bool:
    """One filter per channel: ``groups`` = input channels = output channels, weight ``[C, 1, k...]``."""
    shape = tuple(int(s) for s in val(w).shape)
    x = val(node.args[0])
    return shape[1] == 1 and shape[0] == groups and isinstance(x, torch.Tensor) and x.shape[1] == groups


def _depthwise_channels(ctx: Any, node: Node, x: Node, w: Node, b: Any) -> Block | None:
    """Channel ``c`` of the output is filter ``c`` over channel ``c`` of the input (plus ``bias[c]``): the input's
    labels go through; the filters and the bias are tied to them as producers (zeroed with the channel, so a
    removed channel is exactly zero after the convolution too)."""
    block = ctx.block(x)
    if block is None:  # the channels start here: a seeding op like any convolution
        _opaque(ctx, node, 1, "a depthwise convolution of unlabelled channels")
        return None
    if block.axes != (1,) or block.outer[0] != 1:
        ctx.refuse_block(block, "a depthwise convolution over channels mixed with other dims")
        _opaque(ctx, node, 1, "a depthwise convolution over channels mixed with other dims")
        return None
    labels = block.labels
    ctx.use(w, 0, labels, "out", 2.0 * numel(node) / len(labels) * int(np.prod(val(w).shape[1:])))
    if ctx.is_param(b):
        ctx.use(b, 0, labels, "out")
    return Block((1,), labels, block.outer, block.zero)


@rewrite(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
def rewrite_depthwise_groups(ctx: Any, node: Node) -> None:
    """A depthwise convolution keeps one group per kept channel."""
    old, new = ctx.old_block(node.args[0]), ctx.new_block(node.args[0])
    if old is None or new is None or old.axes != (1,):
        return
    i = 8 if node.target == aten.convolution.default else 6
    groups = arg(node, i, "groups", 1)
    if groups == int(old.labels.shape[0]) and groups != 1:
        new_groups = int(new.labels.shape[0])
        if len(node.args) > i:
            node.args = (*node.args[:i], new_groups, *node.args[i + 1:])
        else:
            node.kwargs = {**node.kwargs, "groups": new_groups}


@rule(aten.embedding, seeding=True)
def embedding(ctx: Any, node: Node) -> Block | None:
    w, idx = node.args[0], node.args[1]
    if ctx.block(idx) is not None:
        ctx.refuse_block(ctx.block(idx), "channels used as embedding indices")
    if not ctx.is_param(w):
        _opaque(ctx, node, rank(node) - 1, "embedding with a computed table")
        return None
    dim = int(val(w).shape[1])
    labels = ctx.new_labels((dim,))
    ctx.use(w, 1, labels, "out")
    return Block((rank(node) - 1,), labels)


__all__: list[str] = []
