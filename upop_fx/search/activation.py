"""The one-shot, data-aware baseline: rank entries by their weights scaled by the activations they meet.

Each weight counts as ``|w| · ‖x‖``, where ``‖x‖`` is the root sum of squares, over the calibration batches, of
the input feature that weight multiplies (Wanda's score, Sun et al. 2023, summed per structured channel). A
channel consumed by columns of a linear map (an MLP neuron by the second layer, a value dim by the output
projection) scores by those columns times its own activation: what it adds to the next layer's output. A
channel consumed by no linear map (a query/key dim, consumed by the attention scores) scores by the rows that
produce it against their input features. An entry's importance is the mean over those weights; parameters that
are not the weight of a linear map (biases, norm scales) do not count. Unlike :mod:`~upop_fx.search.magnitude` it
sees what the model computes on data: a neuron with large weights that is never active scores nothing.

Example:
    >>> import torch, upop_fx
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> data = [torch.randn(4, 5, 16) for _ in range(3)]
    >>> result = upop_fx.compress(layer, data[0], 0.5, "activation", data=data, calibration_batches=3,
    ...                           retrain_steps=0)
    >>> result.report.method, result.report.prunable_cost_removed >= 0.5
    ('activation', True)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..ir.entries import Entry
from ..ir.groups import GroupAnalysis
from ..passes.base import get_tensor
from ..training.loop import Batches, Objective
from ..training.reconstruct import input_norms, stored_transposed
from .magnitude import entry_means
from .strategy import Prepared, Selection, allocation, checked

__all__ = ["Activation", "activation_scores", "calibrated_scores"]


class Activation:
    """One-shot selection by activation-weighted importance (see the module docstring), allocated by
    ``options.allocate``; reads the run's calibration batches (``options.calibration_batches`` of ``data``; the
    example inputs without data)."""

    name = "activation"
    trains = False
    reads_calibration = True  #: the pipeline hands it the calibration batches as ``prepared.calibration``

    def select(self, prepared: Prepared, batches: Batches, objective: Objective | None) -> Selection:
        scores = calibrated_scores(prepared, batches.example)
        fn = allocation(prepared.options)

        def allocate(fraction: float) -> np.ndarray:
            return checked(fn(scores, prepared.entries, prepared.structures, fraction), prepared.entries)

        return Selection(allocate(prepared.target), prepared.captured.gm, reselect=allocate)


def calibrated_scores(prepared: Prepared, example: Any) -> np.ndarray:
    """:func:`activation_scores` of ``prepared``'s entries, the input norms read on its calibration batches
    (``example``, the model inputs of the example, when it has none)."""
    norms = input_norms(prepared.captured.gm, prepared.calibration or [example])
    return activation_scores(prepared.captured.gm, prepared.analysis, prepared.entries, norms)


def _weighted(w: torch.Tensor, norms: torch.Tensor, transposed: bool, axis: int) -> np.ndarray:
    """Per entry along ``axis`` of the weight ``w``: the sum of ``|w| · ‖x‖`` over the other axis."""
    a = w.detach().double().abs()
    a = a.t() if transposed else a  # (out, in)
    scaled = a * norms.to(a.device)[None, :]
    out_axis = 1 if transposed else 0
    return (scaled.sum(1) if axis == out_axis else scaled.sum(0)).cpu().numpy()


def channel_activation(gm: torch.nn.Module, analysis: GroupAnalysis, gid: int,
                       norms: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per channel of group ``gid``: the sum of ``|w| · ‖x‖`` over the linear weights that consume it (those that
    produce it when none consumes it), and their count."""
    g = analysis.groups[gid]
    total, count = np.zeros(g.width), np.zeros(g.width)
    layout = stored_transposed(gm)
    consumers = [u for u in g.consumers if u[0] in norms and u[0] in layout]
    for name, axis, chan in consumers or g.producers:
        if name not in norms or name not in layout:
            continue
        w = get_tensor(gm, name)
        if w.dim() != 2:
            continue
        n = norms[name]
        per_entry = _weighted(w, n, layout[name], axis)
        hit = chan >= 0
        np.add.at(total, chan[hit], per_entry[hit])
        np.add.at(count, chan[hit], w.numel() // w.shape[axis])
    return total, count


def activation_scores(gm: torch.nn.Module, analysis: GroupAnalysis, entries: list[Entry],
                      norms: dict[str, torch.Tensor]) -> np.ndarray:
    """The mean ``|w| · ‖x‖`` per entry (higher = more important; 0 for an entry tied to no linear weight)."""
    return entry_means(entries, lambda gid: channel_activation(gm, analysis, gid, norms))
