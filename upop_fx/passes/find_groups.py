"""FindGroups: the analysis pass that finds every set of channels that must be removed together.

Requires: a GraphModule made by :func:`upop_fx.capture` — its ``gm.meta["upop_capture"]`` gives the example
batch size that per-sample FLOPs are divided by, every tensor node carries ``meta["val"]``, parameters are
``get_attr`` nodes.
Ensures (an analysis, in place, ``modified=False``): ``gm.meta["upop_groups"]`` holds a
:class:`~upop_fx.ir.groups.GroupAnalysis` in which no class of labels is in two prunable groups, each node's
``meta["upop_dims"]`` its channel :class:`~upop_fx.ir.groups.Block` (or None); the graph itself is unchanged.

Labels are created where channels are produced (Linear/conv outputs, embeddings) and flow forward through one
rule per op family (``passes/rules``). Classes (labels that must go together) come from a union-find; groups
are the connected components of the producer–class graph held by networkx. A group is classified from the graph
alone: its classes are the q/k dims of an attention (``qk``), its v dims (``v``), or hidden neurons consumed by
a following matmul (``mlp``). A group that touches an op without a rule, reaches the model output, or is
normalised is kept in the listing as not prunable, with the node and reason. A key/value head broadcast over the
query heads by an ``expand`` is copied per head (:class:`~upop_fx.ir.groups.HeadCopies`): its copies are in the
attention's groups, its own rows (the copies' source) in none — they go with the last of their copies. The
positions a constant pad adds along a channel axis (:class:`~upop_fx.ir.groups.Padding`) are in no group either:
they go with their whole row (a head).

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.passes import FindGroups
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> cap = upop_fx.capture(layer, torch.randn(2, 5, 16))
    >>> [g.kind for g in FindGroups()(cap.gm).value.prunable]
    ['qk', 'v', 'mlp']
"""

from __future__ import annotations

import logging
from collections import defaultdict

import networkx as nx
import numpy as np
import torch

from ..capture.program import get_capture
from ..errors import PostconditionError, PreconditionError
from ..ir.cost import class_costs
from ..ir.groups import DIMS_KEY, GROUPS_KEY, AttentionSite, DimGroup, GroupAnalysis, followers, get_analysis
from .base import GraphPass, PassResult
from .param_views import ParamView, resolve
from .rules import REWRITES, key_of
from .trace import LabelTracer

__all__ = ["FindGroups"]

log = logging.getLogger(__name__)


class FindGroups(GraphPass[GroupAnalysis]):
    """Find the dimension groups of a captured graph (see the module docstring)."""

    in_place = True

    def requires(self, gm: torch.fx.GraphModule) -> None:
        try:
            get_capture(gm)
        except LookupError as exc:
            raise PreconditionError(f"FindGroups: {exc} (it gives the batch size FLOPs are counted per)") from exc
        missing = [n.name for n in gm.graph.nodes if n.op in ("call_function", "get_attr") and "val" not in n.meta]
        if missing:
            raise PreconditionError(f"FindGroups: nodes without meta['val'] (not a torch.export graph?): {missing[:5]}")

    def ensures(self, gm: torch.fx.GraphModule, result: PassResult[GroupAnalysis]) -> None:
        analysis = get_analysis(gm)
        seen = [int(c) for g in analysis.prunable for c in g.classes]
        if len(seen) != len(set(seen)):
            raise PostconditionError("FindGroups: a class of channels is in two prunable groups (or twice in one)")
        unlabelled = [n.name for n in gm.graph.nodes if DIMS_KEY not in n.meta]
        if unlabelled:
            raise PostconditionError(f"FindGroups: nodes the label tracer did not visit: {unlabelled[:5]}")
        unlisted = unlisted_weights(gm, analysis)
        if unlisted:
            raise PostconditionError(
                f"FindGroups: the output channels of {unlisted[:5]} are in no group (neither prunable nor reported)"
            )

    def run(self, gm: torch.fx.GraphModule) -> PassResult[GroupAnalysis]:
        tracer = LabelTracer(gm)
        tracer.run()
        _tie_shared_entries(tracer)
        _settle_copies(tracer)
        _settle_paddings(gm, tracer)
        analysis = _group(gm, tracer, get_capture(gm).batch_size)
        nodes = {n.name: n for n in gm.graph.nodes}
        for name in unlisted_weights(gm, analysis):  # no rule labelled them: listed, not left out
            node = nodes[name]
            v = node.meta.get("val")
            axis = 1 if node.target in _CONVS else -1
            width = int(v.shape[axis]) if isinstance(v, torch.Tensor) and v.dim() > 1 else 0
            left = _left_weight(node, {})
            why = (f"its weight {left.param.target} stands on the left (W @ x): it mixes rows (tokens), not channels"
                   if left is not None else "no rule follows the output channels of this weighted op")
            analysis.groups.append(DimGroup(
                id=len(analysis.groups), kind="other", width=width, tower="", layer=-1, scope="", prunable=False,
                reason=f"node {name} ({node.target}): {why}",
            ))  # fmt: skip
            analysis.seeded.append(name)
        gm.meta[GROUPS_KEY] = analysis
        for g in analysis.groups:
            log.debug("group %s", g.describe())
        return PassResult(gm, False, analysis)


#: ops with a weight whose output channels every analysis must account for: (op, index of the weight argument)
WEIGHTED = {
    torch.ops.aten.linear.default: 1, torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv2d.default: 1,
    torch.ops.aten.conv3d.default: 1, torch.ops.aten.convolution.default: 1, torch.ops.aten.embedding.default: 0,
    torch.ops.aten.addmm.default: 2, torch.ops.aten.mm.default: 1, torch.ops.aten.matmul.default: 1,
}  # fmt: skip


#: matmuls whose weight may stand on the left (``W @ x``): its rows are the output's rows
_LEFT_WEIGHTED = {torch.ops.aten.mm.default, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}

_CONVS = {
    torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
    torch.ops.aten.convolution.default,
}


def _left_weight(node: torch.fx.Node, views: dict[str, object]) -> ParamView | None:
    """The weight of ``W @ x`` (a parameter, or a view of one, on the left of a matmul), else None."""
    if node.target not in _LEFT_WEIGHTED or not node.args:
        return None
    view = resolve(node.args[0], views)
    return view if isinstance(view, ParamView) else None


def unlisted_weights(gm: torch.fx.GraphModule, analysis: GroupAnalysis) -> list[str]:
    """The invariant every analysis keeps: each op that applies a parameter weight (``linear``, a convolution,
    an embedding, a matmul with a parameter or a view of one, or any other op consuming a parameter of rank 2 or
    more, such as a grouped expert matmul) labelled its output channels or recorded its use of the parameter,
    so that they are in a prunable group or listed as not prunable with a reason. Returns the nodes that break
    it."""
    views: dict[str, object] = {}
    seeded = set(analysis.seeded)
    used = {(u.node, u.name) for u in analysis.uses if u.role == "out"}
    params = {name for name, _ in gm.named_parameters()}
    out: list[str] = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.name in seeded:
            continue
        i = WEIGHTED.get(n.target)
        left = _left_weight(n, views)
        if left is not None and str(left.param.target) in params:  # W @ x: a weight mixing rows
            if (n.name, str(left.param.target)) not in used:
                out.append(n.name)
            continue
        if i is not None and len(n.args) > i:
            view = resolve(n.args[i], views)
            if isinstance(view, ParamView) and (n.name, str(view.param.target)) in used:
                continue  # its weight re-produces channels it is given (a depthwise convolution)
            if n.target in (torch.ops.aten.linear.default, torch.ops.aten.embedding.default) or isinstance(view, ParamView):
                out.append(n.name)
            continue
        for a in n.all_input_nodes:  # any other op that consumes a weight matrix (not through a view op)
            view = resolve(a, views)
            if not isinstance(view, ParamView) or isinstance(resolve(n, views), (ParamView, list)):
                continue
            if str(view.param.target) not in params:  # a buffer (a rotary table), not a weight
                continue
            val = view.param.meta.get("val")
            matrix = isinstance(val, torch.Tensor) and val.dim() >= 2 and min(val.shape[-2:]) > 1
            if matrix and (n.name, str(view.param.target)) not in used:
                out.append(n.name)
                break
    return out


def _tie_shared_entries(tracer: LabelTracer) -> None:
    """A parameter entry tied to channels by several uses (a weight applied twice: ALBERT's shared layers,
    DeBERTa's key projection of the tokens and of the relative positions) is removed for all of them at once:
    their channels must go together."""
    first: dict[tuple[str, int, int], int] = {}
    for u in tracer.uses:
        for pos, label in zip(u.where.tolist(), u.labels.tolist()):
            key = (u.name, u.axis, pos)
            if key in first:
                tracer.union(np.array([first[key]]), np.array([label]))
            else:
                first[key] = label


def _settle_copies(tracer: LabelTracer) -> None:
    """Keep the per-head copies of a broadcast key/value head (:class:`~upop_fx.ir.groups.HeadCopies`) only where
    their source can follow them: a source that is refused, read as an attention's own q or v, or coupled with
    its copies, makes the copies their source again (unioned), as if never copied."""
    roots = tracer.roots()
    refused = {int(roots[x]) for x in tracer.refusals}
    claimed = {int(r) for s in tracer.sites for labels in (s.q, s.v) if labels is not None
               for r in np.unique(roots[labels]).tolist()}
    copied = {int(r) for c in tracer.copies for r in np.unique(roots[c.copies]).tolist()}
    kept = []
    for c in tracer.copies:
        sources = {int(r) for r in np.unique(roots[c.source]).tolist()}
        if sources & (refused | claimed | copied):
            tracer.union(c.copies, np.broadcast_to(c.source, c.copies.shape))
            roots = tracer.roots()
        else:
            kept.append(c)
    tracer.copies = kept


def _settle_paddings(gm: torch.fx.GraphModule, tracer: LabelTracer) -> None:
    """Keep a pad's positions (:class:`~upop_fx.ir.groups.Padding`) following their rows only where their classes
    hold padded positions alone. One coupled with a weight's channels (a key padded where its query is not) cannot
    follow: its rows and it are refused, its positions joined to that class (none is left in no group), and it is
    forgotten — until no kept pad touches such a class. A refused pad refuses its rows (what could not go with
    them, they keep)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    why = "its padded positions are coupled with channels of a weight"
    while True:
        roots = tracer.roots()
        padded = tracer.is_padding(np.arange(len(roots)))
        mixed = set(roots[padded].tolist()) & set(roots[~padded].tolist())
        p = next((p for p in tracer.paddings if set(roots[p.labels].reshape(-1).tolist()) & mixed), None)
        if p is None:
            break
        tracer.node = nodes[p.node]
        tracer.refuse(p.rows, why)
        tracer.refuse(p.labels, why)
        joined = next(x for x in p.labels.reshape(-1).tolist() if int(roots[x]) in mixed)
        tracer.union(p.labels.reshape(-1), np.array([joined]))
        tracer.paddings.remove(p)
    refused = {int(roots[x]): reason for x, reason in sorted(tracer.refusals.items())}
    for p in tracer.paddings:
        reason = next((refused[r] for r in sorted(set(roots[p.labels].reshape(-1).tolist())) if r in refused), None)
        if reason is not None:
            for x in p.rows.reshape(-1).tolist():
                tracer.refusals.setdefault(int(x), reason)
    tracer.node = None


def _group(gm: torch.fx.GraphModule, tracer: LabelTracer, batch_size: int) -> GroupAnalysis:
    roots = tracer.roots()
    follower, leader = followers(tracer.copies, tracer.paddings)
    sources = {int(r) for r in np.unique(roots[follower]).tolist()}
    graph = _coupling_graph(tracer, roots, sources)
    refused: dict[int, str] = {}
    for label, reason in tracer.refusals.items():
        refused.setdefault(int(roots[label]), reason)
    shapes = {n.target: tuple(int(d) for d in n.meta["val"].shape) for n in gm.graph.nodes if n.op == "get_attr"}
    cost_p, cost_f = class_costs(roots, tracer.uses, tracer.sites, shapes, batch_size)
    _share_follower_costs(roots[follower], roots[leader], cost_p, cost_f)
    uses_by_class: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(tracer.uses):
        for r in set(roots[u.labels].tolist()):
            uses_by_class[r].append(i)
    site_role: dict[int, tuple[str, AttentionSite]] = {}
    for site in tracer.sites:
        for role, labels in (("qk", site.q), ("v", site.v)):
            if labels is not None:
                for r in np.unique(roots[labels]).tolist():
                    site_role.setdefault(r, (role, site))
    node_scope = _node_scopes(gm)
    seed_nodes = {name: n for n in gm.graph.nodes for name in [n.name]}
    groups: list[DimGroup] = []
    class_channel: dict[int, tuple[int, int]] = {}
    shape_nodes = _shape_nodes(gm, roots)
    seed_of_class: dict[int, int] = {}
    for s, (_, labels) in enumerate(tracer.seeds):
        for r in roots[labels].tolist():
            seed_of_class.setdefault(r, s)
    components = sorted(nx.connected_components(graph), key=lambda c: min(seed_of_class[r] for r in c))
    cross: dict[int, bool] = {}
    for classes in components:
        seeds = sorted({seed_of_class[r] for r in classes})
        gid = len(groups)
        g = _classify(gid, seeds, classes, tracer, roots, site_role, refused, uses_by_class)
        used = sorted({i for r in classes for i in uses_by_class[r]})
        scope = _common_scope([node_scope.get(tracer.uses[i].node, "") for i in used])
        g.scope = scope
        g.tower, g.layer = _tower_layer(scope)
        if g.site is not None and g.kind in ("qk", "v"):  # one walk per site: its qk and v groups share it
            if g.site not in cross:
                cross[g.site] = _is_cross(tracer.sites[g.site], tracer, roots, seed_nodes)
            g.cross = cross[g.site]
        order = g.classes
        pos = {int(r): c for c, r in enumerate(order.tolist())}
        g.cost_params = cost_p[order]
        g.cost_flops = cost_f[order]
        for i in used:
            u = tracer.uses[i]
            chan = u.full(np.array([pos.get(int(r), -1) for r in roots[u.labels]], dtype=np.int64), -1)
            (g.producers if u.role == "out" else g.consumers).append((u.name, u.axis, chan))
        stacks = {shapes[u.name][0] for u in (tracer.uses[i] for i in used) if len(shapes[u.name]) == 3 and u.axis > 0}
        if g.kind == "mlp" and len(stacks) == 1:
            g.experts = int(stacks.pop())
        for c, r in enumerate(order.tolist()):
            class_channel[int(r)] = (gid, c)
        g.shape_nodes = [name for name, rs in shape_nodes.items() if rs & classes]
        groups.append(g)
    seeded = list(dict.fromkeys(name for name, _ in tracer.seeds))
    return GroupAnalysis(groups, tracer.uses, tracer.sites, roots, class_channel, batch_size, seeded, tracer.tables,
                         tracer.copies, tracer.paddings)


def _share_follower_costs(follower: np.ndarray, leader: np.ndarray, cost_p: np.ndarray, cost_f: np.ndarray) -> None:
    """A follower class's cost (``follower[i]`` follows ``leader[i]``, as classes: :func:`~upop_fx.ir.groups.followers`
    — a broadcast source's projection rows, the weight entries a padded position meets) shared equally by the
    classes it follows: it is saved once all of them go, so a query head carries its share (an estimate; a latency
    budget measures)."""
    of_source: dict[int, set[int]] = defaultdict(set)
    for s, r in zip(follower.tolist(), leader.tolist()):
        of_source[s].add(r)
    for s, rs in of_source.items():
        for cost in (cost_p, cost_f):
            share, cost[s] = cost[s] / len(rs), 0.0
            for r in rs:
                cost[r] += share


def _shape_nodes(gm: torch.fx.GraphModule, roots: np.ndarray) -> dict[str, set[int]]:
    """Nodes whose literal arguments surgery rewrites (shapes, split sizes, indices, the attention scale),
    with the classes their channel blocks carry."""
    out: dict[str, set[int]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or key_of(n.target) not in REWRITES:
            continue
        classes: set[int] = set()
        for b in [n.meta.get(DIMS_KEY), *(a.meta.get(DIMS_KEY) for a in n.all_input_nodes)]:
            for x in b if isinstance(b, list) else [b]:
                if x is not None and hasattr(x, "labels"):
                    classes.update(np.unique(roots[x.labels]).tolist())
        if classes:
            out[n.name] = classes
    return out


def _coupling_graph(tracer: LabelTracer, roots: np.ndarray, sources: set[int]) -> nx.Graph:
    """Classes linked into structures: an attention's q/k dims, its v dims, and the rest of each producer. The
    ``sources`` of per-head copies are in none: they follow their copies."""
    graph = nx.Graph()
    graph.add_nodes_from(r for r in np.unique(roots).tolist() if r not in sources)
    claimed: set[int] = set()
    for site in tracer.sites:
        for labels in (site.q, site.v):
            if labels is not None:
                r = np.unique(roots[labels]).tolist()
                claimed.update(r)
                nx.add_path(graph, r)
    for _, labels in tracer.seeds:
        free = [r for r in dict.fromkeys(roots[labels].tolist()) if r not in claimed and r not in sources]
        nx.add_path(graph, free)
    return graph


def _classify(gid, seeds, classes, tracer, roots, site_role, refused, uses_by_class) -> DimGroup:  # noqa: ANN001
    roles = {site_role[r][0] for r in classes if r in site_role}
    sites = {site_role[r][1].index for r in classes if r in site_role}
    reason = next((refused[r] for r in sorted(classes) if r in refused), None)
    kind, heads, head_dim, site_idx, dims = "other", None, None, None, None
    if len(roles) == 1 and len(sites) == 1:
        kind = roles.pop()
        site_idx = sites.pop()
        site = tracer.sites[site_idx]
        labels = site.q if kind == "qk" else site.v
        heads, head_dim = int(labels.shape[0]), int(labels.shape[1])
        order = roots[labels.reshape(-1)]
        layout = _layout(roots[labels]) if len(set(order.tolist())) != len(order) else None
        if layout is not None:  # grouped query heads share their KV head's dims; rotary pairs share a class
            order, heads, dims = layout
            if dims is not None:
                head_dim = len(dims)
        if len(set(order.tolist())) != len(order) or set(order.tolist()) != classes:
            rows = {tuple(r) for r in roots[labels].tolist()}
            shared = len(rows) > 1 and len({c for r in rows for c in set(r)}) < sum(len(set(r)) for r in rows)
            reason = reason or (
                f"node {site.node}: its {kind} dims are shared by several heads (a key part every head reads, as "
                "latent attention's rotary key), so no head or head dim can go alone" if shared else
                f"node {site.node}: the {kind} dims of this attention are coupled with other channels")
    elif roles:
        reason = reason or "channels shared between attention roles or layers"
        order = np.array(sorted(classes), dtype=np.int64)
    else:
        seen: dict[int, None] = {}
        for s in seeds:
            for r in roots[tracer.seeds[s][1]].tolist():
                if r in classes:
                    seen.setdefault(int(r), None)
        order = np.array(list(seen), dtype=np.int64)
        consumed = any(tracer.uses[i].role == "in" for r in classes for i in uses_by_class[r])
        kind = "mlp" if consumed else "other"
        if not consumed:
            reason = reason or "no matmul consumes these channels"
    if reason is not None and kind == "mlp":
        kind = "other"
    if kind == "other" and reason is None:
        reason = "not a recognised structure"
    g = DimGroup(
        id=gid, kind=kind, width=len(order), tower="", layer=-1, scope="", heads=heads, head_dim=head_dim,
        site=site_idx, prunable=reason is None, reason=reason, classes=order, dims=dims,
    )  # fmt: skip
    if g.head_is_channel:
        mine = set(order.tolist())
        g.whole_heads = next((text for x, text in tracer.slices.items() if int(roots[x]) in mine),
                             "a head's dims are coupled together")
    return g


def _layout(head_roots: np.ndarray) -> tuple[np.ndarray, int, tuple[tuple[int, ...], ...] | None] | None:
    """The channel layout of an attention's (heads, head_dim) classes when it is not one class per position:
    ``(classes in channel order, heads, dims)``. Heads that carry the same classes (grouped-query attention: the
    query heads of one KV head, after ``repeat_kv``) are one head; within a head, classes that come in equal
    tuples at the same positions in every head are rotary pairs (``dims``: per channel its positions). None for
    any other pattern."""
    rows = list(dict.fromkeys(tuple(r) for r in head_roots.tolist()))
    distinct = np.array(rows, dtype=np.int64)
    if len(set(distinct.reshape(-1).tolist())) == distinct.size:  # grouped heads, one class per position
        return distinct.reshape(-1), len(rows), None
    whole = distinct[:, 0]
    if (distinct == whole[:, None]).all() and len(set(whole.tolist())) == len(rows):  # a head is one class
        return whole, len(rows), (tuple(range(distinct.shape[1])),)
    paired = _pairs(distinct)
    if paired is None:
        return None
    return paired[0], len(rows), paired[1]


def _pairs(head_roots: np.ndarray) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]] | None:
    """Classes of an attention's (heads, head_dim) positions that come in pairs within each head, at the same
    positions in every head (RoPE: ``j`` with ``j + d/2``, or ``2i`` with ``2i + 1``; with partial rotary the
    other dims stay single): the classes in channel order (head-major) and, per channel of a head, its
    positions. None for any other pattern."""
    heads, d = head_roots.shape
    pattern = None
    order: list[int] = []
    for h in range(heads):
        first: dict[int, list[int]] = {}
        for p, r in enumerate(head_roots[h].tolist()):
            first.setdefault(r, []).append(p)
        positions = tuple(tuple(g) for g in first.values())
        if any(len(g) > 2 for g in positions):
            return None
        if pattern is None:
            pattern = positions
        elif positions != pattern:
            return None
        order += list(first)
    if len(set(order)) != len(order):  # a class shared between heads
        return None
    return np.array(order, dtype=np.int64), pattern


def _node_scopes(gm: torch.fx.GraphModule) -> dict[str, str]:
    out = {}
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            out[n.name] = list(stack.values())[-1][0]
    return out


def _common_scope(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    common = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        common.append(xs[0])
    return ".".join(common)


def _tower_layer(scope: str) -> tuple[str, int]:
    parts = scope.split(".") if scope else []
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]), int(p)
    return scope, -1


def _is_cross(site: AttentionSite, tracer: LabelTracer, roots: np.ndarray, nodes: dict) -> bool:  # noqa: ANN001
    """Cross-attention: q and k are projected from tensors computed from different model inputs (text queries
    over image keys, a decoder over its encoder's output). Two projections of one layer's input — directly, or
    through low-rank latents as in latent attention — are self-attention."""
    if site.q is None or site.k is None:
        return False

    def source(label: int) -> object:
        for name, labels in tracer.seeds:
            if labels[0] <= label <= labels[-1]:
                node = nodes[name]
                return _activation_input(node)
        return None

    q, k = source(int(site.q.reshape(-1)[0])), source(int(site.k.reshape(-1)[0]))
    if q is k:
        return False
    if not isinstance(q, torch.fx.Node) or not isinstance(k, torch.fx.Node):
        return True
    return _input_ancestors(q) != _input_ancestors(k)


_SIZES = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def _input_ancestors(node: torch.fx.Node) -> frozenset[str]:
    """The graph inputs (placeholders) ``node``'s values are computed from (not those that lend a size only)."""
    seen, todo, found = {node}, [node], set()
    while todo:
        n = todo.pop()
        if n.op == "placeholder":
            found.add(n.name)
        for a in n.all_input_nodes:
            if a not in seen and not isinstance(a.meta.get("val"), _SIZES):
                seen.add(a)
                todo.append(a)
    return frozenset(found)


def _activation_input(node: torch.fx.Node) -> object:
    for a in node.args:
        if isinstance(a, torch.fx.Node) and a.op != "get_attr":
            return a
    return None
