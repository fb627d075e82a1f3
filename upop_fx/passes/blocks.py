"""Channel blocks after a cut: the labels that survive, kept rectangular."""

from __future__ import annotations

import numpy as np

from ..errors import SurgeryError

__all__ = ["RAGGED", "compact"]


class _Ragged:
    def __repr__(self) -> str:
        return "RAGGED"


#: placeholder for a block whose kept channels do not form a dense block (see ``split_slots``)
RAGGED = _Ragged()


def compact(labels: np.ndarray, kept: np.ndarray, where: str) -> np.ndarray:
    """Drop removed labels from a block, keeping it rectangular (each head keeps as many dims)."""
    if labels.ndim == 1:
        return labels[kept]
    rows = [compact(labels[i], kept[i], where) for i in range(labels.shape[0]) if kept[i].any()]
    if not rows:
        return np.zeros((0,) * labels.ndim, dtype=labels.dtype)
    if len({r.shape for r in rows}) != 1:
        shapes = sorted({r.shape for r in rows})
        raise SurgeryError(
            f"{where}: the kept channels do not form a dense block (rows keep {shapes}): every head must keep as "
            f"many dims"
        )
    return np.stack(rows)
