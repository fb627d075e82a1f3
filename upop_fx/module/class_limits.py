"""``own_class=True``: prune only what the model's own class can express, so that ``result.module`` exists.

Some layers compute a size from something no cut can change — Hugging Face's BLIP vision attention reshapes to
``embed_dim // num_heads`` of its *input* width, ``nn.MultiheadAttention`` derives its head size from the model
width, a rotary table is shared by every layer. The graph cuts them exactly; the model's class cannot. Before the
search, :func:`restrict_to_class` makes a trial cut (one entry of every structure), rebuilds the module
(:func:`~upop_fx.module.rebuild.rebuild`) and marks the groups of every module that could not follow as not prunable,
with the reason; it repeats until the trial module is verified, or no failure names a module.

Example:
    >>> import torch, upop_fx
    >>> enc = torch.nn.TransformerEncoder(
    ...     torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False).eval()
    >>> result = upop_fx.compress(enc, torch.randn(2, 5, 16), ratio=0.3, method="magnitude", retrain_steps=0,
    ...                           own_class=True)
    >>> sorted({row.kind for row in result.report.groups}), type(result.module).__name__
    (['mlp'], 'TransformerEncoder')
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..ir.entries import build_entries, keep_sets
from ..ir.groups import DimGroup, GroupAnalysis
from ..passes import Surgery
from ..passes.surgery import removed_labels
from .rebuild import rebuild

__all__ = ["restrict_to_class"]

log = logging.getLogger(__name__)

ROUNDS = 4


def _params(g: DimGroup) -> set[str]:
    return {name for name, _, _ in [*g.producers, *g.consumers]}


def _trial(analysis: GroupAnalysis, granularity: str, budget: str) -> dict[int, list[int]] | None:
    """Keep-sets removing one entry (the last) of every structure that has more than one."""
    structures, entries = build_entries(analysis, granularity, budget)
    pruned = np.zeros(len(entries), dtype=bool)
    for s in range(len(structures)):
        mine = [i for i, e in enumerate(entries) if e.structure == s]
        if len(mine) > 1:
            pruned[mine[-1]] = True
    return keep_sets(analysis, entries, pruned) if pruned.any() else None


def restrict_to_class(model: torch.nn.Module, gm: torch.fx.GraphModule, analysis: GroupAnalysis,
                      granularity: str, budget: str) -> list[int]:
    """Mark the groups that ``model``'s class cannot cut as not prunable (see the module docstring); returns
    their ids. ``gm``: the captured graph that ``analysis`` describes."""
    excluded: list[int] = []
    for _ in range(ROUNDS):
        if not analysis.prunable:
            break
        keep = _trial(analysis, granularity, budget)
        if keep is None:
            break
        small = Surgery(keep)(gm).gm
        back = rebuild(model, gm, small, analysis, removed_labels(analysis, keep), granularity)
        if back.module is not None:
            break
        hit = []
        for g in analysis.prunable:
            rotary = back.problems.rotary and g.kind == "qk" and g.dims is not None
            owned = any(p.startswith(path + ".") for path in back.problems.paths for p in _params(g))
            if rotary or owned:
                hit.append(g)
        if not hit:
            log.info("own_class: the trial cut fails without naming a module (%s); nothing more is excluded",
                     back.reason)
            break
        for g in hit:
            g.prunable = False
            g.reason = f"its module cannot express a cut (own_class=True): {back.reason}"
            excluded.append(g.id)
    if excluded:
        log.info("own_class: %d groups left unpruned so that the model's own class can express the cut",
                 len(excluded))
    return excluded
