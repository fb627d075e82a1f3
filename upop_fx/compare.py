"""Comparing model outputs: the one measure every check in upop_fx uses.

Example:
    >>> import torch
    >>> from upop_fx.compare import relative_error
    >>> relative_error({"y": torch.ones(3)}, {"y": torch.ones(3)})
    0.0
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["relative_error", "in_float64", "float64_error", "agrees", "FLOAT64_RTOL"]

#: the relative error two float64 runs of the same function may differ by (rounding, amplified through a deep
#: model) — a wrong cut differs by far more
FLOAT64_RTOL = 1e-8
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def relative_error(out: Any, ref: Any) -> float:
    """The worst ``‖out − ref‖ / ‖ref‖`` over the tensor leaves of two output trees; ``inf`` when the trees do
    not match (leaf count, shapes) or an integer/bool leaf differs."""
    a, _ = torch.utils._pytree.tree_flatten(out)
    b, _ = torch.utils._pytree.tree_flatten(ref)
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if not isinstance(y, torch.Tensor):
            continue
        if not isinstance(x, torch.Tensor) or x.shape != y.shape:
            return float("inf")
        if not y.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        common = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)  # half types: float32
        x, y = x.to(common), y.to(common)
        # norms accumulated in float64; the difference itself is exact to an ulp of its own size
        den = torch.linalg.vector_norm(y, dtype=torch.float64).item()
        num = torch.linalg.vector_norm(x - y, dtype=torch.float64).item()
        worst = max(worst, num / max(den, 1e-12))
    return worst


def in_float64(gm: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[torch.fx.GraphModule, tuple[Any, ...], dict[str, Any]]:
    """A float64 copy of ``gm`` (its floating tensors, and every floating dtype its graph names: casts, tensor
    factories, dtype asserts) with its floating inputs in float64: the same function without float32's rounding,
    for telling a rounding difference from a real one. ``gm`` itself is untouched."""
    new = copy.deepcopy(gm).double()

    def widen(a: Any) -> Any:
        if isinstance(a, torch.dtype) and a in _FLOATS:
            return torch.float64
        if isinstance(a, (list, tuple)):
            return type(a)(widen(x) for x in a)
        if isinstance(a, dict):
            return {k: widen(v) for k, v in a.items()}
        return a

    for node in new.graph.nodes:
        node.args, node.kwargs = widen(node.args), widen(node.kwargs)
    new.recompile()

    def inputs(t: Any) -> Any:
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return new, torch.utils._pytree.tree_map(inputs, args), torch.utils._pytree.tree_map(inputs, kwargs)


def float64_error(small: torch.fx.GraphModule, ref: torch.fx.GraphModule, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> float | None:
    """The relative error of ``small`` against ``ref`` with both run in float64 (:func:`in_float64`), for a
    float32 check that a deep model's rounding (sums of other lengths, amplified layer after layer) pushed past
    its tolerance: a right cut agrees within :data:`FLOAT64_RTOL`, a wrong one does not. None where a graph
    cannot run in float64 (an op without a float64 kernel): the float32 verdict then stands."""
    try:
        with torch.no_grad():
            small64, a, k = in_float64(small, args, kwargs)
            out = small64(*a, **k)
            del small64
            ref64, a, k = in_float64(ref, args, kwargs)
            return relative_error(out, ref64(*a, **k))
    except Exception as exc:  # noqa: BLE001 - any failure to run widened leaves the float32 verdict
        log.debug("no float64 rerun (%s: %s)", type(exc).__name__, exc)
        return None


def agrees(err: float, rtol: float, small: torch.fx.GraphModule, ref: torch.fx.GraphModule, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> tuple[bool, float | None]:
    """The verdict of a check that measured ``err`` (float32) between ``small`` and ``ref``: whether they agree —
    ``err`` within ``rtol``, or else both rerun in float64 within :data:`FLOAT64_RTOL` (rounding, not a wrong
    cut) — and the float64 error (None where it was not needed or cannot be had)."""
    if err <= rtol:
        return True, None
    err64 = float64_error(small, ref, args, kwargs)
    return err64 is not None and err64 <= FLOAT64_RTOL, err64
