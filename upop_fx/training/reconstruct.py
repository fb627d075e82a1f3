"""Reconstruction after the cut: re-fit each cut layer's output projection to the dense layer's output.

A cut removes input columns of the linear maps that consume the removed channels: an attention block's output
projection, an MLP's second layer. Their output width (the residual stream) is unchanged, so the dense model's
output of that same layer is a target the cut one can be fitted to. On calibration batches, for each such layer
in the order the graph runs them, this records the *cut* model's input ``X`` to the layer (with the layers
before it already re-fitted) and the *dense* model's output ``Y`` of it, and solves the ridge-regularised least
squares

    min over W, b:  ‖X Wᵀ + b − Y‖²  +  λ · s · ‖W − W₀‖²,     s = mean(diag(XᵀX))

(``W₀`` the cut weight, ``λ`` the one of :data:`RIDGES` with the lowest error on held-out calibration batches)
in float64 from the accumulated ``XᵀX`` and ``XᵀY``. The bias
absorbs the mean of what the removed channels gave (FLAP's compensation); the weights re-mix the kept channels
to stand in for the removed ones (Kwon et al.'s mask tuning). Each layer's error on the calibration batches —
``‖X Wᵀ + b − Y‖²`` over the centred ``‖Y − Ȳ‖²`` — is reported before and after, on all of them and on the
held-out ones; a fit that does not lower the held-out error (too few calibration rows for the layer's width) is
not applied. Padded positions (where a batch's ``attention_mask`` marks them) are no rows of ``X`` or ``Y``.
Deterministic: no randomness, fixed order. Inside a process group the sums are added over the ranks (each with
its own calibration batches), so every rank fits the same weights.

A layer is re-fitted when it is a linear map (``aten.linear``; ``aten.addmm`` with a weight parameter, Hugging
Face's ``Conv1D``) whose weight the cut narrowed on its input axis and left whole on its output axis, and which
the graph uses once.

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.passes import FindGroups, Surgery
    >>> from upop_fx.training.reconstruct import reconstruct
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> cap = upop_fx.capture(layer, torch.randn(2, 5, 16))
    >>> keep = {g.id: range(g.width // 2) for g in FindGroups()(cap.gm).value.prunable if g.kind == "mlp"}
    >>> small = Surgery(keep)(cap.gm).gm
    >>> fits = reconstruct(cap.gm, small, [torch.randn(4, 5, 16) for _ in range(4)])
    >>> [(f.weight, f.after < f.before) for f in fits]
    [('linear2.weight', True)]
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.fx import Node

from ..logs import progress_bar
from ..passes.base import get_tensor, set_tensor
from . import distributed
from .loop import call, real_rows, to_device

__all__ = ["LayerFit", "reconstruct", "fit_linear", "refit_sites", "linear_parts", "residual_add", "every_fourth", "input_norms", "stored_transposed", "RIDGES"]

log = logging.getLogger(__name__)

#: the ridge weights λ tried, relative to the mean diagonal of ``XᵀX``: a larger one pulls the fit toward the cut
#: weights where the calibration activations say little; the one with the lowest error on held-out calibration
#: batches is used (with a single batch, the middle one)
RIDGES = (1e-3, 1e-2, 1e-1, 1.0)

_aten = torch.ops.aten


@dataclass
class LayerFit:
    """One re-fitted layer: its weight's name, the calibration rows (tokens) it was fitted on, and its relative
    error on them before and after (``‖X Wᵀ + b − Y‖² / ‖Y − Ȳ‖²``)."""

    weight: str
    rows: int
    before: float
    after: float
    #: the same error on the held-out calibration batches, the cut weights against the fit on the others
    #: (None with a single calibration batch)
    held_before: float | None = None
    held_after: float | None = None
    ridge: float | None = None  #: the ridge weight used (None: not applied: the held-out batches said no)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Site:
    """A linear map of the cut graph to re-fit, and the node of the same weight in the dense graph."""

    small: Node
    dense: Node
    weight: str  # the weight's attribute path (shared by both graphs)
    bias: str | None
    transposed: bool  # addmm: the weight is stored (in, out)
    #: the residual add the layer's output goes into, in each graph, and the add's other operand in ``small``
    #: (None: the output goes elsewhere, and the layer's own output is the target)
    small_add: Node | None = None
    dense_add: Node | None = None
    residual: Node | None = None


def linear_parts(n: Node) -> tuple[Node, Node, Node | None, bool] | None:
    """``(input, weight, bias, transposed)`` of a linear map node with ``get_attr`` weight (and bias)."""
    if n.op != "call_function":
        return None
    if n.target is _aten.linear.default:
        x, w, b = (list(n.args) + [None])[:3]
        b = b if b is not None else n.kwargs.get("bias")
        transposed = False
    elif n.target is _aten.addmm.default and not n.kwargs and len(n.args) == 3:
        b, x, w = n.args
        transposed = True
    else:
        return None
    if not (isinstance(w, Node) and w.op == "get_attr") or (b is not None and not (isinstance(b, Node) and b.op == "get_attr")):
        return None
    return x, w, b, transposed


#: ops that pass a layer's output on unchanged in an inference graph (a view back to (batch, tokens, features)
#: after a 2-D ``addmm`` included: rows stay rows, which :func:`reconstruct` checks on the recorded values)
_PASS_THROUGH = (_aten.dropout.default, _aten.clone.default, _aten.alias.default, _aten.view.default,
                 _aten.reshape.default, _aten._unsafe_view.default)


def residual_add(n: Node) -> tuple[Node, Node] | None:
    """``(add, other operand)`` when ``n``'s value goes, through ops of :data:`_PASS_THROUGH` only, into a plain
    ``aten.add.Tensor`` (a residual connection) as its only use."""
    path = n
    while len(path.users) == 1:
        (user,) = path.users
        if user.op == "call_function" and user.target in _PASS_THROUGH and user.args[0] is path:
            path = user
            continue
        if user.op == "call_function" and user.target is _aten.add.Tensor and not user.kwargs and len(user.args) == 2:
            other = user.args[1] if user.args[0] is path else user.args[0]
            if isinstance(other, Node) and other is not path:
                return user, other
        return None
    return None


def refit_sites(dense: torch.fx.GraphModule, small: torch.fx.GraphModule) -> list[_Site]:
    """The linear maps of ``small`` that the cut narrowed on their input axis only, in the order the graph runs
    them, each paired with the node of the same weight in ``dense`` (see the module docstring)."""
    uses: dict[str, int] = {}
    for n in small.graph.nodes:
        if n.op == "get_attr":
            uses[n.target] = len(n.users)
    in_dense: dict[str, Node] = {}
    for n in dense.graph.nodes:
        parts = linear_parts(n)
        if parts is not None:
            in_dense.setdefault(parts[1].target, n)
    sites = []
    for n in small.graph.nodes:
        parts = linear_parts(n)
        if parts is None:
            continue
        _, w, b, transposed = parts
        d = in_dense.get(w.target)
        if d is None or uses.get(w.target) != 1 or linear_parts(d)[3] != transposed:
            continue
        ws, wd = get_tensor(small, w.target), get_tensor(dense, w.target)
        in_axis, out_axis = (0, 1) if transposed else (1, 0)
        if ws.dim() == 2 and ws.shape[out_axis] == wd.shape[out_axis] and ws.shape[in_axis] < wd.shape[in_axis]:
            site = _Site(n, d, w.target, b.target if b is not None else None, transposed)
            small_res, dense_res = residual_add(n), residual_add(d)
            if small_res is not None and dense_res is not None:
                site.small_add, site.residual = small_res
                site.dense_add = dense_res[0]
            sites.append(site)
    return sites


class _Found(Exception):
    """Raised by a probe to stop the forward once the layer it records has run."""

    def __init__(self, value: tuple[torch.Tensor, ...]) -> None:
        self.value = value


def _stop_with(values: tuple[torch.Tensor, ...]) -> None:
    raise _Found(values)


def _record(gm: torch.fx.GraphModule, nodes: list[Node], batches: list[Any], rows: bool = True) -> list[list[Any]]:
    """Per batch, the values of ``nodes`` when ``gm`` runs it, each as 2-D rows of its real tokens (:func:`real_rows`;
    ``rows=False``: as they are); the forward stops right after the last of them. The graph is restored
    afterwards."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_after(max(nodes, key=order.__getitem__)):
        probe = graph.call_function(_stop_with, (tuple(nodes),))
    gm.recompile()
    out = []
    try:
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        for batch in batches:
            try:
                with torch.no_grad():
                    call(gm, to_device(batch, device))
            except _Found as found:
                out.append([real_rows(batch, v) for v in found.value] if rows else list(found.value))
                continue
            raise RuntimeError(f"the forward never reached {nodes[-1].name}")  # the probe sits after it: unreachable
    finally:
        graph.erase_node(probe)
        gm.recompile()
    return out


class _CutRuns:
    """The cut graph run on every calibration batch and held where the last recording stopped: the next site's
    recording continues from there, with the weights re-fitted since then read afresh, so that every node runs
    once per batch over all the sites (a forward up to each site instead is quadratic in the depth). Values are
    dropped once their last user has run, so what is held is what is live at the stop."""

    def __init__(self, gm: torch.fx.GraphModule, batches: list[Any]) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.free_after: dict[int, list[Node]] = {}
        last = {a: i for i, n in enumerate(self.nodes) for a in n.all_input_nodes}
        for n, i in last.items():
            self.free_after.setdefault(i, []).append(n)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.batches = batches
        self.inputs = [dict(zip(placeholders, values)) for values in _record(gm, placeholders, batches, rows=False)]
        self.envs: list[dict[Node, Any]] = [{} for _ in batches]
        self.pos = 0
        self.interpreter = torch.fx.Interpreter(gm)

    def until(self, stop: Node, want: list[Node]) -> list[list[torch.Tensor]] | None:
        """Run every batch up to ``stop`` (not including it) and give the values of ``want`` per batch, as 2-D rows
        of real tokens (:func:`real_rows`); None where the run is already past ``stop``, or a wanted value is not
        computed before it."""
        end = self.order[stop]
        if end < self.pos or any(self.order[w] >= end for w in want):
            return None
        out = []
        with torch.no_grad():
            for env, inputs, batch in zip(self.envs, self.inputs, self.batches):
                self.interpreter.env = env
                for n in [n for n in env if n.op == "get_attr"]:  # re-fitted since the last stop: read afresh
                    env[n] = self.interpreter.fetch_attr(n.target)
                for i in range(self.pos, end):
                    n = self.nodes[i]
                    env[n] = inputs[n] if n.op == "placeholder" else self.interpreter.run_node(n)
                    for dead in self.free_after.get(i, ()):
                        env.pop(dead, None)
                out.append([real_rows(batch, env[w]) for w in want])
        self.pos = end
        return out


class _DenseTargets:
    """The dense graph's residual stream after each site's add, per calibration batch: the dense model does not
    change while the cut one is re-fitted, so one dense forward records the targets of many sites (instead of a
    forward up to each site: quadratic in the depth). Sites are recorded in chunks whose values take about as
    much memory as half the dense model's parameters; a chunk is dropped once the fits have moved past it."""

    def __init__(self, dense: torch.fx.GraphModule, sites: list[_Site], calibration: list[Any]) -> None:
        self.dense, self.sites, self.calibration = dense, sites, calibration
        self.budget = sum(t.numel() * t.element_size() for t in dense.parameters()) // 2
        self.values: dict[int, list[torch.Tensor]] = {}
        self.chunk = 1  # sites per dense forward: one until the size of one site's values is known

    def of(self, i: int) -> list[torch.Tensor]:
        """Site ``i``'s targets (one 2-D tensor per batch); ``sites[i]`` has a residual add."""
        if i not in self.values:
            self.values.clear()  # the fits go in order: earlier sites are done
            todo = [j for j in range(i, len(self.sites)) if self.sites[j].dense_add is not None][: self.chunk]
            recorded = _record(self.dense, [self.sites[j].dense_add for j in todo], self.calibration)
            for k, j in enumerate(todo):  # copies: a later in-place op of the forward may not touch them
                self.values[j] = [batch[k].clone() for batch in recorded]
            del recorded
            size = sum(t.numel() * t.element_size() for t in self.values[i])
            self.chunk = max(1, int(self.budget // max(size, 1)))
        return self.values[i]


@dataclass
class _Sums:
    """``XᵀX``, ``XᵀY``, ``ΣY²`` and the row count of some calibration batches (``X`` with a column of ones)."""

    a: torch.Tensor
    c: torch.Tensor
    yy: float
    rows: int

    @staticmethod
    def of(xs: list[torch.Tensor], ys: list[torch.Tensor], in_features: int, out_features: int,
           device: torch.device) -> _Sums:
        a = torch.zeros(in_features + 1, in_features + 1, dtype=torch.float64, device=device)
        c = torch.zeros(in_features + 1, out_features, dtype=torch.float64, device=device)
        yy, rows = 0.0, 0
        for x, y in zip(xs, ys):
            x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], 1)
            y = y.double()
            a += x.t() @ x
            c += x.t() @ y
            yy += float((y * y).sum())
            rows += x.shape[0]
        if distributed.active():  # every rank its own batches: one fit over all of them, the same on every rank
            flat = torch.cat([a.flatten(), c.flatten(), torch.tensor([yy, rows], dtype=torch.float64, device=device)])
            flat = distributed.all_reduce_sum(flat)
            a = flat[: a.numel()].view_as(a)
            c = flat[a.numel(): a.numel() + c.numel()].view_as(c)
            yy, rows = float(flat[-2]), int(flat[-1])
        return _Sums(a, c, yy, rows)

    def __add__(self, other: _Sums) -> _Sums:
        return _Sums(self.a + other.a, self.c + other.c, self.yy + other.yy, self.rows + other.rows)

    def error(self, wa: torch.Tensor) -> float:
        """``‖X W_augᵀ − Y‖²`` over the centred ``‖Y − Ȳ‖²``."""
        mean = self.c[-1] / max(self.rows, 1)
        spread = self.yy - self.rows * float((mean * mean).sum())
        return float(((wa @ self.a) * wa).sum() - 2 * (wa * self.c.t()).sum() + self.yy) / max(spread, 1e-30)

    def solve(self, w_aug: torch.Tensor, ridge: float, has_bias: bool) -> torch.Tensor:
        """The ridge solution pulled toward ``w_aug`` (see the module docstring)."""
        n = self.a.shape[0]
        scale = float(self.a.diagonal()[:-1].mean()) if n > 1 else 0.0
        scale = scale if scale > 0 else 1.0  # inputs all zero (a dead tower): the ridge alone keeps the weights
        damp = torch.full((n,), ridge * scale, dtype=torch.float64, device=self.a.device)
        if not has_bias:  # no bias to fit: the ones column is pinned to zero
            damp[-1] = 1e30
        new = torch.linalg.solve(self.a + torch.diag(damp), self.c + damp[:, None] * w_aug.t()).t()
        if not has_bias:
            new[:, -1] = 0
        return new


def every_fourth(n: int) -> set[int]:
    """The held-out indices among ``n`` calibration batches: every fourth, at least the last one; none of a
    single batch."""
    return {i for i in range(n) if i % 4 == 3} or ({n - 1} if n > 1 else set())


def fit_linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None, xs: list[torch.Tensor],
               ys: list[torch.Tensor], ridges: tuple[float, ...] = RIDGES
               ) -> tuple[LayerFit, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """The ridge fit of one linear map ``weight`` (``(out, in)``; ``bias`` or None) to give ``ys`` from ``xs``
    (per calibration batch, ``(rows, in)`` and ``(rows, out)``): its :class:`LayerFit` (named ``name``), and the
    new weight and bias in the dtypes of the given ones (None: not applied). With two batches or more, every
    fourth (at least one) is held out: each ridge weight is fitted on the others and the one with the lowest
    held-out error is chosen; when none beats the given weights there, nothing is applied. The chosen ridge is
    then fitted on all the batches."""
    w = weight.detach().double()
    out_features, in_features = w.shape
    bias0 = bias.detach().double() if bias is not None else torch.zeros(out_features, dtype=torch.float64, device=w.device)
    w_aug = torch.cat([w, bias0[:, None]], 1)
    held = every_fourth(len(xs))
    part = [_Sums.of([x for i, x in enumerate(xs) if (i in held) == h], [y for i, y in enumerate(ys) if (i in held) == h],
                     in_features, out_features, w.device) for h in (False, True)]  # fmt: skip
    everything = part[0] + part[1]
    fit = LayerFit(name, everything.rows, everything.error(w_aug), everything.error(w_aug))
    ridge = ridges[len(ridges) // 2]
    if held:
        fit.held_before = part[1].error(w_aug)
        trials = {r: part[1].error(part[0].solve(w_aug, r, bias is not None)) for r in ridges}
        ridge = min(trials, key=trials.__getitem__)
        if not trials[ridge] < fit.held_before:
            fit.held_after = fit.held_before
            return fit, None, None
        fit.held_after = trials[ridge]
    new = everything.solve(w_aug, ridge, bias is not None)
    after = everything.error(new)
    if not after < fit.before:
        return fit, None, None
    fit.after, fit.ridge = after, ridge
    return fit, new[:, :-1].to(weight.dtype), new[:, -1].to(bias.dtype) if bias is not None else None


def _fit(site: _Site, small: torch.fx.GraphModule, xs: list[torch.Tensor], ys: list[torch.Tensor],
         ridges: tuple[float, ...]) -> tuple[LayerFit, torch.Tensor | None, torch.Tensor | None]:
    """One site's fit (:func:`fit_linear`), the new weight in the layout the graph stores it in."""
    w0 = get_tensor(small, site.weight).detach()
    b0 = get_tensor(small, site.bias).detach() if site.bias else None
    fit, weight, bias = fit_linear(site.weight, w0.t() if site.transposed else w0, b0, xs, ys, ridges)
    if weight is not None and site.transposed:
        weight = weight.t()
    return fit, weight.contiguous() if weight is not None else None, bias


def reconstruct(dense: torch.fx.GraphModule, small: torch.fx.GraphModule, batches: Iterable[Any],
                ridges: tuple[float, ...] = RIDGES) -> list[LayerFit]:
    """Re-fit, in place, each linear map of ``small`` (the cut graph) that the cut narrowed on its input axis, so
    that its output matches the same layer of ``dense`` on ``batches`` (model inputs, as ``data`` yields them);
    layer by layer in the order the graph runs them, each seeing the earlier layers already re-fitted. Returns a
    :class:`LayerFit` per layer. ``dense`` is not modified (its tensors are never written)."""
    calibration = list(batches)  # a few batches, held for the layer-by-layer passes
    sites = refit_sites(dense, small)
    if not calibration or not sites:
        return []
    fits = []
    bar = progress_bar(len(sites), "reconstruct")
    targets = _DenseTargets(dense, sites, calibration)
    runs = _CutRuns(small, calibration)
    for i, site in enumerate(sites):
        x_node = linear_parts(site.small)[0]
        width = get_tensor(small, site.weight).shape[1 if site.transposed else 0]
        want = [x_node] if site.residual is None else [x_node, site.residual]
        got = runs.until(site.small, want)
        if got is None:
            got = _record(small, want, calibration)
        if site.residual is not None:  # the target: what the dense residual stream holds after the add
            xs, rs = zip(*got)
            ys = [d - r if d.shape == r.shape else None for d, r in zip(targets.of(i), rs)]
        if site.residual is None or any(y is None or y.shape != (x.shape[0], width) for x, y in zip(xs, ys)):
            xs = [g[0] for g in got]
            ys = [y for (y,) in _record(dense, [site.dense], calibration)]
        fit, weight, bias = _fit(site, small, xs, ys, ridges)
        if weight is not None:  # new tensors: the old ones may be shared with the dense graph
            set_tensor(small, site.weight, weight, like=get_tensor(small, site.weight))
            if bias is not None and site.bias is not None:
                set_tensor(small, site.bias, bias, like=get_tensor(small, site.bias))
        fits.append(fit)
        log.debug("reconstruct %s: relative error %.4f -> %.4f over %d rows", fit.weight, fit.before, fit.after,
                  fit.rows)
        bar.update(1)
    bar.close()
    return fits


def stored_transposed(gm: torch.fx.GraphModule) -> dict[str, bool]:
    """Per linear map's weight name: whether it is stored ``(in, out)`` (``addmm``: Hugging Face's Conv1D)."""
    out = {}
    for n in gm.graph.nodes:
        parts = linear_parts(n)
        if parts is not None:
            out[parts[1].target] = parts[3]
    return out


def input_norms(gm: torch.fx.GraphModule, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Per linear map of ``gm`` (by its weight's name): the root sum of squares of each input feature over every
    row (sample × position; padding left out, :func:`real_rows`) of ``batches`` — the ``‖X_j‖`` of an
    activation-weighted importance. ``gm`` runs each batch once; its graph is restored afterwards."""
    graph = gm.graph
    sums: dict[str, torch.Tensor] = {}
    probes = []

    running: list[Any] = [None]  # the batch being run: its padding is left out

    def accumulator(key: str) -> Any:
        def accumulate(x: torch.Tensor) -> None:
            sq = real_rows(running[0], x.detach()).double().pow(2).sum(0)
            sums[key] = sums[key] + sq if key in sums else sq

        return accumulate

    for n in list(graph.nodes):
        parts = linear_parts(n)
        if parts is not None:
            with graph.inserting_after(n):
                probes.append(graph.call_function(accumulator(parts[1].target), (parts[0],)))
    gm.recompile()
    try:
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        for batch in batches:
            running[0] = batch
            with torch.no_grad():
                call(gm, to_device(batch, device))
    finally:
        for probe in probes:
            graph.erase_node(probe)
        gm.recompile()
    for k in sorted(sums):  # every rank its own batches: one ranking over all of them, the same on every rank
        sums[k] = distributed.all_reduce_sum(sums[k])
    return {k: v.sqrt() for k, v in sums.items()}
