"""Comparing model outputs: the one measure every check in upop_fx uses.

Example:
    >>> import torch
    >>> from upop_fx.compare import relative_error
    >>> relative_error({"y": torch.ones(3)}, {"y": torch.ones(3)})
    0.0
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["relative_error"]


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
        den = y.double().norm().item()
        worst = max(worst, (x.double() - y.double()).norm().item() / max(den, 1e-12))
    return worst
