"""The exact cost model: what removing one channel saves, read off the graph's shapes.

Parameters: every parameter entry tied to the channel (weight rows and columns, biases, norms) times the size
of the other axes. FLOPs: matmul-like ops save ``2 · rows · (other weight axis)`` per channel; attention saves
``2 · B · Tq · Tk`` per q/k dim (the T×T score matrix) and as much per v dim. FLOPs are per sample at the example
sequence length; sizes along other channel axes are taken at full width (a first-order cost).
"""

from __future__ import annotations

import math

import numpy as np

from .groups import AttentionSite, ParamUse

__all__ = ["class_costs"]


def class_costs(
    roots: np.ndarray,
    uses: list[ParamUse],
    sites: list[AttentionSite],
    param_shapes: dict[str, tuple[int, ...]],
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Parameter and FLOP cost per label *root* (class id): two arrays indexed by root."""
    n = len(roots)
    params = np.zeros(n, dtype=np.float64)
    flops = np.zeros(n, dtype=np.float64)
    counted: dict[tuple[str, int], np.ndarray] = {}  # entries of each parameter axis already costed
    for u in uses:
        shape = param_shapes[u.name]
        per_entry = math.prod(shape) // shape[u.axis]
        r = roots[u.labels]
        done = counted.setdefault((u.name, u.axis), np.zeros(shape[u.axis], dtype=bool))
        fresh = ~done[u.where]
        done[u.where] = True
        np.add.at(params, r[fresh], per_entry)
        if u.flops:
            np.add.at(flops, r, u.flops)
    for s in sites:
        for labels, f in ((s.q, s.flops_qk), (s.v, s.flops_v)):
            if labels is not None:
                np.add.at(flops, roots[labels.reshape(-1)], f)
    return params, flops / batch_size
