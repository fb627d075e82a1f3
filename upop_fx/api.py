"""``compress()``: capture → find groups → rank (UPop search or magnitude) → surgery → retrain, with a report.

Example:
    >>> import torch, upop_fx
    >>> model = torch.nn.TransformerEncoder(
    ...     torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False).eval()
    >>> x = torch.randn(4, 10, 32)
    >>> result = upop_fx.compress(model, x, ratio=0.5, search_steps=10, retrain_steps=5)
    >>> result.report.params_after < result.report.params_before
    True
    >>> result.model(torch.randn(3, 7, 32)).shape
    torch.Size([3, 7, 32])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .capture import Captured, capture
from .errors import ConfigError
from .groups import GroupAnalysis
from .passes import FindGroups, Surgery
from .passes.surgery import removed_labels, zeroed_reference
from .report import GroupRow, Report, count_flops, count_params
from .search.magnitude import magnitude_scores
from .search.ranking import select_pruned
from .search.structures import build_entries, group_cost, keep_sets, removed_fraction
from .search.train import batch_loss, cycle_batches

__all__ = ["compress", "retrain", "Result", "METHODS", "build_result"]

log = logging.getLogger(__name__)

METHODS = ("upop", "magnitude")


@dataclass
class Result:
    """What :func:`compress` returns."""

    model: torch.fx.GraphModule  #: the dense, smaller model (runs at any batch size / sequence length)
    report: Report  #: kept/total per group; params and FLOPs before and after
    analysis: GroupAnalysis  #: the dimension groups of the original graph
    keep: dict[int, list[int]]  #: kept channel indices per group id
    dense: torch.fx.GraphModule  #: the captured graph the cut was made from (weights as trained by the search)

    def reference(self) -> torch.fx.GraphModule:
        """``dense`` with every removed channel zeroed where it is produced: what ``model`` equaled at the cut
        (before any retraining)."""
        return zeroed_reference(self.dense, removed_labels(self.analysis, self.keep))


def compress(
    model: torch.nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    method: str = "upop",
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    search_steps: int = 100,
    retrain_steps: int = 100,
    budget: str = "params",
    granularity: str = "upop",
    round_to: int = 1,
    lr: float = 1e-4,
    interval: int = 10,
    seed: int = 0,
    score: str = "gradient",
) -> Result:
    """Remove ``ratio`` of the prunable cost of ``model`` and return a dense, smaller model.

    Args:
        model: any ``nn.Module`` that ``torch.export`` captures (Hugging Face BERT, ViT, CLIP, BLIP, GPT-2, ...).
            It is never modified.
        example_inputs: a tensor, a tuple of positional args, or a dict of keyword args; batch ≥ 2.
        ratio: fraction of the prunable cost to remove, in [0, 1).
        method: ``"upop"`` — the unified progressive search (masks scored by accumulated gradients while the
            weights train); ``"magnitude"`` — one-shot global ranking by mean |weight|.
        data: training batches for the search and the retrain: model inputs shaped like ``example_inputs``
            (distillation from the dense model), or ``(inputs, target)`` pairs when ``loss_fn`` is given.
            Default: the example inputs.
        loss_fn: ``loss_fn(outputs, target) -> scalar``; default: distillation from the dense model.
        search_steps: training steps of the UPop search (ignored by ``"magnitude"``).
        retrain_steps: fine-tuning steps of the dense small model after the cut (0 = none).
        budget: ``"params"`` or ``"flops"`` — the unit of cost.
        granularity: ``"upop"`` (head-dims shared across heads and q/k/v), ``"qk_v"`` or ``"heads"``.
        round_to: keep head dims and MLP widths at multiples of this (the budget is still met).
        lr: AdamW learning rate of the search and the retrain.
        interval: the search re-selects the entries to prune every ``interval`` steps.
        seed: results are deterministic for a seed (and the same data).
        score: how the UPop search ranks entries: ``"gradient"`` — the signed accumulated mask gradient, as in
            the paper; ``"sensitivity"`` — the accumulated ``|∂L/∂mask|``, which prunes entries the loss never
            sees (dead neurons, an unused tower) first. Ignored by ``"magnitude"``.

    Raises:
        ConfigError, InputError, CaptureError, NoPrunableGroupError, SurgeryError — all :class:`UPopError`.
    """
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {METHODS}")
    for name, value in (("round_to", round_to), ("search_steps", search_steps), ("interval", interval)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(retrain_steps, int) or retrain_steps < 0:
        raise ConfigError(f"retrain_steps must be a non-negative integer, got {retrain_steps!r}")
    from .search.upop import SCORES, UPop

    if score not in SCORES:
        raise ConfigError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if method == "upop":

        pruner = UPop(
            model, example_inputs, ratio, total_steps=search_steps, interval=interval, budget=budget,
            granularity=granularity, seed=seed, round_to=round_to, score=score,
        )  # fmt: skip
        run_search(pruner, data, loss_fn, lr)
        result = pruner.finalize()
        teacher = pruner.cap.gm  # the dense original (the search trained a copy)
    else:
        torch.manual_seed(seed)
        result = _magnitude(model, example_inputs, float(ratio), budget, granularity, round_to)
        teacher = result.dense
    if retrain_steps:
        retrain(result.model, teacher, data, loss_fn, retrain_steps, lr, example_inputs)
    log.info(
        "compressed %s: params %d -> %d, FLOPs %d -> %d",
        type(model).__name__, result.report.params_before, result.report.params_after,
        result.report.flops_before, result.report.flops_after,
    )  # fmt: skip
    return result


def run_search(pruner: Any, data: Iterable[Any] | None, loss_fn: Any, lr: float) -> list[float]:
    """The UPop search loop: task loss (or distillation from the dense model) on the masked graph; returns the
    loss of every step."""
    opt = torch.optim.AdamW(list(pruner.parameters()), lr=lr, weight_decay=0.0)
    teacher = pruner.cap.gm if loss_fn is None else None
    example = pruner.cap.kwargs or pruner.cap.args
    bar = tqdm(cycle_batches(data, example, pruner.total_steps), total=pruner.total_steps, desc="upop search", leave=False)
    losses = []
    for batch in bar:
        loss = batch_loss(pruner.model, teacher, batch, loss_fn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pi = pruner.step()
        losses.append(loss.item())
        bar.set_postfix(pi=f"{pi:.3f}", loss=f"{losses[-1]:.4f}")
        if pruner.t % pruner.interval == 0 or pruner.t == pruner.total_steps:
            log.info("search step %d/%d: pi_t=%.4f loss=%.5f", pruner.t, pruner.total_steps, pi, losses[-1])
    return losses


def retrain(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    data: Iterable[Any] | None,
    loss_fn: Any,
    steps: int,
    lr: float,
    example_inputs: Any,
) -> list[float]:
    """Fine-tune the dense small model in place (task loss, or distillation from ``teacher``); the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(cycle_batches(data, example_inputs, steps), total=steps, desc="retrain", leave=False)
    for i, batch in enumerate(bar):
        loss = batch_loss(model, teacher, batch, loss_fn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (i + 1) % max(1, steps // 5) == 0:
            log.info("retrain step %d/%d: loss=%.5f", i + 1, steps, loss.item())
    return losses


def _magnitude(model: torch.nn.Module, example_inputs: Any, ratio: float, budget: str, granularity: str, round_to: int) -> Result:
    cap = capture(model, example_inputs)
    analysis = FindGroups()(cap.gm, cap.batch_size).value
    analysis.require_prunable(type(model).__name__)
    structures, entries = build_entries(analysis, granularity, budget)
    scores = magnitude_scores(cap.gm, analysis, entries)
    pruned = select_pruned(scores, entries, structures, ratio, round_to)
    keep = keep_sets(analysis, entries, pruned)
    small = Surgery()(cap.gm, keep, cap.args, cap.kwargs).gm
    return build_result(
        small, cap.gm, cap, analysis, keep, "magnitude", ratio, budget, granularity, removed_fraction(entries, pruned)
    )


def build_result(
    small: torch.fx.GraphModule,
    dense: torch.fx.GraphModule,
    cap: Captured,
    analysis: GroupAnalysis,
    keep: dict[int, list[int]],
    method: str,
    ratio: float,
    budget: str,
    granularity: str,
    removed_fraction: float,
) -> Result:
    """Assemble the :class:`Result` and its :class:`Report`."""
    report = Report(
        method=method, ratio=float(ratio), budget=budget, granularity=granularity,
        params_before=count_params(cap.gm), params_after=count_params(small),
        flops_before=count_flops(cap.gm, cap.args, cap.kwargs),
        flops_after=count_flops(small, cap.args, cap.kwargs),
        prunable_cost_removed=removed_fraction,
        groups=[
            GroupRow(
                g.id, g.kind, g.tower, g.layer, g.heads, g.head_dim, len(keep[g.id]), g.width, g.cross,
                len({c // g.head_dim for c in keep[g.id]}) if g.heads else None,
                float(group_cost(g, budget)[keep[g.id]].sum()), float(group_cost(g, budget).sum()),
            )
            for g in analysis.prunable
        ],
        not_prunable=[g.describe() for g in analysis.groups if not g.prunable],
    )  # fmt: skip
    log.debug("\n%s", report.table())
    small.eval()  # the captured graph already runs as in inference (dropout fixed); .training now says so
    return Result(small, report, analysis, keep, dense)
