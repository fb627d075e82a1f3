"""The rule registry: how channel labels flow from an op's inputs to its outputs, and how surgery rewrites it.

One op family per module. A *propagation rule* is ``rule(ctx, node) -> Block | list[Block | None] | None`` and
is called only for nodes with at least one labelled tensor input; it records couplings (``ctx.union``),
parameter uses (``ctx.use``) and refusals (``ctx.refuse``) on the :class:`~upop_fx.passes.trace.LabelTracer`.
A *rewrite* is ``rewrite(ctx, node) -> None``: it edits a copied node's literal arguments (shape constants,
split sizes, indices, the attention scale) once channels are removed (see ``passes/surgery.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["RULES", "REWRITES", "SEEDING", "rule", "rewrite", "key_of"]

RULES: dict[Any, Callable[..., Any]] = {}
#: ops whose rule runs even without labelled inputs: they create labels (Linear outputs, embeddings).
SEEDING: set[Any] = set()
REWRITES: dict[Any, Callable[..., Any]] = {}


def key_of(target: Any) -> Any:
    """Registry key of a node target: the overload packet for aten ops, the qualified name (``"ns::op"``) for
    ops of other libraries (registered by name, so that a rule needs no import of the library that defines
    the op), the callable itself otherwise."""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace != "aten":
            return target._schema.name
        return target.overloadpacket
    return target


def rule(*targets: Any, seeding: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for t in targets:
            RULES[key_of(t)] = fn
            if seeding:
                SEEDING.add(key_of(t))
        return fn

    return register


def rewrite(*targets: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for t in targets:
            REWRITES[key_of(t)] = fn
        return fn

    return register
