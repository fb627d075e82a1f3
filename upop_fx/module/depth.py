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
from dataclasses import dataclass
from typing import Any

import torch

from ..capture.program import cache_off, normalize_inputs
from ..compare import relative_error
from ..errors import InputError, PostconditionError

__all__ = ["Depth", "drop_layers", "layer_stack", "block_influence", "DEPTH_RTOL"]

log = logging.getLogger(__name__)

#: the largest relative error between the shallower model and the original with the same layers skipped
DEPTH_RTOL = 1e-5


@dataclass
class Depth:
    """What :func:`drop_layers` returns: the shallower ``module`` (a copy, of the caller's class), the ``stack``'s
    qualified name, the ``dropped`` layer indices (in the original numbering), each layer's block ``influence``
    (None where the layers were named, not ranked) and the verified ``error`` against the original with those
    layers skipped."""

    module: torch.nn.Module
    stack: str
    dropped: list[int]
    influence: list[float] | None
    error: float

    def describe(self) -> str:
        """One line for a report."""
        n = len(self.dropped) + len(_stack_of(self.module, self.stack))
        return f"{len(self.dropped)} of {n} layers of {self.stack} removed: {self.dropped}"


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
    mask: list[torch.Tensor | None] = [None]  # the running batch's attention mask
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
            tokens = mask[0] if mask[0] is not None and mask[0].shape == cos.shape else torch.ones_like(cos)
            tokens = tokens.to(cos.device, torch.float64)
            sums[i] += ((1 - cos) * tokens).sum()
            counts[i] += tokens.sum()

        handles += [layer.register_forward_pre_hook(before, with_kwargs=True),
                    layer.register_forward_hook(after, with_kwargs=True)]
    try:
        for batch in batches:
            given = batch.get("attention_mask") if isinstance(batch, dict) else None
            mask[0] = given if isinstance(given, torch.Tensor) else None
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


def drop_layers(model: torch.nn.Module, example_inputs: Any, n: int | None = None, *,
                layers: Sequence[int] | None = None, data: Iterable[Any] | None = None,
                stack: str | None = None) -> Depth:
    """A copy of ``model`` without ``n`` layers of its stack (those of least block influence on ``data``, an
    iterable of model inputs) or without the named ``layers``; verified on ``example_inputs`` against ``model``
    with the same layers skipped. ``model`` is not changed. ``stack``: the qualified name of the ``ModuleList``
    (default: :func:`layer_stack`'s choice)."""
    name, original = layer_stack(model, stack)
    total = len(original)
    if (n is None) == (layers is None):
        raise InputError("give either n (how many layers to remove, ranked on data) or layers (which ones)")
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
        influence = block_influence(work, data, name)
        dropped = sorted(sorted(range(total), key=lambda i: influence[i])[:n])
    else:
        dropped = sorted(set(layers))
        bad = [i for i in dropped if not 0 <= i < total]
        if bad or len(dropped) >= total:
            raise InputError(f"layers={list(layers)}: the stack {name} has layers 0..{total - 1}; keep at least one")
    work_layers = _stack_of(work, name)
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
    work.train(training)
    log.info("depth: removed layers %s of %s (%d -> %d); config fields updated: %s", dropped, name, total, len(kept),
             ", ".join(changed) or "none")
    return Depth(work, name, dropped, influence, error)
