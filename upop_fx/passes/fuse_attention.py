"""FuseMaskedAttention: masked q/k/v + SDPA → one call of the Triton ``masked_attention`` kernel.

Requires: a GraphModule from :class:`~upop_fx.passes.insert_masks.InsertMasks` (its ``gm.meta["upop_masks"]``
and the :class:`~upop_fx.passes.insert_masks.MaskTag` on each masking ``mul``), nodes with capture's
``meta["val"]``; ``device``: the device type where the kernel pays (``"cuda"``).
Ensures, **in place**: each ``aten.scaled_dot_product_attention`` whose q, k and v come through shape-only ops
(view, transpose, unbind, split, ...) from a tagged ``mul(producer, mult)`` becomes a call of the registered op
``torch.ops.upop_fx.masked_attention`` (``q', k', v', qk_mask, v_mask, scale=s, causal=c,
key_padding_mask=p``), so the fused graph still exports and compiles: q', k', v' are the
same shape ops on the *unmasked* producers, the masks (H, D) gathers of the same mask parameters, ``s`` the
SDPA's scale (1/sqrt(D) pinned when it had none). Outputs and gradients (weights and masks) are unchanged;
nodes the rewrite orphans are removed (nodes dead before stay); the graph lints and is recompiled. Nothing
changes (``modified=False``) unless the model's parameters (masks aside) are on ``device`` or ``force=True``.
The value is a :class:`FusionReport`.

Left unfused (the reason is logged at debug level and reported): q and k masks that differ (the kernel applies
one ``qk_mask`` to both), dropout, GQA, head dims outside 16..128, dtypes the kernel lacks, and any
``attn_mask`` but a boolean AND of key-padding factors (broadcast over heads and queries), provably all-true
factors (HF's ``q_idx >= 0``) and top-left causal factors (HF's ``kv_idx <= q_idx``: ``causal=True``).
Float (additive) masks stay unfused. A query row with no key left gives 0 in the kernel (SDPA may give NaN).

Which mask element multiplies each SDPA input position comes from a *probe*: the producer's channel numbers,
at small sizes substituted for the symbolic ones, run through the same shape ops; the result must depend on
(head, dim) only, the same at two different sizes; it is composed with InsertMasks' gather index.

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.passes import FindGroups, InsertMasks
    >>> from upop_fx.passes.fuse_attention import FuseMaskedAttention
    >>> layer = torch.nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()  # head dim 16
    >>> x = torch.randn(2, 5, 32)
    >>> cap = upop_fx.capture(layer, x)
    >>> from upop_fx.ir.entries import build_entries
    >>> analysis = FindGroups()(cap.gm).value
    >>> masked = InsertMasks(*build_entries(analysis, "upop"))(cap.gm).gm
    >>> FuseMaskedAttention(device="cuda")(masked).modified   # parameters on CPU: left alone
    False
    >>> want = masked(x)
    >>> result = FuseMaskedAttention(force=True)(masked)
    >>> result.modified, result.value.fused
    (True, ['scaled_dot_product_attention'])
    >>> bool(torch.allclose(result.gm(x), want, atol=1e-5))
    True
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy
import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.node import map_arg
from torch.fx.operator_schemas import normalize_function

from ..errors import PostconditionError
from ..kernels._checks import KERNEL_DTYPES, MAX_HEAD_DIM, MIN_HEAD_DIM
from ..kernels.masked_attention import MASKED_ATTENTION_OP
from .base import GraphPass, PassResult
from .insert_masks import MASK_MODULE, MASK_TAG_KEY, MaskTag, get_masks

__all__ = ["FuseMaskedAttention", "FusionReport"]

log = logging.getLogger(__name__)
aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

# ops that only move elements (each output element is an input element); the tensor is the first argument
_SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.unflatten.int, aten.flatten.using_ints, aten.select.int, aten.slice.Tensor, aten.narrow.default,
    aten.contiguous.default, aten.clone.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.t.default, aten.alias.default, aten.movedim.int,
    aten.swapaxes.default,
}  # fmt: skip
_MULTI_OPS = {
    aten.unbind.int, aten.split.Tensor, aten.split.sizes, aten.split_with_sizes.default, aten.chunk.default,
}  # fmt: skip
_TO_OPS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default}
_AND_OPS = {aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default}
_OR_OPS = {aten.__or__.Tensor, aten.bitwise_or.Tensor, aten.logical_or.default}
_ONES = {aten.new_ones.default, aten.ones.default, aten.ones_like.default}
_FULL = {aten.full.default: 1, aten.new_full.default: 2, aten.full_like.default: 1}  # -> position of the fill
_CAUSAL = "causal"


class _Skip(Exception):
    """Why one attention site stays unfused."""


@dataclass
class FusionReport:
    """What :class:`FuseMaskedAttention` did: SDPA nodes fused, and why the others were not."""

    fused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # SDPA node name -> reason
    reason: str = ""  # why the pass did not look at the graph at all (device), if it did not


@dataclass
class _Source:
    """One SDPA input: the InsertMasks ``mul`` it comes from and the (H, D) positions in ``cat`` that scale it."""

    mul: Node
    producer: Node
    cat: Node  # cat([1, masks...]) of InsertMasks
    dtype: torch.dtype | None  # the cast InsertMasks applied to the gathered mask
    chain: list[Node]  # shape ops from the mul to the SDPA input, in graph order
    device: torch.device
    gather: np.ndarray  # (H, D)
    ident: list[tuple[str | None, int]]  # per (h, d): (mask parameter, element); (None, 0) is the constant 1


@dataclass
class _Plan:
    sdpa: Node
    srcs: list[_Source]  # q, k, v
    scale: float
    causal: bool
    kpm: list[Node]  # boolean key-padding factors to AND (none: no key_padding_mask)


class FuseMaskedAttention(GraphPass[FusionReport]):
    """Fuse masked attention sites into the registered kernel op (see the module docstring)."""

    in_place = True

    def requires(self, gm: torch.fx.GraphModule) -> None:
        get_masks(gm)

    def ensures(self, gm: torch.fx.GraphModule, result: PassResult[FusionReport]) -> None:
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is MASKED_ATTENTION_OP]
        fused = set(result.value.fused)
        if len(calls) < len(fused) or any(n.name in fused for n in gm.graph.nodes if n.target is SDPA):
            raise PostconditionError("FuseMaskedAttention: a fused attention site is still in the graph")

    def __init__(self, device: str | torch.device = "cuda", force: bool = False) -> None:
        self.device, self.force = torch.device(device).type, force

    def run(self, gm: torch.fx.GraphModule) -> PassResult[FusionReport]:
        report = FusionReport()
        # the model's weights decide: InsertMasks creates the masks on the CPU, whatever the model's device
        devices = {p.device.type for name, p in gm.named_parameters() if not name.startswith(f"{MASK_MODULE}.")}
        if not self.force and devices != {self.device}:
            report.reason = f"parameters on {sorted(devices)}, not {self.device} (force=True fuses anyway)"
            log.debug("FuseMaskedAttention: %s", report.reason)
            return PassResult(gm, False, report)
        plans = []
        for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]:
            try:
                plans.append(_plan(gm, node))
            except _Skip as e:
                report.skipped[node.name] = str(e)
                log.debug("FuseMaskedAttention: %s left unfused: %s", node.name, e)
        if not plans:
            return PassResult(gm, False, report)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        had_users = [n for n in order if n.users]
        for plan in plans:
            report.fused.append(plan.sdpa.name)
            _rewrite(gm, plan)
        for n in reversed(had_users):  # erase what the rewrites orphaned, users first
            if not getattr(n, "_erased", False) and not n.users and n.op in ("call_function", "get_attr"):
                if not n.is_impure():
                    gm.graph.erase_node(n)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True, report)


# ------------------------------------------------------------------------------------- analysis
def _plan(gm: torch.fx.GraphModule, sdpa: Node) -> _Plan:
    norm = normalize_function(SDPA, sdpa.args, sdpa.kwargs, normalize_to_only_use_kwargs=True)
    a = norm.kwargs if norm is not None else {}
    if not (isinstance(a.get("dropout_p"), (int, float)) and a["dropout_p"] == 0) or a["enable_gqa"] is not False:
        raise _Skip(f"dropout_p={a.get('dropout_p')}, enable_gqa={a.get('enable_gqa')} (the kernel has neither)")
    if not isinstance(a["is_causal"], bool) or not (a["scale"] is None or isinstance(a["scale"], (int, float))):
        raise _Skip("is_causal or scale is not a constant")
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    qv, kv, vv = (_val(x) for x in (q, k, v))
    if not qv.dim() == kv.dim() == vv.dim() == 4:
        raise _Skip("q, k, v are not 4-D (B, H, T, D)")
    B, H, Tq, D = qv.shape
    if not isinstance(D, int) or not isinstance(H, int) or not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise _Skip(f"head dim {D} is outside the kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if qv.dtype not in KERNEL_DTYPES or not qv.dtype == kv.dtype == vv.dtype:
        raise _Skip(f"dtypes {qv.dtype}, {kv.dtype}, {vv.dtype} (the kernel takes one of {KERNEL_DTYPES})")
    Tk = kv.shape[2]
    pairs = zip((B, H, D, *kv.shape), (kv.shape[0], kv.shape[1], kv.shape[3], *vv.shape))
    if not all(_same(x, y) for x, y in pairs):
        raise _Skip(f"q {tuple(qv.shape)}, k {tuple(kv.shape)}, v {tuple(vv.shape)} do not fit (B, H, T, D)")
    factors = [] if mask is None else _mask_factors(mask, Tq, Tk) if isinstance(mask, Node) else None
    if factors is None:
        raise _Skip("attn_mask is not a boolean key-padding/causal mask the kernel can express")
    srcs = [_source(gm, x) for x in (q, k, v)]
    if srcs[0].ident != srcs[1].ident:
        raise _Skip("q and k are multiplied by different masks (the kernel applies one qk_mask to both)")
    scale = 1.0 / math.sqrt(D) if a["scale"] is None else float(a["scale"])
    causal = a["is_causal"] or _CAUSAL in factors
    return _Plan(sdpa, srcs, scale, causal, [f for f in factors if f is not _CAUSAL])


def _val(x: Any) -> Any:
    val = x.meta.get("val") if isinstance(x, Node) else None
    if not isinstance(val, torch.Tensor):
        raise _Skip(f"{x} has no recorded tensor value (meta['val'])")
    return val


def _same(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, int) and isinstance(b, int) else statically_known_true(a == b)


def _source(gm: torch.fx.GraphModule, x: Node) -> _Source:
    """Walk from an SDPA input up through shape-only ops to InsertMasks' ``mul``; probe the channel map."""
    chain, cur = [], x
    while not _is_mask_mul(cur):
        op = cur.target if isinstance(cur, Node) and cur.op == "call_function" else None
        if op in _SHAPE_OPS:
            chain, cur = [*chain, cur], cur.args[0]
        elif op is operator.getitem and isinstance(cur.args[0], Node) and cur.args[0].target in _MULTI_OPS:
            chain, cur = [*chain, cur, cur.args[0]], cur.args[0].args[0]
        else:
            raise _Skip(f"{x.name} does not come from a masked producer through shape-only ops (met {cur})")
    mul, chain = cur, chain[::-1]
    producer, mult = mul.args
    tag: MaskTag = mul.meta[MASK_TAG_KEY]
    if tag.heads is not None:
        raise _Skip(f"{x.name} is masked by its head and its head dim (granularity='heads+dims'); the kernel takes "
                    "one mask per head dim")
    view, dtype = (list(tag.view) if tag.view is not None else None), tag.dtype
    if view is not None:
        mult = mult.args[0]
    if dtype is not None:
        mult = mult.args[0]
    cat, _, idx_node = mult.args
    idx_buf = gm.get_buffer(idx_node.target)
    ident: list[tuple[str | None, int]] = [(None, 0)]
    for m in cat.args[0][1:]:  # cat([new_ones(m, [1]), m_a, m_b, ...])
        ident += [(m.target, j) for j in range(gm.get_parameter(m.target).numel())]
    hd = [_probe(mul, producer, view, len(idx_buf), chain, x, k) for k in (0, 1)]
    if hd[0].shape != hd[1].shape or not (hd[0] == hd[1]).all():
        raise _Skip(f"the channels reaching {x.name} depend on the batch or sequence size")
    gather = idx_buf.cpu().numpy()[hd[0]]
    return _Source(mul, producer, cat, dtype, chain, idx_buf.device, gather, [ident[p] for p in gather.flat])


def _is_mask_mul(n: Any) -> bool:
    """A ``mul`` that InsertMasks tagged (:class:`MaskTag`) and that still has the form the tag describes."""
    tag = n.meta.get(MASK_TAG_KEY) if isinstance(n, Node) else None
    if not isinstance(tag, MaskTag) or n.target is not aten.mul.Tensor or not all(isinstance(a, Node) for a in n.args):
        return False
    producer, m = n.args
    if producer.name != tag.producer:
        return False
    if tag.heads is not None:  # a product of two gathers: found, and skipped by the caller
        return True
    m = m.args[0] if tag.view is not None and m.target is aten.view.default else m
    m = m.args[0] if tag.dtype is not None and m.target is aten.to.dtype else m
    if m.target is not aten.index_select.default or m.args[1] != 0 or not isinstance(m.args[2], Node):
        return False
    cat, idx = m.args[0], m.args[2]
    if idx.op != "get_attr" or idx.target != tag.index or not isinstance(cat, Node) or cat.target is not aten.cat.default:
        return False
    parts = cat.args[0] if len(cat.args) == 1 and not cat.kwargs else []
    return [p.target for p in parts[1:] if isinstance(p, Node)] == list(tag.masks)


def _probe(mul: Node, producer: Node, view: Any, width: int, chain: list[Node], x: Node, k: int) -> np.ndarray:
    """The producer channel at each (h, d) of ``x``: ``chain`` run on channel numbers at small sizes."""
    vals = [*_val(producer).shape, *_val(x).shape, *(a.meta.get("val") for n in chain for a in n.all_input_nodes)]
    sym_ints = [s for s in vals if isinstance(s, torch.SymInt)]
    assign = {}
    for i, s in enumerate(sorted({e for v in sym_ints for e in v.node.expr.free_symbols}, key=str)):
        rng = sym_ints[0].node.shape_env.var_to_range.get(s)  # distinct small sizes inside the recorded ranges
        lo, hi = (rng.lower, rng.upper) if rng is not None else (2, None)
        value = max(2 + k + i, int(lo)) if isinstance(lo, (int, sympy.Integer)) else 2 + k + i  # int_oo is not
        assign[s] = sympy.Integer(min(value, int(hi)) if isinstance(hi, (int, sympy.Integer)) else value)

    def ev(s: Any) -> Any:
        if not isinstance(s, torch.SymInt):
            return s
        e = sympy.sympify(s.node.expr.xreplace(assign))
        if e.free_symbols:
            raise _Skip(f"cannot evaluate size {s}")
        return int(e)

    def arg(a: Node) -> Any:
        if a in env:
            return env[a]
        if not isinstance(a.meta.get("val"), (int, torch.SymInt)):
            raise _Skip(f"shape op argument {a.name} is not a size")
        return ev(a.meta["val"])

    channel = torch.arange(width) if view is None else torch.arange(width).view(view)
    env: dict[Node, Any] = {mul: torch.broadcast_to(channel, [ev(s) for s in _val(producer).shape]).contiguous()}
    try:
        for n in chain:
            env[n] = n.target(*map_arg(n.args, arg), **map_arg(n.kwargs, arg))
    except (RuntimeError, IndexError, TypeError, ValueError) as e:
        raise _Skip(f"shape ops from {mul.name} to {x.name} failed on a probe: {e}") from e
    out = env[chain[-1]] if chain else env[mul]
    if list(out.shape) != [ev(s) for s in _val(x).shape] or not (out == out[:1, :, :1, :]).all():
        raise _Skip(f"the channel reaching {x.name} depends on the batch or token position")
    return out[0, :, 0, :].numpy()  # (H, D)


# -- attn_mask: an AND of factors, each all-true, a key-padding factor, or a top-left causal factor
def _mask_factors(n: Node, Tq: Any, Tk: Any) -> list[Any] | None:
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool or val.dim() > 4:
        return None
    if _all_true(n):
        return []
    r, (t, a) = val.dim(), (n.target, n.args)
    if all(isinstance(s, int) and s == 1 for i, s in enumerate(val.shape) if i + 4 - r in (1, 2)):
        return [n]  # broadcast over heads and queries: a key-padding factor
    if t in _AND_OPS and all(isinstance(x, Node) for x in a[:2]):
        left, right = _mask_factors(a[0], Tq, Tk), _mask_factors(a[1], Tq, Tk)
        return None if left is None or right is None else left + right
    if (t is aten.expand.default or t in _TO_OPS) and isinstance(a[0], Node):
        return _mask_factors(a[0], Tq, Tk)  # expand: right-aligned broadcast; to: bool -> bool
    if t in (aten.le.Tensor, aten.ge.Tensor) and all(isinstance(x, Node) for x in a[:2]):
        kv, qi = a[:2] if t is aten.le.Tensor else a[1::-1]  # kv_idx <= q_idx
        ik, iq = _index(kv), _index(qi)
        if ik and iq and ik[0] + 4 - ik[1] == 3 and iq[0] + 4 - iq[1] == 2 and ik[2] == iq[2]:
            if _same(_val(kv).shape[ik[0]], Tk) and _same(_val(qi).shape[iq[0]], Tq):
                return [_CAUSAL]
    return None


def _all_true(n: Any) -> bool:
    """Provably all True: ones, a nonzero fill, ``arange(..) + c >= c'`` with c >= c', and views/ANDs of those."""
    val = n.meta.get("val") if isinstance(n, Node) else None
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool or n.op != "call_function":
        return False
    t, a = n.target, n.args
    if t in _ONES:
        return True
    if t in _FULL:
        return isinstance(a[_FULL[t]], (bool, int, float)) and bool(a[_FULL[t]])
    if t in (aten.ge.Scalar, aten.gt.Scalar) and isinstance(a[1], (int, float)):
        idx = _index(a[0])
        return idx is not None and (idx[2] >= a[1] if t is aten.ge.Scalar else idx[2] > a[1])
    if t in _AND_OPS or t in _OR_OPS:
        return (all if t in _AND_OPS else any)(_all_true(x) for x in a[:2])
    return (t in _SHAPE_OPS or t in _TO_OPS) and _all_true(a[0])


def _index(n: Any) -> tuple[int, int, int] | None:
    """``(axis, rank, offset)`` for an integer tensor shown to equal ``i + offset`` along ``axis`` (broadcast
    along the others): arange, +/- constants, unsqueeze, slice, expand, casts. None when that cannot be shown."""
    if not isinstance(n, Node) or n.op != "call_function":
        return None
    t, a = n.target, n.args
    if t is aten.arange.default and len(a) == 1:  # arange(end): 0, 1, ..., end - 1
        return 0, 1, 0
    if t is aten.arange.start and isinstance(a[0], int):
        return 0, 1, a[0]
    inner = _index(a[0]) if a else None
    if inner is None:
        return None
    pos, r, off = inner
    if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        c = a[1] if len(a) > 1 else None
        if not isinstance(c, int) or isinstance(c, bool) or n.kwargs.get("alpha", 1) != 1:
            return None
        return pos, r, off + (c if t in (aten.add.Tensor, aten.add.Scalar) else -c)
    if t is aten.unsqueeze.default:
        d = a[1] if a[1] >= 0 else a[1] + r + 1
        return pos + (d <= pos), r + 1, off
    if t is aten.expand.default:  # broadcasting a size-1 index axis would make it constant
        new = pos + len(a[1]) - r
        return (new, len(a[1]), off) if _same(_val(a[0]).shape[pos], _val(n).shape[new]) else None
    if t is aten.slice.Tensor:  # slice(self, dim=0, start=None, end=None, step=1)
        dim, start, _, step = (list(a[1:]) + [None] * 4)[:4]
        dim, start = dim or 0, start or 0
        if not isinstance(start, int) or start < 0 or step not in (None, 1):
            return None
        return pos, r, off + (start if dim % r == pos else 0)
    dtype = getattr(n.meta.get("val"), "dtype", None)
    if t in (aten.clone.default, aten.contiguous.default, aten.alias.default) or (
        t in _TO_OPS and dtype in (torch.int64, torch.int32)
    ):
        return inner
    return None


# ------------------------------------------------------------------------------------- rewrite
def _rewrite(gm: torch.fx.GraphModule, plan: _Plan) -> None:
    graph, sdpa, holder = gm.graph, plan.sdpa, gm.get_submodule(MASK_MODULE)
    with graph.inserting_before(sdpa):
        env: dict[Node, Node] = {}  # old node -> its copy on the unmasked producer (shared by q, k, v)
        ins = []
        for src in plan.srcs:
            env[src.mul] = src.producer
            for n in src.chain:
                if n not in env:
                    env[n] = graph.node_copy(n, lambda x: env.get(x, x))
            ins.append(env[src.chain[-1]] if src.chain else src.producer)
        masks = []
        for src, tag in ((plan.srcs[0], "qk"), (plan.srcs[2], "v")):
            name = f"fused_{sdpa.name}_{tag}"
            while hasattr(holder, name):
                name += "_"
            gather = torch.as_tensor(src.gather.reshape(-1), device=src.device)
            holder.register_buffer(name, gather, persistent=False)  # not in the state dict, as InsertMasks' idx
            m = graph.call_function(aten.index_select.default, (src.cat, 0, graph.get_attr(f"{MASK_MODULE}.{name}")))
            if src.dtype is not None:
                m = graph.call_function(aten.to.dtype, (m, src.dtype))
            masks.append(graph.call_function(aten.view.default, (m, list(src.gather.shape))))  # (H, D)
        kpm = _key_padding(graph, plan.kpm, ins[1]) if plan.kpm else None
        kwargs = {"scale": plan.scale, "causal": plan.causal, "key_padding_mask": kpm}
        call = graph.call_function(MASKED_ATTENTION_OP, (*ins, *masks), kwargs)
    call.meta = dict(sdpa.meta)
    sdpa.replace_all_uses_with(call)
    graph.erase_node(sdpa)


def _key_padding(graph: torch.fx.Graph, factors: list[Node], k: Node) -> Node:
    """AND the factors (each broadcast over heads and queries), drop those axes, expand to (B, Tk)."""
    f = factors[0]
    for g in factors[1:]:
        f = graph.call_function(aten.__and__.Tensor, (f, g))
    r = max(_val(x).dim() for x in factors)
    for axis in (1, 1) if r == 4 else (0,) * (r - 1):  # (b, 1, 1, k) -> (b, k); (1, 1, k) -> (k,)
        f = graph.call_function(aten.select.int, (f, axis, 0))
    if r < 4:  # no batch axis
        f = graph.call_function(aten.view.default, (f, [1, -1]))
    sizes = [graph.call_function(aten.sym_size.int, (k, i)) for i in (0, 2)]
    return graph.call_function(aten.expand.default, (f, sizes))  # (B, Tk), a view
