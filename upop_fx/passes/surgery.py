"""Surgery: cut removed channels out of the graph and emit a dense, smaller GraphModule.

Requires: ``gm`` analysed by :class:`~upop_fx.passes.find_groups.FindGroups` and carrying capture's example
inputs (``gm.meta["upop_capture"]``: surgery refuses to run where it cannot check itself); keep-sets for
prunable groups (configured in ``__init__``).
Ensures (functional): a *new* GraphModule (the input is untouched; its nodes carry no stale ``meta["val"]`` —
capture it again to analyse it further) whose parameters are sliced, whose literal shapes, split sizes,
indices and attention scales are rewritten, which passes ``graph.lint()``, and whose outputs on the example
inputs equal the reference — the original graph with the producers and consumers of removed channels zeroed — within
``rtol`` (relative error in norm) — or, where float32's rounding through a deep model passes ``rtol``, equal it
within :data:`~upop_fx.compare.FLOAT64_RTOL` with both run in float64. Otherwise
:class:`~upop_fx.errors.SurgeryCheckError` (a ``PostconditionError``) is raised. Keep-sets that remove nothing return ``gm`` itself, ``modified=False``.

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.passes import FindGroups, Surgery
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> x = torch.randn(2, 5, 16)
    >>> cap = upop_fx.capture(layer, x)
    >>> groups = FindGroups()(cap.gm).value.prunable
    >>> keep = {g.id: range(g.width // 2) for g in groups if g.kind == "mlp"}
    >>> small = Surgery(keep)(cap.gm).gm
    >>> small.linear1.weight.shape
    torch.Size([16, 16])
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ..capture.program import get_capture, run_module
from ..compare import agrees, relative_error
from ..errors import PreconditionError, SurgeryCheckError, SurgeryError
from ..ir.entries import Entry, keep_sets
from ..ir.groups import DIMS_KEY, GROUPS_KEY, Block, GroupAnalysis, followers_removed, get_analysis
from .base import GraphPass, PassResult, copy_structure, own_tensors, set_tensor
from .blocks import RAGGED, compact
from .param_views import rewrite_views
from .rules import REWRITES, key_of
from .split_slots import split_ragged

__all__ = ["Surgery", "SurgeryInfo", "zeroed_reference", "removed_labels", "cut_entries"]

log = logging.getLogger(__name__)


@dataclass
class SurgeryInfo:
    """What surgery did: parameters sliced, nodes rewritten and the reference check's error."""

    sliced: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    rewritten: list[str]
    max_error: float


def zeroed_reference(gm: torch.fx.GraphModule, removed: np.ndarray, share: bool = False) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose removed channels are zeroed where they are produced (weight rows, biases) and where
    they are consumed (the columns surgery cuts: alone they change nothing where the channel is zero already, and
    they remove a query head's per-head copy of a key/value head that other heads still read).

    ``share=True``: the tensors it does not zero are ``gm``'s own (for a read-only check that should not hold a
    second full copy of the model); otherwise every tensor is copied."""
    analysis = get_analysis(gm)
    ref = copy_structure(gm)
    shared = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    with torch.no_grad():
        for u in analysis.uses:
            drop = u.where[np.nonzero(removed[u.labels])[0]]
            if len(drop):
                t = _get(ref, u.name)
                if id(t) in shared:  # zero a copy, never gm's tensor
                    t = _set(ref, u.name, t.detach().clone())
                t.index_fill_(u.axis, torch.as_tensor(drop, device=t.device), 0)
    if not share:
        own_tensors(ref, gm)
    return ref


class _Context:
    """What rewrite rules see: the old and new channel blocks of every node."""

    def __init__(self, old: dict[str, Any], new: dict[str, Any], removed: np.ndarray) -> None:
        self.old, self.new, self.removed = old, new, removed

    def old_block(self, node: Any) -> Any:
        return self.old.get(node.name) if isinstance(node, Node) else None

    def new_block(self, node: Any) -> Any:
        return self.new.get(node.name) if isinstance(node, Node) else None

    def kept_positions(self, node: Node, i: int) -> list[int]:
        b = self.old_block(node)
        kept = ~self.removed[b.labels]
        other = tuple(j for j in range(kept.ndim) if j != i)
        return np.nonzero(kept.any(axis=other) if other else kept)[0].tolist()


class Surgery(GraphPass[SurgeryInfo]):
    """Cut the channels outside ``keep`` (group id → kept channel indices; groups not named keep all) out of
    the graph (see the module docstring)."""

    in_place = False

    def __init__(self, keep: Mapping[int, Iterable[int]], rtol: float = 1e-4) -> None:
        self.keep = {int(gid): [int(c) for c in chans] for gid, chans in keep.items()}
        self.rtol = rtol

    def requires(self, gm: torch.fx.GraphModule) -> None:
        get_analysis(gm)
        try:
            get_capture(gm)
        except LookupError as exc:
            raise PreconditionError(f"Surgery checks itself on the example inputs, and this graph has none: {exc}") from exc

    def run(self, gm: torch.fx.GraphModule) -> PassResult[SurgeryInfo]:
        analysis = get_analysis(gm)
        removed = removed_labels(analysis, self.keep)
        if not removed.any():
            return PassResult(gm, False, SurgeryInfo({}, [], 0.0))
        new_gm = copy_structure(gm)  # sliced tensors are made anew; the rest is copied once slicing is done
        old_blocks = {n.name: n.meta.get(DIMS_KEY) for n in gm.graph.nodes}
        new_blocks = {name: _compact_any(b, removed, name) for name, b in old_blocks.items()}
        ctx = _Context(old_blocks, new_blocks, removed)
        ragged = {name for name, b in new_blocks.items() if b is RAGGED}
        made = split_ragged(new_gm, ctx, ragged) if ragged else set()
        rewritten = sorted(made)
        for node in list(new_gm.graph.nodes):
            if node.name in made:
                continue
            fn = REWRITES.get(key_of(node.target)) if node.op == "call_function" else None
            touched = [n for n in [node, *node.all_input_nodes] if _changed(old_blocks.get(n.name), new_blocks.get(n.name))]
            if fn is None or not touched:
                continue
            try:
                fn(ctx, node)
            except ValueError as exc:
                raise SurgeryError(str(exc)) from exc
            rewritten.append(node.name)
        kept = _kept_entries(analysis, removed)
        rewritten += rewrite_views(new_gm, kept)  # chunks/slices of sliced parameters select the kept part
        rewritten += _slice_tables(new_gm, analysis, removed)  # chunks/slices of sliced parameters select the kept part
        for node in new_gm.graph.nodes:  # shapes recorded at capture no longer hold
            for key in (DIMS_KEY, "val", "tensor_meta"):
                node.meta.pop(key, None)
        sliced = _slice_params(new_gm, kept)
        own_tensors(new_gm, gm)
        new_gm.graph.lint()
        new_gm.recompile()
        new_gm.meta.pop(GROUPS_KEY, None)
        log.debug("surgery: %d parameters sliced, %d nodes rewritten", len(sliced), len(rewritten))
        return PassResult(new_gm, True, SurgeryInfo(sliced, rewritten, 0.0))

    def ensures(self, gm: torch.fx.GraphModule, result: PassResult[SurgeryInfo]) -> None:
        """The reduced graph equals the zeroed reference on the example inputs."""
        if not result.modified:
            return
        info = get_capture(gm)
        ref = zeroed_reference(gm, removed_labels(get_analysis(gm), self.keep), share=True)
        try:
            out = run_module(result.gm, info.args, info.kwargs)
        except Exception as exc:
            raise SurgeryCheckError(
                f"the reduced graph fails to run on the example inputs: {type(exc).__name__}: {exc}"
            ) from exc
        err = relative_error(out, run_module(ref, info.args, info.kwargs))
        result.value.max_error = err
        log.debug("surgery check: relative error %.2e against the zeroed reference", err)
        # a deep pretrained model can amplify float32's rounding (sums of other lengths) past rtol: the same two
        # graphs in float64 tell rounding from a wrong cut
        ok, err64 = agrees(err, self.rtol, result.gm, ref, info.args, info.kwargs)
        if ok and err64 is not None:
            log.info("surgery check: relative error %.2e against the zeroed reference in float32, %.2e in float64: "
                     "float32 rounding, the cut is exact", err, err64)
        if ok:
            return
        in64 = f", {err64:.3g} in float64" if err64 is not None else ""
        raise SurgeryCheckError(
            f"the reduced graph differs from the zeroed reference (relative error {err:.3g} > {self.rtol:g}{in64}); "
            f"refusing to return a silently wrong model"
        )


def cut_entries(dense: torch.fx.GraphModule, analysis: GroupAnalysis, entries: list[Entry], pruned: np.ndarray
                ) -> torch.fx.GraphModule:
    """``dense`` with the ``pruned`` entries cut out (:class:`Surgery`, checked), always a model of its own: a
    copy of ``dense`` when nothing is removed."""
    surgery = Surgery(keep_sets(analysis, entries, np.asarray(pruned, dtype=bool)))(dense)
    return surgery.gm if surgery.modified else copy.deepcopy(dense)


def removed_labels(analysis: GroupAnalysis, keep: Mapping[int, Iterable[int]]) -> np.ndarray:
    """Boolean array over labels: True where the label's class is removed by ``keep``, or follows removed ones
    (a broadcast head's source, a padded position: :func:`~upop_fx.ir.groups.followers_removed`)."""
    removed_roots: list[int] = []
    for gid, chans in keep.items():
        if not 0 <= gid < len(analysis.groups):
            raise SurgeryError(f"no group #{gid}")
        g = analysis.groups[gid]
        kept = np.zeros(g.width, dtype=bool)
        idx = np.asarray(list(chans), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= g.width):
            raise SurgeryError(f"group {g.describe()}: channel index out of range 0..{g.width - 1}")
        kept[idx] = True
        if kept.all():
            continue
        if not g.prunable:
            raise SurgeryError(f"group {g.describe()} cannot be pruned")
        if not kept.any():
            raise SurgeryError(f"group {g.describe()}: at least one channel must be kept")
        removed_roots.extend(g.classes[~kept].tolist())
    removed = np.isin(analysis.label_class, np.asarray(removed_roots, dtype=np.int64))
    return followers_removed(analysis.copies, analysis.paddings, removed, analysis.label_class)


def _compact_any(b: Any, removed: np.ndarray, where: str) -> Any:
    if isinstance(b, list):
        return [_compact_any(x, removed, where) for x in b]
    if not isinstance(b, Block):
        return b
    try:
        labels = compact(b.labels, ~removed[b.labels], f"node {where}")
    except SurgeryError:
        return RAGGED  # resolved by split_ragged (packed projections), or refused there
    return Block(b.axes, labels, b.outer, b.zero)


def _changed(old: Any, new: Any) -> bool:
    if new is RAGGED:
        return True
    if isinstance(old, list):
        return any(_changed(o, n) for o, n in zip(old, new))
    return isinstance(old, Block) and old.labels.shape != new.labels.shape


def _get(gm: torch.nn.Module, name: str) -> torch.Tensor:
    mod, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(mod) if mod else gm, attr)


def _set(gm: torch.nn.Module, name: str, data: torch.Tensor) -> torch.Tensor:
    """Replace the parameter or buffer ``name`` of ``gm`` by ``data`` (a parameter stays a parameter)."""
    return set_tensor(gm, name, data, _get(gm, name))


#: the prefix of the index buffers :func:`_slice_tables` inserts (one per sliced table use)
TABLE_KEEP = "upop_table_keep_"


def _slice_tables(gm: torch.fx.GraphModule, analysis: GroupAnalysis, removed: np.ndarray) -> list[str]:
    """Each computed table that multiplies channels (RoPE's cos/sin) keeps the entries whose channels stay: an
    ``index_select`` of the kept entries, inserted for that use (a table shared by layers is sliced per layer)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    device = next((t.device for t in [*gm.parameters(), *gm.buffers()]), torch.device("cpu"))
    done = []
    for k, t in enumerate(analysis.tables):
        gone = removed[t.labels]  # (rows, entries)
        keep = ~gone.all(axis=0)
        if keep.all():
            continue
        if (gone.any(axis=0) & keep).any() and t.labels.shape[0] > 1:
            ragged = gone.any(axis=0) & keep
            rows_keep = ~gone[:, ragged]
            if not (rows_keep.all(axis=1) | ~rows_keep.any(axis=1)).all():
                raise SurgeryError(f"node {t.node}: its table would need different entries per head")
        node = nodes[t.node]
        name = f"{TABLE_KEEP}{k}"
        gm.register_buffer(name, torch.as_tensor(np.nonzero(keep)[0], device=device))
        with gm.graph.inserting_before(node):
            idx = gm.graph.get_attr(name)
            table = node.args[t.operand]
            axis = t.axis
            sliced = gm.graph.call_function(torch.ops.aten.index_select.default, (table, axis, idx))
        args = list(node.args)
        args[t.operand] = sliced
        node.args = tuple(args)
        done.append(node.name)
    return done


def _kept_entries(analysis: GroupAnalysis, removed: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    """Per parameter axis that a removed channel touches: which of its entries stay (a boolean vector)."""
    keep: dict[tuple[str, int], np.ndarray] = {}
    for u in analysis.uses:
        k = u.full(~removed[u.labels], True)
        keep[(u.name, u.axis)] = keep[(u.name, u.axis)] & k if (u.name, u.axis) in keep else k
    return {key: k for key, k in keep.items() if not k.all()}


def _slice_params(gm: torch.fx.GraphModule, keep: dict[tuple[str, int], np.ndarray]) -> dict[str, Any]:
    sliced: dict[str, Any] = {}
    for (name, axis), k in keep.items():
        if k.all():
            continue
        old = _get(gm, name)
        before = tuple(old.shape) if name not in sliced else sliced[name][0]
        idx = torch.as_tensor(np.nonzero(k)[0], device=old.device)
        data = old.detach().index_select(axis, idx)  # a new tensor
        assert data.shape[axis] == int(k.sum()), (name, axis)
        _set(gm, name, data)
        sliced[name] = (before, tuple(data.shape))
    return sliced
