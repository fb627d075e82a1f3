"""Pass infrastructure: a pass is configured in ``__init__`` and called as ``pass_(gm) -> PassResult``.

The base runs the contract around :meth:`GraphPass.run`, as torch.fx's ``PassBase`` and onnx-ir's pass
infrastructure do:

1. ``gm.graph.lint()`` and :meth:`GraphPass.requires` — a failure raises
   :class:`~upop_fx.errors.PreconditionError` naming the pass;
2. :meth:`GraphPass.run`;
3. the in-place / functional contract: an in-place pass (``in_place = True``) returns the module it was given;
   a functional pass leaves its input untouched (same graph code, same parameters and buffers) and returns a
   new module whenever it changed something; ``modified`` must be honest — it is True exactly when the graph
   code or a parameter/buffer shape differs between the input (as it was) and the output;
4. ``graph.lint()`` of the result and :meth:`GraphPass.ensures` — a failure raises
   :class:`~upop_fx.errors.PostconditionError`.

Metadata (``gm.meta``, ``node.meta``) is where analyses leave their results; it does not count as a
modification.

Example:
    >>> import torch
    >>> from upop_fx.passes.base import GraphPass, PassResult
    >>> class CountNodes(GraphPass[int]):
    ...     in_place = True
    ...     def run(self, gm):
    ...         return PassResult(gm, False, len(gm.graph.nodes))
    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    >>> CountNodes()(gm).value  # x, weight, bias, linear, output
    5
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch

from ..errors import PostconditionError, PreconditionError

__all__ = ["PassResult", "GraphPass", "graph_fingerprint", "copy_structure", "own_tensors", "set_tensor", "module_tensors"]

T = TypeVar("T")


@dataclass
class PassResult(Generic[T]):
    """What a pass returns: the graph module it produced (or analysed), whether it changed, and its payload."""

    gm: torch.fx.GraphModule
    modified: bool
    value: T


def copy_structure(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm``'s graph, submodules and metadata whose parameters and buffers are ``gm``'s own
    tensors (shared, not copied): a functional pass that replaces most tensors anyway starts from this and
    calls :func:`own_tensors` at the end, so no full-size copy of the model exists at any moment."""
    tensors = [*gm.parameters(), *gm.buffers()]
    return copy.deepcopy(gm, {id(t): t for t in tensors})


def own_tensors(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """Give ``new`` its own copy of every parameter and buffer it still shares with ``old`` (in place)."""
    shared = {id(t) for t in [*old.parameters(), *old.buffers()]}
    copies: dict[int, torch.Tensor] = {}  # one copy per tensor: tied weights stay tied
    for module in new.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and id(p) in shared:
                if id(p) not in copies:
                    copies[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[attr] = copies[id(p)]
        for attr, b in list(module._buffers.items()):
            if b is not None and id(b) in shared:
                module._buffers[attr] = copies.setdefault(id(b), b.clone())


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied ones under each of their names."""
    out: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def get_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter, buffer or tensor attribute at the dotted ``name`` in ``module`` (a ``get_attr`` target)."""
    owner_name, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner_name) if owner_name else module, attr)


def set_tensor(module: torch.nn.Module, name: str, data: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Put ``data`` at ``name`` in ``module`` as a parameter when ``like`` (the tensor it replaces) is one, with
    its ``requires_grad``, else as a buffer of the same persistence; a parameter given as ``data`` is placed as
    it is (an alias). Returns what was placed."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if isinstance(data, torch.nn.Parameter):  # an alias of a parameter already in place: the same object
        new: torch.Tensor = data
        setattr(owner, attr, new)
    elif isinstance(like, torch.nn.Parameter):
        new = torch.nn.Parameter(data, requires_grad=like.requires_grad)
        setattr(owner, attr, new)
    elif attr in owner._buffers:
        owner.register_buffer(attr, data, persistent=attr not in owner._non_persistent_buffers_set)
        new = data
    else:  # a plain tensor attribute (a graph's constant)
        setattr(owner, attr, data)
        new = data
    return new


def graph_fingerprint(gm: torch.fx.GraphModule) -> tuple[Any, ...]:
    """What a modification changes: the graph and the names, shapes and identities of the tensors."""
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    return str(gm.graph), tuple((name, tuple(t.shape), id(t)) for name, t in tensors)


def _structure(fp: tuple[Any, ...]) -> tuple[Any, ...]:
    """A graph fingerprint without tensor identities (a copy of a module has the same structure)."""
    code, tensors = fp
    return code, tuple((name, shape) for name, shape, _ in tensors)


class GraphPass(Generic[T]):
    """Base class: subclasses set ``in_place`` and implement :meth:`run`, and may check their contract in
    :meth:`requires` and :meth:`ensures` (raise ``PreconditionError`` / ``PostconditionError`` there, or let the
    base turn an ``AssertionError``/``LookupError`` into one)."""

    #: True: the pass edits ``gm`` itself and returns it; False: ``gm`` is never changed.
    in_place: ClassVar[bool] = False

    def requires(self, gm: torch.fx.GraphModule) -> None:
        """Raise :class:`PreconditionError` if ``gm`` lacks what :meth:`run` needs."""

    def ensures(self, gm: torch.fx.GraphModule, result: PassResult[T]) -> None:
        """Raise :class:`PostconditionError` if ``result`` breaks what the pass promises (``gm`` is the input;
        for an in-place pass it is ``result.gm``)."""

    def run(self, gm: torch.fx.GraphModule) -> PassResult[T]:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult[T]:
        name = type(self).__name__
        if not isinstance(gm, torch.fx.GraphModule):
            raise PreconditionError(f"{name} takes a torch.fx.GraphModule, not {type(gm).__name__}")
        try:
            gm.graph.lint()
            self.requires(gm)
        except PreconditionError:
            raise
        except (AssertionError, LookupError, RuntimeError) as exc:
            raise PreconditionError(f"{name}: {exc}") from exc
        before = graph_fingerprint(gm)
        result = self.run(gm)
        self._check_mode(name, gm, before, result)
        try:
            result.gm.graph.lint()
            self.ensures(gm, result)
        except PostconditionError:
            raise
        except (AssertionError, LookupError, RuntimeError) as exc:
            raise PostconditionError(f"{name}: {exc}") from exc
        return result

    def _check_mode(self, name: str, gm: torch.fx.GraphModule, before: tuple[Any, ...], result: PassResult[T]) -> None:
        after = graph_fingerprint(result.gm)
        changed = _structure(after) != _structure(before)
        if self.in_place:
            if result.gm is not gm:
                raise PostconditionError(f"{name} is in place but returned a different module")
        else:
            if graph_fingerprint(gm) != before:
                raise PostconditionError(f"{name} is functional but changed the module it was given")
            if changed and result.gm is gm:
                raise PostconditionError(f"{name} is functional but returned its input changed")
        if bool(result.modified) != changed:
            raise PostconditionError(
                f"{name} reported modified={result.modified}, but the graph {'changed' if changed else 'did not change'}"
            )

    def __repr__(self) -> str:
        mode = "in place" if self.in_place else "functional"
        return f"{type(self).__name__}({mode})"
