"""Depth: whole layers of a model's stack of repeated blocks removed, the model's class kept.

Width pruning shrinks each matmul; every layer still runs its norms, its attention over the KV cache and its
launches. Where a model is served one token at a time (a decoder at batch 1), that fixed cost per layer is a
large share of the step, and removing whole layers buys the same speed for far fewer parameters.

:func:`drop_layers` finds the model's *stack* — the ``nn.ModuleList``
or ``nn.Sequential`` holding the most modules of one class (``model.layers``, ``encoder.layer``, ``h``,
``blocks``) — ranks its layers by **block influence** on calibration batches
(one minus the mean cosine similarity between a layer's input and output hidden states, ShortGPT's measure: a
layer that barely turns the residual stream goes first), and returns a copy of the model, of the caller's class,
without the chosen layers. The kept layers' ``layer_idx`` (their slot in a KV cache) are renumbered and the
config that owns the stack says the new depth (``num_hidden_layers``, per-layer lists such as ``layer_types``), so
``generate()`` runs with the cache and ``upop_fx.save_pretrained`` writes a stock checkpoint. The result is
*verified*: on the example inputs it gives the original model's outputs with the same layers skipped.

With calibration ``data``, each run of removed layers is then **bridged** (``bridge=True``, the default with data):
the last linear map of the kept layer before the gap that writes its output into the residual stream (an MLP's
second layer) is re-fitted by ridge least squares (:func:`~upop_fx.training.reconstruct.fit_linear`, on the
calibration tokens) so that the stream it leaves is the one the original model had *after* the removed layers —
the next kept layer receives what it used to. A layer whose output is not the stream plus that map's output (a
norm after the residual add) is left as it was, with the reason; each bridge's error before and after is in
``Depth.bridges``. Padded positions (where a dict batch's ``attention_mask`` marks them) count in neither the
ranking nor the bridges' fits.

Example:
    >>> import torch, upop_fx
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> ids = torch.randint(0, 64, (2, 8))
    >>> depth = upop_fx.drop_layers(llama, {"input_ids": ids}, 1, data=[{"input_ids": ids}])
    >>> depth.stack, len(depth.module.model.layers), depth.module.config.num_hidden_layers
    ('model.layers', 3, 3)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..capture.program import cache_off, normalize_inputs
from ..compare import relative_error
from ..errors import InputError, PostconditionError
from ..training.loop import real_rows, token_mask
from ..training.reconstruct import LayerFit, fit_linear

__all__ = ["Depth", "Bridge", "drop_layers", "layer_stack", "block_influence", "DEPTH_RTOL", "BRIDGE_RTOL"]

log = logging.getLogger(__name__)

#: the largest relative error between the shallower model and the original with the same layers skipped
DEPTH_RTOL = 1e-5
#: a bridge is kept when the layer's output moved by what its re-fitted map's output moved, to this relative error
BRIDGE_RTOL = 1e-4


@dataclass
class Bridge:
    """One run of removed layers (``gap``, original numbering) and the kept layer before it (``layer``) whose map
    ``weight`` (qualified name) was re-fitted to stand in for them: its :class:`LayerFit` (relative errors on the
    calibration tokens), or ``why`` it was not; kept only where the stream the next layer receives came nearer the
    original's."""

    layer: int | None
    gap: list[int]
    weight: str | None = None
    fit: LayerFit | None = None
    why: str | None = None
    #: the relative error of the stream the next kept layer receives against the original's after the gap, on
    #: the calibration batches, before and after the re-fit (None: not re-fitted)
    stream_before: float | None = None
    stream_after: float | None = None

    @property
    def applied(self) -> bool:
        return self.fit is not None and self.fit.ridge is not None and self.why is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "applied": self.applied}


@dataclass
class Depth:
    """What :func:`drop_layers` returns: the shallower ``module`` (a copy, of the caller's class), the ``stack``'s
    qualified name, the ``dropped`` layer indices (in the original numbering), each layer's block ``influence``
    (None where the layers were named, not ranked) and the verified ``error`` against the original with those
    layers skipped (before the bridges), and the ``bridges`` over the gaps (empty without data or with
    ``bridge=False``)."""

    module: torch.nn.Module
    stack: str
    dropped: list[int]
    influence: list[float] | None
    error: float
    bridges: list[Bridge] = field(default_factory=list)

    def describe(self) -> str:
        """One line for a report (and one per bridge)."""
        n = len(self.dropped) + len(_stack_of(self.module, self.stack))
        lines = [f"{len(self.dropped)} of {n} layers of {self.stack} removed: {self.dropped}"]
        for b in self.bridges:
            if b.applied:
                assert b.fit is not None
                lines.append(f"  bridged {b.gap} by re-fitting {b.weight}: the stream after it against the original's "
                             f"after the gap, relative error {b.stream_before:.4f} -> {b.stream_after:.4f} on "
                             f"{b.fit.rows} calibration tokens")
            else:
                lines.append(f"  not bridged {b.gap}: {b.why or 'the fit did not lower the held-out error'}")
        return "\n".join(lines)


#: the containers a stack of layers is held in
STACKS = (torch.nn.ModuleList, torch.nn.Sequential)


def _stack_of(model: torch.nn.Module, name: str) -> torch.nn.ModuleList | torch.nn.Sequential:
    stack = model.get_submodule(name)
    assert isinstance(stack, STACKS)
    return stack


def layer_stack(model: torch.nn.Module, name: str | None = None
                ) -> tuple[str, torch.nn.ModuleList | torch.nn.Sequential]:
    """``(qualified name, container)`` of ``model``'s stack of layers: ``name`` when given, else the
    ``nn.ModuleList`` or ``nn.Sequential`` with the most children, all of one class (at least two). A model with two stacks of the same
    length (a vision and a text tower) must name the one meant."""
    if name is not None:
        try:
            stack = model.get_submodule(name)
        except AttributeError as e:
            raise InputError(f"the model has no submodule {name!r} ({e})") from None
        if not isinstance(stack, STACKS) or len(stack) < 2:
            raise InputError(f"{name!r} is a {type(stack).__name__}, not a list of at least two layers")
        return name, stack
    found: list[tuple[int, str, torch.nn.ModuleList | torch.nn.Sequential]] = []
    for qual, m in model.named_modules():
        if isinstance(m, STACKS) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            found.append((len(m), qual, m))
    if not found:
        raise InputError(f"{type(model).__name__} has no nn.ModuleList or nn.Sequential of two or more layers of one class: there "
                         "is no stack of layers to remove from")
    found.sort(key=lambda t: -t[0])
    if len(found) > 1 and found[1][0] == found[0][0]:
        raise InputError(f"{type(model).__name__} has several stacks of {found[0][0]} layers "
                         f"({', '.join(q for n, q, _ in found if n == found[0][0])}): name one with stack=")
    return found[0][1], found[0][2]


def _hidden(x: Any) -> torch.Tensor | None:
    """The hidden states a layer passes on: the tensor itself, or the first element of a tuple or model output."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    first = next(iter(x.values()), None) if isinstance(x, dict) else None
    return first if isinstance(first, torch.Tensor) else None


def _layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def _run(model: torch.nn.Module, inputs: Any) -> Any:
    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        return model(*args, **kwargs)


def block_influence(model: torch.nn.Module, batches: Iterable[Any], stack: str | None = None) -> list[float]:
    """Per layer of ``model``'s stack: one minus the mean cosine similarity, over every token of ``batches``
    (model inputs), between the hidden states the layer receives and the ones it passes on. Padding is left out:
    where a batch is a dict whose ``attention_mask`` has the shape of the layer's tokens, only the positions it
    marks count."""
    name, layers = layer_stack(model, stack)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)
    seen: dict[int, torch.Tensor] = {}
    running: list[Any] = [None]  # the batch being run
    handles = []
    for i, layer in enumerate(layers):

        def before(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i) -> None:
            h = _layer_input(args, kwargs)
            if h is not None:
                seen[i] = h

        def after(_m: torch.nn.Module, _args: Any, _kwargs: Any, out: Any, i: int = i) -> None:
            h_in, h_out = seen.pop(i, None), _hidden(out)
            if h_in is None or h_out is None or h_in.shape != h_out.shape:
                raise InputError(f"{name}[{i}] ({type(_m).__name__}): its input and output hidden states could "
                                 "not be read as one tensor of the same shape, so its influence cannot be measured")
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            real = token_mask(running[0], h_out.shape[:-1])
            tokens = torch.ones_like(cos) if real is None else real.to(cos.device, torch.float64)
            sums[i] += ((1 - cos) * tokens).sum()
            counts[i] += tokens.sum()

        handles += [layer.register_forward_pre_hook(before, with_kwargs=True),
                    layer.register_forward_hook(after, with_kwargs=True)]
    try:
        for batch in batches:
            running[0] = batch
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not bool((counts > 0).all()):
        raise InputError("no calibration batch reached every layer of the stack: give data (model inputs)")
    return (sums / counts).tolist()


def _skipping(layers: Sequence[torch.nn.Module], dropped: Iterable[int]) -> list[Any]:
    """Forward hooks that make each dropped layer pass its input hidden states on unchanged."""
    handles = []
    for i in dropped:

        def skip(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            h = _layer_input(args, kwargs)
            if isinstance(out, torch.Tensor):
                return h
            if isinstance(out, tuple):
                return (h, *out[1:])
            raise InputError(f"a layer returning {type(out).__name__} cannot be skipped to verify the cut")

        handles.append(layers[i].register_forward_hook(skip, with_kwargs=True))
    return handles


def _renumber(kept: Sequence[torch.nn.Module], old: Sequence[int]) -> None:
    """Each kept layer's ``layer_idx`` attributes (a KV cache's slot, in the layer and its submodules) set to its
    new position, where they held its old one."""
    for new, (layer, was) in enumerate(zip(kept, old)):
        for m in layer.modules():
            if getattr(m, "layer_idx", None) == was:
                m.layer_idx = new


def _owner_config(model: torch.nn.Module, stack: str) -> Any:
    """The config of the nearest module above the stack that has one (a decoder's, a text tower's)."""
    parts = stack.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut]))
        if getattr(owner, "config", None) is not None:
            return owner.config
    return None


def _update_config(config: Any, before: int, kept: list[int]) -> list[str]:
    """The config's depth fields for a stack of ``before`` layers now holding ``kept``: integers equal to
    ``before`` named like a depth, and per-layer lists of ``before`` entries. Returns the fields changed."""
    changed = []
    for key, value in list(vars(config).items()):
        if isinstance(value, int) and not isinstance(value, bool) and value == before and "layer" in key:
            setattr(config, key, len(kept))
            changed.append(key)
        elif isinstance(value, list) and len(value) == before and "layer" in key:
            setattr(config, key, [value[i] for i in kept])
            changed.append(key)
    return changed


def _gaps(total: int, dropped: list[int]) -> list[tuple[int | None, list[int]]]:
    """Each run of consecutive removed layers, with the kept layer before it (None: the run starts the stack)."""
    runs: list[tuple[int | None, list[int]]] = []
    for i in dropped:
        if runs and runs[-1][1][-1] == i - 1:
            runs[-1][1].append(i)
        else:
            runs.append((i - 1 if i > 0 else None, [i]))
    return runs


def _outputs(model: torch.nn.Module, modules: dict[Any, torch.nn.Module], batches: list[Any]
             ) -> dict[Any, list[tuple[Any, torch.Tensor]]]:  # fmt: skip
    """Per key, per batch: the module's ``(input args, output)`` (its hidden states: :func:`_hidden`)."""
    seen: dict[Any, list[tuple[Any, torch.Tensor]]] = {k: [] for k in modules}
    if not modules:  # nothing to read: no forward to run
        return seen
    handles = []
    for key, m in modules.items():

        def keep(_m: Any, args: tuple[Any, ...], out: Any, key: Any = key) -> None:
            seen[key].append((args, _hidden(out)))

        handles.append(m.register_forward_hook(keep))
    try:
        for batch in batches:
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _is_map(m: torch.nn.Module) -> bool:
    """A linear map with a 2-D weight: ``nn.Linear`` (``(out, in)``) or Hugging Face's ``Conv1D`` (``(in, out)``)."""
    return isinstance(m, torch.nn.Linear) or (type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None
                                              and m.weight.dim() == 2)


def _last_map(layer: torch.nn.Module, batch: Any, model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The linear map (:func:`_is_map`) of ``layer`` that runs last with an output of the layer's own shape: the one
    that writes into the residual stream at the end of a pre-norm block."""
    order: list[tuple[str, torch.nn.Module, torch.Size]] = []
    handles = [m.register_forward_hook(lambda m, _a, out, name=name: order.append((name, m, out.shape)))
               for name, m in layer.named_modules() if _is_map(m)]
    handles.append(layer.register_forward_hook(lambda _m, _a, out: order.append(("", layer, _hidden(out).shape))))
    try:
        _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not order or order[-1][0] != "":
        return None
    shape = order[-1][2]
    found = [(n, m) for n, m, sh in order[:-1] if sh == shape]
    return found[-1] if found else None


def _bridge(work: torch.nn.Module, name: str, position: int, before: int, gap: list[int], targets: list[torch.Tensor],
            calibration: list[Any]) -> Bridge:
    """Re-fit the last map of the kept layer at ``position`` (``before`` in the original numbering) so that the
    stream after it is ``targets`` (the original's after ``gap``), per calibration batch; kept only when the
    layer's output moves by what the map's output moves (the layer ends in ``stream + map(x)``)."""
    layer = _stack_of(work, name)[position]
    found = _last_map(layer, calibration[0], work)
    if found is None:
        return Bridge(before, gap, why="no linear map of the layer writes an output of the layer's shape")
    where, linear = found
    qualified = f"{name}.{position}.{where}"
    got = _outputs(work, {"map": linear, "layer": layer}, calibration)
    if not len(got["map"]) == len(got["layer"]) == len(targets):
        return Bridge(before, gap, qualified, why=f"{where} does not run once per forward")
    xs = [real_rows(b, args[0]) for b, (args, _) in zip(calibration, got["map"])]
    # what the map must give: the target stream minus the rest of the layer's output
    ys = [real_rows(b, t - (o - m)) for b, t, (_, o), (_, m) in zip(calibration, targets, got["layer"], got["map"])]
    transposed = not isinstance(linear, torch.nn.Linear)  # Conv1D stores (in, out)
    w0 = linear.weight.t() if transposed else linear.weight
    fit, weight, bias = fit_linear(qualified, w0, linear.bias, xs, ys)
    if weight is None:
        return Bridge(before, gap, qualified, fit)
    old = (linear.weight.data, linear.bias.data if linear.bias is not None else None)
    linear.weight.data = (weight.t() if transposed else weight).contiguous()
    if bias is not None:
        linear.bias.data = bias
    after = _outputs(work, {"map": linear, "layer": layer}, calibration)
    real_targets = [real_rows(b, t) for b, t in zip(calibration, targets)]
    streams = tuple(relative_error([real_rows(b, o) for b, (_, o) in zip(calibration, out["layer"])], real_targets)
                    for out in (got, after))
    moved = got["layer"][0][1] - got["map"][0][1] + after["map"][0][1]
    tolerance = max(BRIDGE_RTOL, 8 * torch.finfo(moved.dtype).eps)  # the add's rounding in low precision
    why = None
    if relative_error(after["layer"][0][1], moved) > tolerance:
        why = f"the layer's output is not the stream plus {where}'s output (a norm or another map after it)"
    elif not streams[1] < streams[0]:
        why = "the stream the next layer receives did not come nearer the original's"
    if why is not None:
        linear.weight.data = old[0]
        if old[1] is not None:
            linear.bias.data = old[1]
    return Bridge(before, gap, qualified, fit, why, *streams)


def drop_layers(model: torch.nn.Module, example_inputs: Any, n: int | None = None, *,
                layers: Sequence[int] | None = None, data: Iterable[Any] | None = None,
                stack: str | None = None, bridge: bool | None = None) -> Depth:
    """A copy of ``model`` without ``n`` layers of its stack (those of least block influence on ``data``, an
    iterable of model inputs: a few calibration batches) or without the named ``layers``; verified on
    ``example_inputs`` against ``model`` with the same layers skipped, then each gap bridged on ``data`` (see the
    module docstring; ``bridge``: default True when ``data`` is given). ``model`` is not changed. ``stack``: the
    qualified name of the ``ModuleList`` (default: :func:`layer_stack`'s choice)."""
    name, original = layer_stack(model, stack)
    total = len(original)
    if (n is None) == (layers is None):
        raise InputError("give either n (how many layers to remove, ranked on data) or layers (which ones)")
    bridge = data is not None if bridge is None else bridge
    if bridge and data is None:
        raise InputError("bridging the gaps needs data (calibration batches of model inputs); or bridge=False")
    calibration = list(data) if data is not None else []  # a few batches: read by the ranking and the bridges
    work = copy.deepcopy(model)
    training = model.training
    work.eval()
    influence: list[float] | None = None
    if layers is None:
        assert n is not None
        if not 0 < n < total:
            raise InputError(f"n={n}: the stack {name} has {total} layers; remove at least one and keep at least one")
        if data is None:
            raise InputError("ranking layers by block influence needs data (calibration batches of model inputs)")
        influence = block_influence(work, calibration, name)
        dropped = sorted(sorted(range(total), key=lambda i: influence[i])[:n])
    else:
        dropped = sorted(set(layers))
        bad = [i for i in dropped if not 0 <= i < total]
        if bad or len(dropped) >= total:
            raise InputError(f"layers={list(layers)}: the stack {name} has layers 0..{total - 1}; keep at least one")
    work_layers = _stack_of(work, name)
    gaps = _gaps(total, dropped) if bridge else []
    with cache_off(work):  # what the original's stream is after each gap, per calibration batch
        streams = _outputs(work, {g[-1]: work_layers[g[-1]] for before, g in gaps if before is not None}, calibration)
    handles = _skipping(work_layers, dropped)
    try:
        with cache_off(work):  # a KV cache is no output to compare
            reference = _run(work, example_inputs)
    finally:
        for h in handles:
            h.remove()
    kept = [i for i in range(total) if i not in dropped]
    config = _owner_config(work, name)
    changed = _update_config(config, total, kept) if config is not None else []
    kept_layers = [work_layers[i] for i in kept]
    _renumber(kept_layers, kept)
    parent_name, _, attr = name.rpartition(".")
    container = torch.nn.Sequential(*kept_layers) if isinstance(work_layers, torch.nn.Sequential) else \
        torch.nn.ModuleList(kept_layers)
    setattr(work.get_submodule(parent_name), attr, container)
    with cache_off(work):
        error = relative_error(_run(work, example_inputs), reference)
    if not error <= DEPTH_RTOL:
        raise PostconditionError(f"the model without layers {dropped} of {name} differs from the original with them "
                                 f"skipped (relative error {error:.2e}): its forward does not use them as blocks "
                                 "that can go (one that reads the number of layers, or a layer whose output is not the "
                                 "hidden states passed on)")
    bridges = []
    with cache_off(work):
        for before, gap in gaps:  # in order: each fitted with the ones before it in place
            if before is None:
                bridges.append(Bridge(None, gap, why="the gap starts the stack: no kept layer before it"))
                continue
            targets = [out for _, out in streams[gap[-1]]]
            bridges.append(_bridge(work, name, kept.index(before), before, gap, targets, calibration))
    work.train(training)
    log.info("depth: removed layers %s of %s (%d -> %d); config fields updated: %s; %d of %d gaps bridged", dropped,
             name, total, len(kept), ", ".join(changed) or "none", sum(b.applied for b in bridges), len(bridges))
    return Depth(work, name, dropped, influence, error, bridges)
