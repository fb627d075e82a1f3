"""The pipeline, once: capture → find groups → selection (a strategy) → surgery → report (→ retrain).

Every method runs through here: ``compress`` (UPop's search or magnitude), ``UPop(...)``'s hand-driven loop
(:func:`prepare`, then :func:`cut`), and any :class:`~upop_fx.search.strategy.Strategy` of your own
(:func:`run`). The caller's model and global RNG state are left as they were: the run works on a copy, under
:func:`torch.random.fork_rng`, seeded with ``seed``.

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.search.magnitude import Magnitude
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> result = upop_fx.pipeline.run(layer, torch.randn(2, 5, 16), Magnitude(allocate="uniform"), ratio=0.5)
    >>> [row.kept for row in result.report.groups]
    [8, 8, 16]
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .capture import cache_off, capture, get_capture
from .compare import relative_error
from .errors import ConfigError, InputError, SurgeryCheckError
from .groups import GroupAnalysis
from .latency import calibrated_cut, check_latency_shape, check_runtime, measure_latency, use_latency
from .passes import FindGroups, SortExperts, Surgery
from .passes.surgery import removed_labels, zeroed_reference
from .rebuild import copy_weights, module_gap, rebuild
from .report import GroupRow, Report, count_flops, count_params
from .restrict import restrict_to_class
from .search import distributed
from .search.checkpoint import Checkpointer
from .search.strategy import Prepared, Selection, Strategy
from .search.train import PRECISIONS, Batches, Training, has_task_loss, make_objective, retrain
from .structures import (
    BUDGETS,
    GRANULARITIES,
    build_entries,
    check_choice,
    check_int,
    group_cost,
    keep_sets,
    removed_fraction,
    resolve_granularity,
)

__all__ = ["Result", "prepare", "cut", "run", "check_options", "seeded", "fingerprint"]

log = logging.getLogger(__name__)


@dataclass
class Result:
    """What :func:`upop_fx.compress` returns."""

    model: torch.fx.GraphModule  #: the dense, smaller model (runs at any batch size / sequence length)
    report: Report  #: kept/total per group; params and FLOPs before and after
    analysis: GroupAnalysis  #: the dimension groups of the original graph
    keep: dict[int, list[int]]  #: kept channel indices per group id
    dense: torch.fx.GraphModule  #: the captured graph the cut was made from (weights as trained by the search)
    losses: dict[str, list[float]] = field(default_factory=dict)  #: per phase ("search", "retrain"): step losses
    #: the caller's model, of its own class, cut like ``model`` and verified equal to it (None when the cut
    #: cannot be expressed by the model's class: ``report.module_reason`` says why)
    module: torch.nn.Module | None = None

    def reference(self) -> torch.fx.GraphModule:
        """``dense`` with every removed channel zeroed where it is produced: what ``model`` equaled at the cut
        (before any retraining)."""
        return zeroed_reference(self.dense, removed_labels(self.analysis, self.keep))


def check_options(ratio: Any, budget: Any, granularity: Any, round_to: Any, seed: Any, runtime: Any = None,
                  latency_shape: Any = None) -> None:
    """Raise :class:`~upop_fx.errors.ConfigError` for an option out of range — before anything slow runs."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(f"ratio must be a number in [0, 1), got {ratio!r}")
    check_choice("budget", budget, BUDGETS)
    if budget == "latency":
        check_runtime(runtime or "onnxruntime-cpu")
        check_latency_shape(latency_shape)
    elif runtime is not None or latency_shape is not None:
        raise ConfigError(f"runtime= and latency_shape= belong to budget='latency' (got budget={budget!r})")
    if granularity is not None:  # None: resolve_granularity's default for the budget
        check_choice("granularity", granularity, GRANULARITIES)
    check_int("round_to", round_to, 1)
    check_int("seed", seed)


@contextlib.contextmanager
def seeded(seed: int, model: torch.nn.Module | None = None) -> Iterator[None]:
    """Run the block with the global RNG seeded by ``seed``, and restore the caller's RNG state afterwards
    (CPU, and the CUDA devices ``model`` lives on)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else []
    devices = sorted({p.device.index or 0 for p in params if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def prepare(
    model: torch.nn.Module, example_inputs: Any, ratio: float = 0.5, budget: str = "params",
    granularity: str | None = None, round_to: int = 1, own_class: bool = False, runtime: str | None = None,
    latency_shape: tuple[int, int | None] | None = None,
) -> Prepared:  # fmt: skip
    """Capture ``model``, find its groups (raising when none is prunable) and list the ranking's entries.
    ``own_class``: leave unpruned the groups that the model's own class cannot express
    (:func:`~upop_fx.restrict.restrict_to_class`). ``budget="latency"``: measure the latency tables of the
    structures on ``runtime`` at ``latency_shape`` (:mod:`upop_fx.latency`)."""
    check_options(ratio, budget, granularity, round_to, 0, runtime, latency_shape)
    granularity = resolve_granularity(granularity, budget)
    if not isinstance(own_class, bool):
        raise ConfigError(f"own_class must be True or False, got {own_class!r}")
    cap = capture(model, example_inputs)
    if distributed.active():  # every rank must start from the same dense model
        distributed.check_same(_weights_checksum(cap.gm), "the dense model's weights (build or load it alike on every rank)")
    analysis = FindGroups()(cap.gm).value
    SortExperts()(cap.gm)  # stacked MoE experts: neuron j of the layer is each expert's j-th strongest
    if own_class and analysis.prunable:
        restrict_to_class(model, cap.gm, analysis, granularity, budget)
    analysis.require_prunable(type(model).__name__)
    structures, entries = build_entries(analysis, granularity, budget)
    prepared = Prepared(cap, analysis, structures, entries, float(ratio), budget, granularity, round_to, source=model)
    if budget == "latency":
        runtime = runtime or "onnxruntime-cpu"
        with torch.random.fork_rng():
            latency = measure_latency(cap.gm, analysis, structures, entries, cap.info, runtime, latency_shape)
        use_latency(prepared, latency)
    return prepared


def _cut_graph(prepared: Prepared, pruned: np.ndarray, dense: torch.fx.GraphModule) -> torch.fx.GraphModule:
    surgery = Surgery(keep_sets(prepared.analysis, prepared.entries, pruned))(dense)
    # nothing removed: Surgery returns its input; the result is still a model of its own
    return surgery.gm if surgery.modified else copy.deepcopy(dense)


def cut(prepared: Prepared, selection: Selection, method: str) -> Result:
    """Remove the selected entries from ``selection.dense`` (Surgery checks itself against the zeroed
    reference), check the cut against ``selection.final`` when there is one, and write the report.
    ``budget="latency"``: the cut is timed on the runtime; while its measured speedup falls short of the asked one
    or passes it by more than 8% (:data:`~upop_fx.latency.SHORT`, :data:`~upop_fx.latency.OVER`), the strategy
    re-selects with the miss folded into its target (up to :data:`~upop_fx.latency.CALIBRATIONS` times; each
    round is in ``report.latency["rounds"]``, the kept one in ``report.latency["kept_round"]``: the slowest that
    reaches the ask)."""
    pruned = np.asarray(selection.pruned, dtype=bool)
    small = _cut_graph(prepared, pruned, selection.dense)
    row = None
    if prepared.latency is not None:
        pruned, small, row = calibrated_cut(prepared, selection, pruned, small, _cut_graph)
    keep = keep_sets(prepared.analysis, prepared.entries, pruned)
    info = prepared.captured.info
    if selection.final is not None and np.array_equal(pruned, selection.pruned):
        with torch.no_grad():
            gap = relative_error(small(*info.args, **info.kwargs), selection.final(*info.args, **info.kwargs))
        log.info("cut vs the final masked model: relative error %.2e", gap)
        if not gap <= 1e-4:
            raise SurgeryCheckError(f"the reduced model differs from the final masked model (relative error {gap:.3g})")
    fraction = removed_fraction(prepared.entries, pruned, prepared.structures)
    result = Result(small, _report(prepared, small, keep, method, fraction), prepared.analysis, keep, selection.dense)
    if row is not None:
        result.report.latency = row
        result.report.prunable_cost_removed = 1 - row["predicted_ms"] / prepared.latency.dense_ms
    result.losses["search"] = list(selection.losses)
    small.eval()  # the captured graph already runs as in inference (dropout fixed); .training now says so
    if prepared.source is not None:
        removed = removed_labels(prepared.analysis, keep)
        back = rebuild(prepared.source, selection.dense, small, prepared.analysis, removed, prepared.granularity)
        result.module, result.report.module_reason = back.module, back.reason
        if back.module is None:
            log.info("no module of %s's class for this cut (result.model is the graph): %s",
                     type(prepared.source).__name__, back.reason)
    return result


def run(
    model: torch.nn.Module,
    example_inputs: Any,
    strategy: Strategy,
    *,
    ratio: float = 0.5,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    search_steps: int = 0,
    retrain_steps: int = 0,
    lr: float = 1e-4,
    budget: str = "params",
    granularity: str | None = None,
    round_to: int = 1,
    seed: int = 0,
    precision: str = "fp32",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    own_class: bool = False,
    runtime: str | None = None,
    latency_shape: tuple[int, int | None] | None = None,
) -> Result:
    """The whole pipeline with ``strategy`` as the selection: see :func:`upop_fx.compress` for the arguments.
    ``search_steps`` is how many batches the strategy reads (checked against ``data`` before training)."""
    check_options(ratio, budget, granularity, round_to, seed, runtime, latency_shape)
    granularity = resolve_granularity(granularity, budget)
    check_int("retrain_steps", retrain_steps, 0)
    check_choice("precision", precision, PRECISIONS)
    check_int("checkpoint_every", checkpoint_every, 1)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable, not {type(loss_fn).__name__}")
    if data is not None and not isinstance(data, Iterable):
        raise InputError(f"data must be an iterable of batches, not {type(data).__name__}")
    with distributed.quiet_ranks(), seeded(seed, model):
        prepared = prepare(model, example_inputs, ratio, budget, granularity, round_to, own_class, runtime,
                           latency_shape)
        settings = {
            "strategy": strategy.name, "strategy_config": getattr(strategy, "config", dict)(), "ratio": ratio,
            "budget": budget, "granularity": granularity, "round_to": round_to, "seed": seed,
            "search_steps": search_steps, "retrain_steps": retrain_steps, "lr": lr, "precision": precision,
            "loss": "loss_fn" if loss_fn is not None else "default", "own_class": own_class,
            "runtime": runtime, "latency_shape": latency_shape,
        }  # fmt: skip
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = Checkpointer(checkpoint_dir, checkpoint_every, fingerprint(prepared.captured.gm, settings))
        prepared.training = Training(precision, checkpoint)
        teacher = prepared.captured.gm
        info = prepared.captured.info
        example = info.kwargs or info.args
        task = loss_fn is None and has_task_loss(teacher, info.kwargs)
        if task:
            log.info("training on the model's own loss (the inputs carry labels)")
        objective = make_objective(loss_fn, teacher, task)
        batches = Batches(data, example)
        batches.require(search_steps + retrain_steps)
        result = cut(prepared, strategy.select(prepared, batches, objective), strategy.name)
        if retrain_steps:  # retrain() checks that the data holds its steps
            result.losses["retrain"] = _retrain(result, teacher, batches, loss_fn, retrain_steps, lr, example,
                                                prepared.training)
        log.info(
            "compressed %s with %s: params %d -> %d, FLOPs %d -> %d",
            type(model).__name__, strategy.name, result.report.params_before, result.report.params_after,
            result.report.flops_before, result.report.flops_after,
        )  # fmt: skip
    return result


def _retrain(result: Result, teacher: torch.nn.Module, batches: Batches, loss_fn: Any, steps: int, lr: float,
             example: Any, training: Training | None) -> list[float]:
    """Fine-tune the cut model: ``result.module`` in train mode (dropout as the model defines it) when there is
    one, its weights then copied into the graph ``result.model`` (checked equal); else the graph."""
    module = result.module
    if module is None:
        return retrain(result.model, teacher, batches, loss_fn, steps, lr, example, training=training)
    module.train()
    try:
        with cache_off(module):
            losses = retrain(module, teacher, batches, loss_fn, steps, lr, example, training=training)
    finally:
        module.eval()
    copy_weights(module, result.model, sliced_ok=False)  # tensors the graph lacks are unused by the forward
    gap = module_gap(module, result.model)
    if not gap <= 1e-4:
        raise SurgeryCheckError(f"after the retrain the graph and the module differ (relative error {gap:.3g})")
    return losses


def fingerprint(gm: torch.fx.GraphModule, settings: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run for its checkpoints: the captured graph's code, a hash of its weights and of the
    example inputs, the settings and the number of ranks."""
    info = get_capture(gm)
    leaves = [t for t in torch.utils._pytree.tree_leaves((info.args, info.kwargs)) if isinstance(t, torch.Tensor)]
    return {
        "model": info.model_name,
        "graph": hashlib.sha256(gm.code.encode()).hexdigest()[:16],
        "weights": f"{_weights_checksum(gm):.0f}",
        "example_inputs": f"{distributed.checksum(leaves):.0f}",
        "settings": json.loads(json.dumps(settings, default=str)),
        "ranks": distributed.world_size(),
    }


def _weights_checksum(gm: torch.nn.Module) -> float:
    return distributed.checksum([t for _, t in sorted(gm.state_dict().items())])


def _report(prepared: Prepared, small: torch.fx.GraphModule, keep: dict[int, list[int]], method: str,
            fraction: float) -> Report:
    cap, analysis, budget = prepared.captured, prepared.analysis, prepared.budget
    report = Report(
        method=method, ratio=prepared.ratio, budget=budget, granularity=prepared.granularity,
        params_before=count_params(cap.gm), params_after=count_params(small),
        flops_before=count_flops(cap.gm, cap.args, cap.kwargs),
        flops_after=count_flops(small, cap.args, cap.kwargs),
        prunable_cost_removed=fraction,
        groups=[  # sizes in positions (a rotary pair counts two)
            GroupRow(
                g.id, g.kind, g.tower, g.layer, g.heads, g.head_positions,
                g.kept_positions(keep[g.id]), g.kept_positions(list(range(g.width))), g.cross,
                len({c // g.head_dim for c in keep[g.id]}) if g.heads else None,
                float(group_cost(g, budget)[keep[g.id]].sum()), float(group_cost(g, budget).sum()),
            )
            for g in analysis.prunable
        ],
        not_prunable=[g.describe() for g in analysis.groups if not g.prunable],
    )  # fmt: skip
    log.debug("\n%s", report.table())
    return report

