"""A rotary cos/sin table the model's class computes once for every layer, kept exact in the rebuilt module.

The graph slices a shared rotary table per use (surgery's ``index_select`` of the kept entries), so each layer may
keep its own rotary pairs. The model's class computes the table once, from its frequencies (``inv_freq``): it can
follow a cut only where every use keeps the same entries, and only with those frequencies sliced. Where the uses
agree, :func:`frequency_slices` finds the frequency buffers the tables are computed from (one-dimensional float
buffers upstream of the tables, of the table's length or half of it) and how table entries map to their entries,
read from which entries the analysis paired: ``j`` and ``j + n/2`` from frequency ``j`` (``cat(freqs, freqs)``,
Llama's layout) or ``2i`` and ``2i + 1`` from frequency ``i`` (interleaved, GPT-J's); :func:`slice_frequencies` cuts them in the rebuilt module (and the buffers
of the same module holding the same values, such as an ``original_inv_freq``). The rebuild's verification is what
proves the result.

Example:
    >>> import numpy as np
    >>> from upop_fx.module.rotary import frequency_indices
    >>> frequency_indices([2, 3, 6, 7], table=8, size=4, layout="half")  # pairs (2, 6) and (3, 7)
    [2, 3]
    >>> frequency_indices([2, 3, 6, 7], table=8, size=4, layout="interleaved")  # pairs (2, 3) and (6, 7)
    [1, 3]
    >>> frequency_indices([0, 1], table=8, size=4, layout="half") is None  # half of two pairs: no frequency set
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..ir.groups import GroupAnalysis
from ..passes.base import set_tensor

__all__ = ["kept_entries", "tables_problem", "frequency_indices", "frequency_slices", "slice_frequencies"]

#: how far upstream of a table its frequency buffer is looked for (nodes)
SEARCH_DEPTH = 48


def kept_entries(analysis: GroupAnalysis, removed: np.ndarray) -> list[tuple[int, ...]]:
    """Per rotary table use: the entries of the table the cut keeps."""
    return [tuple(np.nonzero(~removed[t.labels].all(axis=0))[0].tolist()) for t in analysis.tables]


def tables_problem(analysis: GroupAnalysis, removed: np.ndarray) -> tuple[str | None, bool]:
    """``(why the class cannot compute the cut's tables, whether every use keeps the same entries)``; ``(None,
    True)`` where no table loses an entry."""
    kept = kept_entries(analysis, removed)
    if not kept or all(len(k) == len(analysis.tables[i].labels[0]) for i, k in enumerate(kept)):
        return None, True
    if len(set(kept)) == 1:
        return (f"the rotary cos/sin tables are computed once from every rotary frequency, and the cut keeps "
                f"{len(kept[0])} of {len(analysis.tables[0].labels[0])} table entries (the same in all {len(kept)} "
                f"uses); the class does not slice its frequencies"), True
    return (f"the rotary cos/sin tables are computed once for all layers, and the cut keeps different rotary "
            f"pairs per layer ({len(set(kept))} different sets over {len(kept)} uses)"), False


def frequency_indices(kept: Sequence[int], table: int, size: int, layout: str) -> list[int] | None:
    """The frequencies (of ``size``) that produce exactly the ``kept`` entries of a table of ``table`` entries:
    all of them where ``size == table``; for ``size == table / 2``, entries ``j`` and ``j + size`` from frequency
    ``j`` (``layout="half"``) or ``2i`` and ``2i + 1`` from ``i`` (``"interleaved"``). None where that layout
    does not give exactly ``kept``."""
    kept = sorted(int(k) for k in kept)
    if size == table:
        return kept
    if 2 * size != table:
        return None
    if layout == "half":
        half = sorted({k % size for k in kept})
        return half if sorted(half + [i + size for i in half]) == kept else None
    pairs = sorted({k // 2 for k in kept})
    return pairs if sorted([2 * i for i in pairs] + [2 * i + 1 for i in pairs]) == kept else None


def _layout(classes: np.ndarray) -> str | None:
    """How a table's entries pair (their classes, one row): ``"half"`` (``j`` with ``j + n/2``), ``"interleaved"``
    (``2i`` with ``2i + 1``), or None."""
    n = len(classes)
    if n % 2:
        return None
    if (classes[: n // 2] == classes[n // 2:]).all():
        return "half"
    if (classes[0::2] == classes[1::2]).all():
        return "interleaved"
    return None


def frequency_slices(dense: torch.fx.GraphModule, analysis: GroupAnalysis, removed: np.ndarray
                     ) -> list[tuple[str, list[int]]] | None:
    """``[(buffer name, kept indices)]``: the frequency buffers the shared rotary tables are computed from, and
    the entries to keep so that the class computes the cut's tables; None where the uses keep different entries,
    or no buffer is found upstream of every table."""
    kept = set(kept_entries(analysis, removed))
    if len(kept) != 1:
        return None
    entries = kept.pop()
    nodes = {n.name: n for n in dense.graph.nodes}
    buffers = {name for name, _ in dense.named_buffers()}
    out: dict[str, list[int]] = {}
    for t in analysis.tables:
        found = False
        size = int(t.labels.shape[1])
        layout = _layout(analysis.label_class[t.labels[0]])
        if layout is None:
            return None
        frontier, seen = [nodes[t.node].args[t.operand]], set()
        for _ in range(SEARCH_DEPTH):
            nxt = []
            for n in frontier:
                if not isinstance(n, torch.fx.Node) or n in seen:
                    continue
                seen.add(n)
                v = n.meta.get("val")
                if n.op == "get_attr" and str(n.target) in buffers and isinstance(v, torch.Tensor) and v.dim() == 1 \
                        and v.is_floating_point():
                    idx = frequency_indices(entries, size, int(v.shape[0]), layout)
                    if idx is not None:
                        out[str(n.target)] = idx
                        found = True
                nxt.extend(n.all_input_nodes)
            frontier = nxt
        if not found:
            return None
    return sorted(out.items())


def slice_frequencies(module: torch.nn.Module, plans: list[tuple[str, list[int]]]) -> list[str]:
    """Keep the planned entries of each frequency buffer of ``module`` (and of the buffers of its module that hold
    the same values); returns the names sliced."""
    done = []
    for name, idx in plans:
        path, _, attr = name.rpartition(".")
        owner = module.get_submodule(path) if path else module
        original = owner._buffers[attr]
        keep = torch.as_tensor(idx, dtype=torch.long, device=original.device)
        for other, t in list(owner._buffers.items()):
            if t is not None and (other == attr or (t.shape == original.shape and torch.equal(t, original))):
                set_tensor(owner, other, t.index_select(0, keep).clone(), t)
                done.append(f"{path}.{other}" if path else other)
    return done
