"""``compress()``: capture → find groups → rank → surgery → re-capture, with a report.

Example:
    >>> import torch, upop_fx
    >>> model = torch.nn.TransformerEncoder(
    ...     torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False).eval()
    >>> result = upop_fx.compress(model, torch.randn(2, 10, 32), ratio=0.5)
    >>> result.report.params_after < result.report.params_before
    True
    >>> result.model(torch.randn(3, 7, 32)).shape
    torch.Size([3, 7, 32])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .capture import capture
from .errors import ConfigError, NoPrunableGroupError
from .groups import GroupAnalysis
from .passes import FindGroups, Surgery
from .passes.surgery import removed_labels, zeroed_reference
from .report import GroupRow, Report, count_flops, count_params
from .search.magnitude import magnitude_scores
from .search.ranking import select_pruned
from .search.structures import build_entries

__all__ = ["compress", "Result", "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("magnitude",)


@dataclass
class Result:
    """What :func:`compress` returns."""

    model: torch.fx.GraphModule  #: the dense, smaller model (runs at any batch size / sequence length)
    report: Report  #: kept/total per group; params and FLOPs before and after
    analysis: GroupAnalysis  #: the dimension groups of the original graph
    keep: dict[int, list[int]]  #: kept channel indices per group id
    dense: torch.fx.GraphModule  #: the captured original graph (a copy; the caller's model is untouched)

    def reference(self) -> torch.fx.GraphModule:
        """The original graph with every removed channel zeroed where it is produced: what ``model`` equals."""
        return zeroed_reference(self.dense, removed_labels(self.analysis, self.keep))


def compress(
    model: torch.nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    method: str = "magnitude",
    *,
    budget: str = "params",
    granularity: str = "upop",
    round_to: int = 1,
) -> Result:
    """Remove ``ratio`` of the prunable cost of ``model`` and return a dense, smaller model.

    Args:
        model: any ``nn.Module`` that ``torch.export`` captures (Hugging Face BERT, ViT, CLIP, BLIP, GPT-2, ...).
            It is never modified.
        example_inputs: a tensor, a tuple of positional args, or a dict of keyword args; batch ≥ 2.
        ratio: fraction of the prunable cost to remove, in [0, 1).
        method: ``"magnitude"`` — one-shot global ranking by mean |weight| under the exact cost budget.
        budget: ``"params"`` or ``"flops"`` — the unit of cost.
        granularity: ``"upop"`` (head-dims shared across heads and q/k/v), ``"qk_v"`` or ``"heads"``.
        round_to: keep head dims and MLP widths at multiples of this (matrix units waste odd widths); the
            budget is still met. With ``granularity="heads"`` it rounds the number of kept heads.

    Raises:
        ConfigError, InputError, CaptureError, NoPrunableGroupError, SurgeryError — all :class:`UPopError`.
    """
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to must be a positive integer, got {round_to!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {METHODS}")
    cap = capture(model, example_inputs)
    analysis = FindGroups()(cap.gm, cap.batch_size).value
    if not analysis.prunable:
        reasons = sorted({g.reason for g in analysis.groups if g.reason})[:5]
        raise NoPrunableGroupError(
            f"{type(model).__name__} has no prunable group of channels; reasons: " + "; ".join(reasons or ["none found"])
        )
    structures, entries = build_entries(analysis, granularity, budget)
    scores = magnitude_scores(cap.gm, analysis, entries)
    pruned = select_pruned(scores, entries, structures, float(ratio), round_to)
    keep = {g.id: np.ones(g.width, dtype=bool) for g in analysis.prunable}
    for e, p in zip(entries, pruned):
        if p:
            for gid, ch in e.channels.items():
                keep[gid][ch] = False
    keep_idx = {gid: np.nonzero(k)[0].tolist() for gid, k in keep.items()}
    result_model = Surgery()(cap.gm, keep_idx, cap.args, cap.kwargs).gm
    total = sum(e.cost for e in entries)
    removed = sum(e.cost for e, p in zip(entries, pruned) if p)
    report = Report(
        method=method, ratio=float(ratio), budget=budget, granularity=granularity,
        params_before=count_params(cap.gm), params_after=count_params(result_model),
        flops_before=count_flops(cap.gm, cap.args, cap.kwargs),
        flops_after=count_flops(result_model, cap.args, cap.kwargs),
        prunable_cost_removed=removed / total if total else 0.0,
        groups=[
            GroupRow(
                g.id, g.kind, g.tower, g.layer, g.heads, g.head_dim, len(keep_idx[g.id]), g.width, g.cross,
                len({c // g.head_dim for c in keep_idx[g.id]}) if g.heads else None,
            )
            for g in analysis.prunable
        ],
        not_prunable=[g.describe() for g in analysis.groups if not g.prunable],
    )  # fmt: skip
    log.info(
        "compressed %s: params %d -> %d, FLOPs %d -> %d",
        type(model).__name__, report.params_before, report.params_after, report.flops_before, report.flops_after,
    )  # fmt: skip
    log.debug("\n%s", report.table())
    return Result(result_model, report, analysis, keep_idx, cap.gm)
