"""The caller's own model back: a copy of the original ``nn.Module``, of its class, cut like the graph.

Surgery emits a dense smaller *graph*; users also want their model — one that trains with dropout, saves with
``save_pretrained``, generates with its KV cache. :func:`rebuild` makes it from what surgery did, never by
guessing at a model's code:

* **Tensors** — every parameter and buffer of the cut graph goes into a deep copy of the model under the same
  name (capture keeps the module paths), so the copy carries the sliced weights (tied weights stay tied).
* **Size attributes of layers** — from the new weight shapes, for the layers whose attributes are defined by
  their weights (``nn.Linear``'s ``in_features``/``out_features``, convolutions, embeddings, norms, Hugging
  Face's ``Conv1D``).
* **Size attributes read by a forward** — each shape literal that surgery rewrote (a ``view`` to
  ``(B, T, H, 64)`` that became ``(B, T, H, 32)``) belongs to the module whose forward produced it
  (``nn_module_stack``); the integer attribute of that module holding the old size takes the new one.

Then the copy is **verified**: run as its caller runs it and compared with the cut graph on the example inputs,
over its KV cache where it is a decoder, and at a second batch/sequence size. Whatever cannot be expressed — a size no attribute holds, one attribute serving two
sizes that the cut made different, an attention scale that only exists as the default ``1/sqrt(head size)``, a
rotary table shared by layers that keep different pairs (where they keep the same, the class's frequencies are
sliced: :mod:`.rotary`), ops that surgery had to insert — makes the module
``None`` with the precise reason (and the option that avoids it, where there is one); the graph is unaffected.

Example:
    >>> import torch, upop_fx
    >>> from transformers import BertConfig, BertModel
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                             intermediate_size=64, vocab_size=100)).eval()
    >>> ids = torch.randint(1, 100, (2, 8))
    >>> result = upop_fx.compress(bert, {"input_ids": ids}, ratio=0.5, method="magnitude", retrain_steps=0)
    >>> type(result.module).__name__, result.module.encoder.layer[0].attention.self.attention_head_size < 8
    ('BertModel', True)
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from ..capture.program import cache_off, get_capture, prompt_ids, run_module
from ..compare import relative_error
from ..ir.groups import GroupAnalysis
from ..passes.base import module_tensors, set_tensor
from ..passes.surgery import TABLE_KEEP
from .rotary import frequency_slices, slice_frequencies, tables_problem
from .scale_fold import fold_scales, held_floats, near, node_owner, root_of

__all__ = ["Rebuilt", "rebuild", "varied_inputs", "copy_weights", "module_tensors", "module_gap"]

log = logging.getLogger(__name__)

#: the largest relative error between the rebuilt module and the cut graph that counts as equal (float32
#: rounding of a differently ordered computation stays near 1e-5; a wrong size or scale is far above)
RTOL = 1e-4
#: up to this many coincidental attribute keys, every subset is tried (fewest first) to find the ones to restore
SUBSET_SEARCH = 6


class Problems(list):
    """Why a cut cannot be expressed by the model's class: the texts, those found per module path (``at``), and
    whether a shared rotary table is among them."""

    def __init__(self) -> None:
        super().__init__()
        self.rotary = False
        self.at: dict[str, list[str]] = defaultdict(list)  #: module path -> the texts found there

    def add(self, text: str, path: str | None = None) -> None:
        self.append(text)
        if path is not None:  # "" is the model's own forward
            self.at[path].append(text)


@dataclass
class Rebuilt:
    """What :func:`rebuild` returns: the module (or None) and, when None, why (and where, where known)."""

    module: torch.nn.Module | None
    reason: str | None = None
    patched: dict[str, dict[str, Any]] = field(default_factory=dict)  #: module path -> {attribute: new value}
    problems: Problems = field(default_factory=Problems)


def _copy_without(model: torch.nn.Module, replaced: set[str]) -> torch.nn.Module:
    """A deep copy of ``model`` whose tensors named in ``replaced`` are meta placeholders of the same shape (they
    are about to be replaced): no second full-size copy of the weights is made. Ties are kept."""
    memo: dict[int, Any] = {}
    for name, t in module_tensors(model).items():
        if name in replaced and id(t) not in memo:
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = torch.nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(
                t, torch.nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def copy_weights(source: torch.nn.Module, target: torch.nn.Module, sliced_ok: bool = True,
                 skip: frozenset[str] = frozenset()) -> list[str]:
    """Copy every tensor of ``source`` into ``target`` under the same name (aliases of one tensor in ``target``
    receive one shared new tensor), but those named in ``skip``. Returns the names of ``source`` that ``target``
    does not have."""
    theirs = module_tensors(target)
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, t in theirs.items():
        aliases[id(t)].append(name)
    missing, done = [], set()
    for name, t in module_tensors(source).items():
        if name in skip:
            continue
        if name not in theirs:
            missing.append(name)
            continue
        old = theirs[name]
        if id(old) in done:
            continue
        if not sliced_ok and old.shape != t.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit {tuple(old.shape)}")
        new = set_tensor(target, name, t.detach().clone(), old)
        for other in aliases[id(old)]:
            if other != name:
                set_tensor(target, other, new, old)
        done.add(id(old))
    return missing


# ------------------------------------------------------------------------ attributes defined by weights
def _linear(m: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    w = shapes.get("weight")
    return {"out_features": w[0], "in_features": w[1]} if w else {}


def _conv1d(m: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:  # Hugging Face's (in, out) Conv1D
    w = shapes.get("weight")
    out = {"nf": w[1]} if w else {}
    if w and hasattr(m, "nx"):
        out["nx"] = w[0]
    return out


def _conv(m: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    w = shapes.get("weight")
    if not w:
        return {}
    transposed = bool(getattr(m, "transposed", False))
    out_c = w[1] * m.groups if transposed else w[0]
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    groups = out_c if depthwise else m.groups
    in_c = w[0] if transposed else w[1] * groups
    return {"out_channels": out_c, "in_channels": in_c, "groups": groups}


def _embedding(m: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    w = shapes.get("weight")
    return {"num_embeddings": w[0], "embedding_dim": w[1]} if w else {}


def _norm(m: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    w = shapes.get("weight") or shapes.get("bias")
    if not w:
        return {}
    if hasattr(m, "normalized_shape"):
        return {"normalized_shape": tuple(w)}
    if hasattr(m, "num_features"):
        return {"num_features": w[0]}
    if hasattr(m, "num_channels"):
        return {"num_channels": w[0]}
    return {}


def _refuse_mha(m: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    raise _Inexpressible(
        "nn.MultiheadAttention derives its head size from the model width (embed_dim // num_heads), so pruned "
        "attention channels cannot be expressed by it"
    )


class _Inexpressible(Exception):
    pass


_BY_WEIGHTS: list[tuple[Callable[[Any], bool], Callable[[Any, dict[str, tuple[int, ...]]], dict[str, Any]]]] = [
    (lambda m: isinstance(m, torch.nn.MultiheadAttention), _refuse_mha),
    (lambda m: isinstance(m, torch.nn.Linear), _linear),
    (lambda m: isinstance(m, torch.nn.modules.conv._ConvNd), _conv),
    (lambda m: isinstance(m, torch.nn.Embedding), _embedding),
    (lambda m: isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase,
                              getattr(torch.nn, "RMSNorm", torch.nn.LayerNorm))), _norm),
    (lambda m: type(m).__name__ == "Conv1D" and hasattr(m, "nf"), _conv1d),
]


# ------------------------------------------------------------------------------ literals of the forward
def _flat(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flat(v)]
    if isinstance(x, dict):
        return [y for k in sorted(x) for y in _flat(x[k])]
    return [x]


def _table_slice(n: Node) -> bool:
    """``n`` is one of surgery's per-use slices of a rotary table (an ``index_select`` by a table-keep buffer)."""
    return any(a.op == "get_attr" and str(a.target).startswith(TABLE_KEEP) for a in n.all_input_nodes)


def _literal_changes(dense: torch.fx.GraphModule, small: torch.fx.GraphModule, problems: Problems,
                     floats: dict[str, list[tuple[float, str]]], tables_follow: bool = False
                     ) -> dict[str, dict[int, set[tuple[int, str]]]]:
    """Per module path: old size → {(new size, node)} for every shape literal surgery changed. The float
    literals the cut leaves alone go to ``floats`` (per module path: (value, node)). ``tables_follow``: the
    module computes the sliced rotary tables itself (its frequencies are sliced), so the per-use slices surgery
    inserted are not missing from its forward."""
    old_nodes = {n.name: n for n in dense.graph.nodes}
    changes: dict[str, dict[int, set[tuple[int, str]]]] = defaultdict(lambda: defaultdict(set))
    rescaled: list[tuple[str, float, float, str]] = []
    for n in small.graph.nodes:
        if n.op != "call_function":
            continue
        o = old_nodes.get(n.name)
        if tables_follow and o is None and _table_slice(n):
            continue
        if o is None or o.op != "call_function":
            path, cls = _inserted_owner(n, old_nodes) or (None, None)
            where = f"{path} ({cls})" if path else "<root>"
            problems.add(f"the cut inserts {getattr(n.target, '__name__', n.target)} (node {n.name}) in {where}, "
                         "which the module's forward does not have", path)
            continue
        path, cls = node_owner(o)
        where = f"node {n.name} in {path or '<root>'} ({cls or type(dense).__name__})"
        if o.target != n.target:
            size = _even_split(o, n)
            if size is None:
                problems.add(f"the cut turns {o.target} into {n.target} at {where}", path)
            elif size[0] != size[1]:
                changes[path][size[0]].add((size[1], n.name))
            continue
        if o.kwargs.get("scale") is None and n.kwargs.get("scale") is not None:
            problems.add(f"the attention at {where} uses the default scale 1/sqrt(head size), which the "
                         f"module would recompute from the pruned head size; only the graph keeps it", path)
            continue
        a, b = _flat((_full_args(o), o.kwargs)), _flat((_full_args(n), n.kwargs))
        if len(a) != len(b):
            problems.add(f"the cut changes the arguments of {n.target} at {where}", path)
            continue
        for x, y in zip(a, b):
            if isinstance(x, float) and x == y:
                floats[path].append((x, n.name))
            if isinstance(x, Node) or x == y:
                continue
            if isinstance(x, int) and isinstance(y, int) and not isinstance(x, bool):
                if 0 <= x < _OPEN_END:  # a -1 or an open end the cut made explicit: the module still infers it
                    changes[path][x].add((y, n.name))
            elif isinstance(x, float) and isinstance(y, float):
                rescaled.append((path, x, y, where))
            else:
                problems.add(f"the cut changes the literal {x!r} to {y!r} at {where}", path)
    for path, x, y, where in rescaled:  # a folded scale (scale_fold): sqrt of a size the cut changes, recomputed
        if not any(root_of(x, a) and root_of(y, b) for a, news in changes[path].items() for b, _ in news):
            problems.add(f"the cut changes the literal {x!r} to {y!r} at {where}", path)
    return changes


_OPEN_END = 2**31  # a slice end this large means "to the end"


def _inserted_owner(node: Node, old_nodes: dict[str, Node]) -> tuple[str, str] | None:
    """(module path, class name) of the first node of the original graph that a node surgery inserted feeds
    (through other inserted nodes); None where none is found."""
    seen, todo = set(), list(node.users)
    while todo:
        u = todo.pop(0)
        if u.name in seen:
            continue
        seen.add(u.name)
        o = old_nodes.get(u.name)
        if o is not None and o.op == "call_function":
            owner = node_owner(o)
            return owner if owner[0] else None
        todo.extend(u.users)
    return None


def _full_args(n: Node) -> tuple[Any, ...]:
    """``n.args`` with the schema's defaults filled in for the trailing positional arguments left out."""
    schema = getattr(n.target, "_schema", None)
    args = list(n.args)
    if schema is None:
        return tuple(args)
    for arg in schema.arguments[len(args):]:
        if arg.kwarg_only or arg.name in n.kwargs or not arg.has_default_value():
            break
        args.append(arg.default_value)
    return tuple(args)


def _even_split(o: Node, n: Node) -> tuple[int, int] | None:
    """``(old, new)`` part size where surgery turned ``split(x, size)`` into ``split_with_sizes`` of equal parts
    (what the module's ``split(self.size)`` still expresses); None otherwise."""
    if o.target != torch.ops.aten.split.Tensor or n.target != torch.ops.aten.split_with_sizes.default:
        return None
    old, sizes = o.args[1] if len(o.args) > 1 else None, n.args[1]
    if not isinstance(old, int) or len(set(sizes)) != 1:
        return None
    return old, int(sizes[0])


def _scale_problems(model: torch.nn.Module, changes: dict[str, dict[int, set[tuple[int, str]]]],
                    floats: dict[str, list[tuple[float, str]]], problems: Problems) -> None:
    """A float literal equal to ``sqrt(size)`` or ``1/sqrt(size)`` in a module whose ``size`` the cut changes, and
    that no float attribute of the module (or of a module above it) holds, was computed in the forward from
    the size: the patched module would compute it from the new size, the graph keeps the old one."""
    for path, sizes in changes.items():
        held = held_floats(model, path)
        for old in sizes:
            for f, node in floats.get(path, []):
                if old > 1 and root_of(f, old) and not any(near(h, f) for h in held):
                    problems.add(f"{path or '<root>'}: node {node} scales by {f:.6g} = sqrt({old}) or its inverse, "
                                 f"which the forward computes from the size {old} the cut changes; only the graph "
                                 f"keeps it", path)


def _int_attrs(m: torch.nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(m).items()
            if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_")}


def _patch_from_literals(model: torch.nn.Module, module: torch.nn.Module,
                         changes: dict[str, dict[int, set[tuple[int, str]]]], patched: dict[str, dict[str, Any]],
                         problems: Problems, notes: list[str], granularity: str) -> None:
    """Give the attribute of each module that held a size the cut changed (in ``model``, the original) its new
    value in ``module`` (the copy). A size no attribute holds goes to ``notes`` (the forward may take it from
    a tensor's shape, which follows the cut by itself)."""
    for path, sizes in changes.items():
        m = module.get_submodule(path) if path else module
        if any(applies(m) for applies, _ in _BY_WEIGHTS):  # its weights define its sizes (done above)
            continue
        attrs = _int_attrs(model.get_submodule(path) if path else model)
        where = f"{path or '<root>'} ({type(m).__name__})"
        for old, news in sorted(sizes.items()):
            targets = sorted({new for new, _ in news})
            holders = [k for k, v in attrs.items() if v == old]
            nodes = ", ".join(sorted({node for _, node in news}))
            if len(targets) > 1:
                hint = (" — compress with granularity='upop', which keeps q/k and v at one head size"
                        if granularity != "upop" else "")
                problems.add(f"{where}: the size {old} becomes {' and '.join(map(str, targets))} in different "
                                f"places (nodes {nodes}), but the module holds one "
                                f"({', '.join(holders) or 'no attribute'}){hint}", path)
                continue
            if not holders:  # it may come from a tensor's shape: the verification decides
                notes.append(f"{where}: no integer attribute holds the size {old} that the cut changes to "
                             f"{targets[0]} (nodes {nodes})")
                continue
            for k in holders:
                done = patched.get(path, {}).get(k)
                if done is not None and done != targets[0]:
                    problems.add(f"{where}: attribute {k} would need both {done} and {targets[0]}", path)
                    continue
                patched.setdefault(path, {})[k] = targets[0]
                setattr(m, k, targets[0])


# --------------------------------------------------------------------------------------- verification
def varied_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], spec: Any, grow_batch: bool, shrink_seq: bool
                  ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The example inputs at another size: the batch one larger (the first sample repeated) and the dynamic
    sequence axis one shorter, where ``spec`` (capture's dynamic shapes) says those axes are dynamic."""
    leaves_spec = spec if isinstance(spec, dict) else {}

    def vary(t: Any, axes: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not isinstance(axes, dict):
            return t
        if shrink_seq and 1 in axes and t.shape[1] > 2:
            t = t.narrow(1, 0, t.shape[1] - 1)
        if grow_batch and 0 in axes:
            t = torch.cat([t, t[:1]], dim=0)
        return t

    names = list(leaves_spec)
    new_kwargs = {k: vary(v, leaves_spec.get(k)) for k, v in kwargs.items()}
    positional = [leaves_spec.get(names[i]) if i < len(names) else None for i in range(len(args))]
    new_args = tuple(vary(a, s) for a, s in zip(args, positional))
    return new_args, new_kwargs


def _failing_module(module: torch.nn.Module, exc: BaseException) -> str | None:
    """The path of the innermost submodule of ``module`` whose code raised ``exc`` (from its traceback; ``""``
    for the model's own forward)."""
    paths = {id(m): p for p, m in module.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in paths:
            found = paths[id(owner)]
        tb = tb.tb_next
    return found


def module_gap(module: torch.nn.Module, graph: torch.fx.GraphModule) -> float:
    """The relative error between ``module`` (its cache off) and ``graph`` on the graph's example inputs."""
    info = get_capture(graph)
    with cache_off(module):
        return relative_error(run_module(module, info.args, info.kwargs), run_module(graph, info.args, info.kwargs))


def _same_as(module: torch.nn.Module, small: torch.fx.GraphModule) -> tuple[str | None, str | None]:
    """For a module of unchanged sizes (the model with the graph's weights): equal outputs on the example inputs."""
    err = module_gap(module, small)
    return (None, None) if err <= RTOL else (f"the module differs from the graph (relative error {err:.3g})", None)


def _run_failure(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[str | None, str | None]:
    """``(why, the failing submodule's path)`` when ``module`` (its cache off) fails on the inputs; ``(None, None)``
    when it runs."""
    try:
        with cache_off(module):
            run_module(module, args, kwargs)
    except Exception as exc:  # noqa: BLE001 — any failure is the reason the module is not returned
        path = _failing_module(module, exc)
        where = f" in {path or '<root>'} ({type(module.get_submodule(path)).__name__})" if path is not None else ""
        return (f"the rebuilt module fails to run{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                path)
    return None, None


def _verify(module: torch.nn.Module, small: torch.fx.GraphModule) -> tuple[str | None, str | None]:
    """``(None, None)`` when ``module`` runs and equals ``small`` on the example inputs, over its KV cache where it
    is a decoder (:func:`_cache_failure`), and at a second batch/sequence size; else ``(why, the module path that
    failed where known)``. The module is run as its caller runs it, eagerly: capturing it again would prove that
    ``torch.export`` still follows it, which an export of the module checks itself, at the cost of a capture."""
    info = get_capture(small)
    why, path = _run_failure(module, info.args, info.kwargs)
    if why is not None:
        return why, path
    err = module_gap(module, small)
    if not err <= RTOL:
        return (f"the rebuilt module differs from the cut graph (relative error {err:.3g} at input shapes "
                f"{_shapes(info.args, info.kwargs)})"), None
    why = _cache_failure(module, info.kwargs)
    if why is not None:
        return why, None
    for grow, shrink in ((True, True), (False, True), (True, False)):
        args, kwargs = varied_inputs(info.args, info.kwargs, info.dynamic_shapes, grow, shrink)
        try:
            want = run_module(small, args, kwargs)
        except Exception:  # noqa: BLE001 — the graph does not run at this size; try another
            continue
        try:
            with cache_off(module):
                got = run_module(module, args, kwargs)
        except Exception as exc:  # noqa: BLE001
            return (f"the rebuilt module fails to run at input shapes {_shapes(args, kwargs)}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", _failing_module(module, exc))
        err = relative_error(got, want)
        if not err <= RTOL:
            return (f"the rebuilt module differs from the cut graph (relative error {err:.3g} at input shapes "
                    f"{_shapes(args, kwargs)})"), None
        return None, None
    return "the cut graph runs at no second input size to compare the rebuilt module with", None


def _cache_failure(module: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    """For a decoder called with a prompt alone: None when its last token's logits are the same computed over
    the KV cache of the tokens before it as without a cache; else why. The graph has no cache, so the forward's
    verification cannot see an attribute the cache reads (a layer index) patched wrong. Models without a cache
    (no ``past_key_values`` in their output, or a forward that takes none) pass."""
    ids = prompt_ids((), kwargs)
    if ids is None or ids.shape[1] < 2:
        return None
    accepted = inspect.signature(module.forward).parameters
    name = next((n for n in ("cache", "past_key_values") if n in accepted), None)
    if name is None or "use_cache" not in accepted:
        return None
    mask = kwargs.get("attention_mask")
    masks = {} if mask is None else {"attention_mask": mask}
    short = {} if mask is None else {"attention_mask": mask[:, :-1]}
    try:
        with torch.no_grad():
            whole = module(input_ids=ids, use_cache=False, **masks)
            first = module(input_ids=ids[:, :-1], use_cache=True, **short)
            cache = getattr(first, "past_key_values", None)
            if cache is None or not hasattr(whole, "logits"):
                return None
            step = module(input_ids=ids[:, -1:], use_cache=True, **{name: cache}, **masks)
    except Exception as exc:  # noqa: BLE001 — any failure is the reason the module is not returned
        return (f"the rebuilt module fails to run with its KV cache: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}")
    err = relative_error(step.logits[:, -1], whole.logits[:, -1])
    if not err <= RTOL:
        return (f"the rebuilt module's KV cache gives other outputs than its forward without one (relative error "
                f"{err:.3g} on the last token): an attribute the cut patched is read by the cache")
    return None


def _shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------------------------------- rebuild
def rebuild(model: torch.nn.Module, dense: torch.fx.GraphModule, small: torch.fx.GraphModule,
            analysis: GroupAnalysis, removed: np.ndarray, granularity: str = "upop",
            fold: bool = True) -> Rebuilt:
    """A copy of ``model`` cut as ``small`` (the surgery of ``dense``), verified; see the module docstring.

    ``removed``: the removed labels of ``analysis`` (:func:`~upop_fx.passes.surgery.removed_labels`).
    ``fold``: first fold into ``small``'s q/k weights, in place and exactly, the attention scales the class would
    recompute from the narrowed head size (:func:`~upop_fx.module.scale_fold.fold_scales`); where the module
    fails with the fold, it is undone and the module tried again."""
    undo = fold_scales(model, dense, small, analysis, removed) if fold else None
    back = _rebuild(model, dense, small, analysis, removed, granularity)
    if back.module is None and undo is not None:
        undo()
        again = _rebuild(model, dense, small, analysis, removed, granularity)
        if again.module is not None:
            return again
    return back  # the graph stays unfolded: both equal the dense model's cut


def _rebuild(model: torch.nn.Module, dense: torch.fx.GraphModule, small: torch.fx.GraphModule,
             analysis: GroupAnalysis, removed: np.ndarray, granularity: str) -> Rebuilt:
    problems = Problems()
    why, same = tables_problem(analysis, removed)
    frequencies = frequency_slices(dense, analysis, removed) if why is not None and same else None
    if why is not None and frequencies is None:
        problems.add(why)
        problems.rotary = True
    floats: dict[str, list[tuple[float, str]]] = defaultdict(list)
    changes = _literal_changes(dense, small, problems, floats, tables_follow=bool(frequencies))
    _scale_problems(model, changes, floats, problems)
    if problems:
        return Rebuilt(None, reason_of(problems), problems=problems)
    module = _copy_without(model, set(module_tensors(small)))
    before = {n: tuple(t.shape) for n, t in module_tensors(module).items()}
    missing = [n for n in copy_weights(small, module) if not (frequencies and n.startswith(TABLE_KEEP))]
    missing += [n for n, t in module_tensors(module).items() if t.is_meta]
    if frequencies:
        log.info("rebuild: rotary frequencies sliced to the pairs every layer keeps: %s",
                 ", ".join(slice_frequencies(module, frequencies)))
    if missing:
        problems.add(f"the cut graph and the model do not hold the same tensors: {', '.join(missing[:4])}")
        return Rebuilt(None, reason_of(problems), problems=problems)
    patched: dict[str, dict[str, Any]] = {}
    owners: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for name, t in module_tensors(module).items():
        if tuple(t.shape) != before[name]:
            path, _, attr = name.rpartition(".")
            owners[path][attr] = tuple(t.shape)
    for path, shapes in owners.items():
        m = module.get_submodule(path) if path else module
        for applies, sizes_of in _BY_WEIGHTS:
            if not applies(m):
                continue
            try:
                new = sizes_of(m, shapes)
            except _Inexpressible as exc:
                problems.add(f"{path} ({type(m).__name__}): {exc}", path)
                break
            for k, v in new.items():
                if getattr(m, k, None) != v:
                    setattr(m, k, v)
                    patched.setdefault(path, {})[k] = v
            break
    notes: list[str] = []
    by_weights = {path: dict(attrs) for path, attrs in patched.items()}
    _patch_from_literals(model, module, changes, patched, problems, notes, granularity)
    if not problems:
        module.eval()
        if owners or changes:
            why, path = _verify(module, small)
            if why is not None:
                why, path = _unpatch_coincidences(model, module, small, patched, by_weights, (why, path))
        else:  # nothing resized: the model itself, with new weights
            why, path = _same_as(module, small)
        if why is not None:
            problems.add(why, path)
            problems.extend(notes)
    if problems:
        return Rebuilt(None, reason_of(problems), patched, problems)
    log.info("rebuilt %s: %d modules with patched size attributes, verified against the cut graph",
             type(model).__name__, len(patched))
    return Rebuilt(module, None, patched)


def _unpatch_coincidences(model: torch.nn.Module, module: torch.nn.Module, small: torch.fx.GraphModule,
                          patched: dict[str, dict[str, Any]], by_weights: dict[str, dict[str, Any]],
                          failed: tuple[str | None, str | None]) -> tuple[str | None, str | None]:
    """Where the verification failed: give back their original value to the attributes of one name in one class
    that a shape literal patched (an attribute that merely held the same number, such as a count of KV groups
    equal to the count of KV heads, a layer's index, or a latent rank equal to a head's width): up to
    :data:`SUBSET_SEARCH` (class, name) keys, all of them but the fewest left patched that verify — none, then each
    alone, then every pair, ... (a verification that fails costs one eager forward), so that an attribute the
    forward never reads keeps its value. With more keys: each alone, then all of them, then each patched again
    where the verification still passes. Returns the verification's answer (``failed`` when nothing verifies)."""
    keys: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path, attrs in patched.items():
        for k in attrs:
            if k not in by_weights.get(path, {}):
                keys[(type(module.get_submodule(path)).__name__, k)].append(path)  # ("": the model itself)
    new = {key: {path: getattr(module.get_submodule(path), key[1]) for path in paths} for key, paths in keys.items()}

    def put(key: tuple[str, str], original: bool) -> None:
        for path, v in new[key].items():
            setattr(module.get_submodule(path), key[1], getattr(model.get_submodule(path), key[1]) if original else v)

    def kept(originals: list[tuple[str, str]]) -> tuple[None, None]:
        for cls, k in originals:
            for path in keys[(cls, k)]:
                del patched[path][k]
            log.info("rebuild: %s.%s kept its original value in %d modules (it only held the same number as a size "
                     "the cut changed)", cls, k, len(keys[(cls, k)]))
        return None, None

    if len(keys) <= SUBSET_SEARCH:  # the fewest left patched that verify: none, then one, then two, ...
        for key in keys:
            put(key, original=True)
        for size in range(len(keys)):
            for subset in itertools.combinations(sorted(keys), size):
                for key in subset:
                    put(key, original=False)
                if _verify(module, small)[0] is None:
                    return kept(sorted(set(keys) - set(subset)))
                for key in subset:
                    put(key, original=True)
        for key in keys:
            put(key, original=False)
        return failed
    for key in sorted(keys):  # one alone
        put(key, original=True)
        if _verify(module, small)[0] is None:
            return kept([key])
        put(key, original=False)
    for key in keys:  # several together (a layer's index and its count of KV groups): all, then patch back what may be
        put(key, original=True)
    if _verify(module, small)[0] is not None:
        for key in keys:
            put(key, original=False)
        return failed
    originals = sorted(keys)
    for key in sorted(keys):
        put(key, original=False)
        if _verify(module, small)[0] is None:
            originals.remove(key)
        else:
            put(key, original=True)
    return kept(originals)


def reason_of(problems: list[str]) -> str:
    """The first three distinct ``problems``, joined (and how many more)."""
    unique = list(dict.fromkeys(problems))
    more = f" (and {len(unique) - 3} more)" if len(unique) > 3 else ""
    return "; ".join(unique[:3]) + more
