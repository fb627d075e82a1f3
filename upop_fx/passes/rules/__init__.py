"""Per-op rules: how channel labels flow from an op's inputs to its outputs, and how surgery rewrites it.

One op family per module; each registers itself in :mod:`.registry` when imported, and this package imports
them all, so importing ``upop_fx.passes.rules`` gives the complete tables. A *propagation rule* is
``rule(ctx, node) -> Block | list[Block | None] | None`` and is called only for nodes with at least one labelled
tensor input; it records couplings (``ctx.union``), parameter uses (``ctx.use``) and refusals (``ctx.refuse``)
on the :class:`~upop_fx.passes.trace.LabelTracer`. A *rewrite* is ``rewrite(ctx, node) -> None``: it edits a
copied node's literal arguments (shape constants, split sizes, indices, the attention scale) once channels are
removed (see ``passes/surgery.py``).

A new op family goes in a new module here, registered with ``@rule(aten.op, ...)`` (and ``@rewrite`` when
surgery must edit its literals), imported below, with a unit test in ``tests/test_rules.py``.
"""

from . import attention, elementwise, indexing, linear, shape
from .registry import REWRITES, RULES, SEEDING, key_of, rewrite, rule

__all__ = ["RULES", "REWRITES", "SEEDING", "rule", "rewrite", "key_of", "attention", "elementwise", "indexing",
           "linear", "shape"]
