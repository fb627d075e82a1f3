"""The pipeline, once: capture → find groups → selection (a strategy) → surgery → report (→ retrain).

Every method runs through here: ``compress`` (UPop's search or magnitude), ``UPop(...)``'s hand-driven loop
(:func:`prepare`, then :func:`finish`), and any :class:`~upop_fx.search.strategy.Strategy` of your own
(:func:`run`). The run's settings are one :class:`~upop_fx.options.Options`, checked before anything slow. The
caller's model and global RNG state are left as they were: the run works on a copy, under
:func:`torch.random.fork_rng`, seeded with ``options.seed``.

Example:
    >>> import torch, upop_fx
    >>> from upop_fx.search.magnitude import Magnitude
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> result = upop_fx.pipeline.run(layer, torch.randn(2, 5, 16), Magnitude(), ratio=0.5, allocate="uniform",
    ...                               retrain_steps=0)
    >>> [row.kept for row in result.report.groups]  # nn.MultiheadAttention cannot hold fewer heads: the MLP
    [16]
    >>> graph_only = upop_fx.pipeline.run(layer, torch.randn(2, 5, 16), Magnitude(), ratio=0.5, allocate="uniform",
    ...                                   retrain_steps=0, own_class=False)
    >>> [row.kept for row in graph_only.report.groups], graph_only.module
    ([8, 8, 16], None)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .calibration import calibrated_cut, measured_generation
from .capture.program import cache_off, capture, get_capture, guard_fixed_sizes
from .compare import agrees, relative_error
from .errors import ConfigError, InputError, NoPrunableGroupError, SurgeryCheckError, UnreachableRatioError
from .ir.entries import build_entries, group_cost, keep_sets, removed_fraction
from .ir.groups import GroupAnalysis
from .ir.latency_model import LatencyModel, priced
from .logs import phase, quiet, verbosity
from .module.class_limits import restrict_to_class
from .module.rebuild import Rebuilt, copy_weights, module_gap, module_tensors, rebuild
from .options import Options
from .passes import FindGroups, SortExperts
from .passes.surgery import cut_entries, removed_labels, zeroed_reference
from .report import GroupRow, Report, count_flops, count_params
from .runtime.latency_tables import measure_latency
from .search.activation import Activation
from .search.magnitude import Magnitude
from .search.strategy import Prepared, Selection, Strategy
from .search.upop import UPopSearch
from .training import distributed
from .training.checkpoint import Checkpointer
from .training.layerwise import LayerwiseDistillation
from .training.loop import Batches, Training, has_task_loss, make_objective, retrain
from .training.reconstruct import every_fourth, reconstruct

__all__ = ["Result", "prepare", "finish", "run", "fit_and_check", "retrain_result", "strategy_for", "seeded", "run_fingerprint"]

log = logging.getLogger(__name__)

#: how far the cut may differ from the final masked model in float32 before both are rerun in float64
MASKED_RTOL = 1e-4


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
        """``dense`` with every removed channel zeroed where it is produced and consumed: what ``model`` equaled at the cut
        (before any reconstruction or retraining)."""
        return zeroed_reference(self.dense, removed_labels(self.analysis, self.keep))


@contextlib.contextmanager
def seeded(seed: int, model: torch.nn.Module | None = None) -> Iterator[None]:
    """Run the block with the global RNG seeded by ``seed``, and restore the caller's RNG state afterwards
    (CPU, and the CUDA devices ``model`` lives on)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else []
    devices = sorted({p.device.index or 0 for p in params if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def strategy_for(options: Options) -> Strategy:
    """The strategy ``options.method`` names."""
    return {"upop": UPopSearch, "magnitude": Magnitude, "activation": Activation}[options.method]()


def prepare(model: torch.nn.Module, example_inputs: Any, options: Options | None = None, **changes: Any) -> Prepared:
    """Capture ``model``, find its groups (raising when none is prunable) and list the ranking's entries, once.
    ``options`` (with ``changes``): ``own_class`` (the default) restricts the groups to what the model's own class
    can express — whole heads, or left whole (:func:`~upop_fx.module.class_limits.restrict_to_class`); ``budget="latency"`` measures the latency
    tables of the structures on ``runtime`` at ``options.timed_shape`` (``latency_shape``, or one token per
    sequence with ``latency_phase="decode"``; :mod:`upop_fx.runtime.latency_tables`) and prices the entries by
    them."""
    options = Options.make(options, **changes)
    granularity = options.resolved_granularity
    seconds: dict[str, float] = {}
    with phase(seconds, "capture"):
        cap = capture(model, example_inputs)
    if distributed.active():  # every rank must start from the same dense model
        distributed.check_same(_weights_checksum(cap.gm), "the dense model's weights (build or load it alike on every rank)")
    with phase(seconds, "groups"):
        analysis = FindGroups()(cap.gm).value
        SortExperts()(cap.gm)  # stacked MoE experts: neuron j of the layer is each expert's j-th strongest
        limits: list[str] = []
        graph_only = len(analysis.prunable)
        if options.own_class and analysis.prunable and _has_own_class(model):
            # uniform widths are for a stock checkpoint: its config states head counts, not sliced rotary frequencies
            limits = restrict_to_class(model, cap.gm, analysis, granularity, options.budget,
                                       share_rotary=options.shared_rotary and options.allocate != "uniform")
    if graph_only and not analysis.prunable:
        raise NoPrunableGroupError(
            f"{type(model).__name__}'s own class can express no cut of its {graph_only} prunable groups "
            f"({'; '.join(limits[:2])}); own_class=False cuts the graph alone (result.model, no module)")
    analysis.require_prunable(type(model).__name__)
    structures, entries = build_entries(analysis, granularity, options.budget)
    latency = None
    if options.budget == "latency":
        runtime = options.resolved_runtime
        def measure() -> LatencyModel:
            with torch.random.fork_rng():
                return measure_latency(cap.gm, analysis, structures, entries, cap.info, runtime, options.timed_shape)

        with phase(seconds, "latency tables"):
            latency = distributed.on_main(measure)  # one set of tables for all ranks: each rank's own would differ
        structures, entries = priced(latency, structures, entries)
        _check_reachable(options.ratio, latency)
    return Prepared(cap, analysis, structures, entries, options, source=model, latency=latency, class_limits=limits,
                    seconds=seconds)


def _has_own_class(model: Any) -> bool:
    """A model whose class a cut can be given back in: an ``nn.Module`` that is not itself a graph."""
    return isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule)


def _check_reachable(ratio: float, latency: LatencyModel) -> None:
    """A latency ratio beyond what the prunable structures can save is refused, with both numbers."""
    most = latency.most_saved()
    batch, seq = latency.shape
    log.info("latency on %s at batch %d%s: dense %.2f ms; the most pruning can save: %.0f%%", latency.runtime,
             batch, f", seq {seq}" if seq else " (the inputs' own length)", latency.dense_ms, 100 * most)
    if ratio > most:
        raise UnreachableRatioError(
            f"ratio={ratio} asks to remove {100 * ratio:.0f}% of the measured latency "
            f"({latency.dense_ms:.2f} ms on {latency.runtime}), but the prunable structures account for at most "
            f"{100 * most:.0f}% (the rest — embeddings, norms, the head, overheads — does not shrink); ask for less "
            "(the tables are cached: a second call measures only the dense model)", ratio, most
        )


def finish(prepared: Prepared, selection: Selection, method: str, calibration: Iterable[Any] | None = None) -> Result:
    """Cut the selected entries out of ``selection.dense`` (Surgery checks itself against the zeroed
    reference), check the cut against ``selection.final`` when there is one, re-fit the cut layers to the dense
    model on ``calibration`` (model inputs; None: no reconstruction, see
    :func:`~upop_fx.training.reconstruct.reconstruct`), write the report and give the caller's class back. ``budget="latency"``: the cut is timed on the runtime and re-selected while it measures
    off the asked speedup (:func:`~upop_fx.calibration.calibrated_cut`; each round is in
    ``report.latency["rounds"]``, the kept one in ``report.latency["kept_round"]``)."""
    seconds = dict(prepared.seconds)  # this cut's: the report's, from capture to the rebuild
    pruned = np.asarray(selection.pruned, dtype=bool)
    with phase(seconds, "cut"):
        small = cut_entries(selection.dense, prepared.analysis, prepared.entries, pruned)
    row = None
    if prepared.latency is not None:
        with phase(seconds, "latency calibration"):
            pruned, small, row = calibrated_cut(
                prepared, selection, pruned, small,
                lambda p, g: _module_back(prepared, selection, copy.deepcopy(g), p).module)  # g itself stays unfolded
    # ranks that would cut differently fail here, whatever chose the cut (a strategy, your own loop, a latency
    # budget's re-selection), not later as different models
    distributed.check_same(distributed.checksum([pruned]), "the entries to prune")
    keep = keep_sets(prepared.analysis, prepared.entries, pruned)
    info = prepared.captured.info
    if selection.final is not None and np.array_equal(pruned, selection.pruned):
        with torch.no_grad():
            gap = relative_error(small(*info.args, **info.kwargs), selection.final(*info.args, **info.kwargs))
        log.info("cut vs the final masked model: relative error %.2e", gap)
        ok, gap64 = agrees(gap, MASKED_RTOL, small, selection.final, info.args, info.kwargs)
        if gap64 is not None:
            log.info("cut vs the final masked model: relative error %.2e in float64", gap64)
        if not ok:
            in64 = f", {gap64:.3g} in float64" if gap64 is not None else ""
            raise SurgeryCheckError(
                f"the reduced model differs from the final masked model (relative error {gap:.3g}{in64})")
    fraction = removed_fraction(prepared.entries, pruned, prepared.structures)
    with phase(seconds, "report"):
        report = _report(prepared, small, keep, method, fraction)
    report.seconds = seconds  # the phases after this one (the rebuild, a retrain) are added to it
    result = Result(small, report, prepared.analysis, keep, selection.dense)
    if calibration is not None:
        with phase(seconds, "reconstruction"):
            fits = reconstruct(prepared.captured.gm, small, calibration)
        result.report.reconstruction = [f.to_dict() for f in fits]
        if fits:
            log.info("reconstruction: %d layers re-fitted to the dense model, mean relative error %.4f -> %.4f",
                     len(fits), np.mean([f.before for f in fits]), np.mean([f.after for f in fits]))
    if row is not None:
        result.report.latency = row
        result.report.prunable_cost_removed = 1 - row["predicted_ms"] / prepared.latency.dense_ms
    result.losses["search"] = list(selection.losses)
    result.report.runs_only_at = [f.describe() for f in info.fixed]
    guard_fixed_sizes(small, info.fixed + info.static)  # another size: an InputError naming the fixed one, not torch's guard
    small.eval()  # the captured graph already runs as in inference (dropout fixed); .training now says so
    if prepared.source is not None:
        with phase(seconds, "rebuild"):
            back = _module_back(prepared, selection, small, pruned)
        result.module, result.report.module_reason = back.module, back.reason
        if back.module is None and not prepared.options.own_class:
            result.report.module_reason += " — own_class=True (the default) cuts only what the class can express"
        if back.module is None:
            log.info("no module of %s's class for this cut (result.model is the graph): %s",
                     type(prepared.source).__name__, back.reason)
        if row is not None and back.module is not None and "generate" not in row:  # else timed by the calibration
            with phase(seconds, "generate"):
                generation = distributed.on_main(lambda: measured_generation(prepared, back.module))
            if generation is not None:
                row["generate"] = generation
    return result


def _module_back(prepared: Prepared, selection: Selection, small: torch.fx.GraphModule, pruned: np.ndarray) -> Rebuilt:
    """The caller's model cut as ``small`` (``pruned`` of ``prepared.entries``), verified
    (:func:`~upop_fx.module.rebuild.rebuild`; with ``own_class``, the attention scales are folded into ``small``
    in place)."""
    removed = removed_labels(prepared.analysis, keep_sets(prepared.analysis, prepared.entries, pruned))
    return rebuild(prepared.source, selection.dense, small, prepared.analysis, removed, prepared.granularity,
                   fold=prepared.options.own_class)  # own_class=False: the graph keeps the original's weights


def run(
    model: torch.nn.Module,
    example_inputs: Any,
    strategy: Strategy | None = None,
    options: Options | None = None,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    **changes: Any,
) -> Result:
    """The whole pipeline with ``strategy`` as the selection (None: the one ``options.method`` names): see
    :func:`upop_fx.compress` for ``data`` and ``loss_fn``, and :class:`~upop_fx.options.Options` for the options
    (``options`` with ``changes``). A strategy with ``trains = True`` reads ``options.search_steps`` batches
    (checked against ``data`` before training)."""
    options = Options.make(options, **changes)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable, not {type(loss_fn).__name__}")
    if data is not None and not isinstance(data, Iterable):
        raise InputError(f"data must be an iterable of batches, not {type(data).__name__}")
    strategy = strategy if strategy is not None else strategy_for(options)
    search_steps = options.search_steps if getattr(strategy, "trains", False) else 0
    distributed.init_from_environment()  # under torchrun without a process group: one search, not one per rank
    with quiet(), verbosity(options.verbose), distributed.quiet_ranks(), seeded(options.seed, model):
        prepared = prepare(model, example_inputs, options)
        checkpoint = None
        if options.checkpoint_dir is not None:
            settings = {"strategy": strategy.name, "strategy_config": getattr(strategy, "config", dict)(),
                        "options": options.record(), "loss": "loss_fn" if loss_fn is not None else "default"}
            checkpoint = Checkpointer(options.checkpoint_dir, options.checkpoint_every,
                                      run_fingerprint(prepared.captured.gm, settings))
        prepared.training = Training(options.precision, checkpoint)
        teacher = prepared.captured.gm
        info = prepared.captured.info
        example = info.kwargs or info.args
        task = loss_fn is None and has_task_loss(teacher, info.kwargs)
        if task:
            log.info("training on the model's own loss (the inputs carry labels)%s",
                     f", beside distillation (weight {options.task_loss_weight:g})" if options.task_loss_weight > 0
                     else "")
        objective = make_objective(loss_fn, teacher, task, options.task_loss_weight)
        batches = Batches(data, example)
        calibration = options.calibration_batches if data is not None else 0
        batches.require(search_steps + calibration + options.retrain_steps)
        def take_calibration() -> tuple[list[Any], list[Any]]:  # the batches, and their model inputs
            held = list(batches.take(calibration))
            return held, [b[0] if loss_fn is not None else b for b in held]

        # a one-shot strategy that ranks on them, or a search whose first marking does
        early = getattr(strategy, "reads_calibration", False) or (search_steps > 0 and options.first_marking == "activation")
        held, inputs = take_calibration() if early else ([], [])
        prepared.calibration = inputs or None
        with phase(prepared.seconds, "selection"):
            selection = strategy.select(prepared, batches, objective)
        if not early:  # read after the search: the batches that follow it in a stream
            held, inputs = take_calibration()  # the reconstruction's, and the retrain's check batches
        fit, check = fit_and_check(held, inputs, options.reconstruct and options.retrain_steps > 0)
        result = finish(prepared, selection, strategy.name, fit if options.reconstruct and fit else None)
        if options.retrain_steps:  # retrain() checks that the data holds its steps
            with phase(result.report.seconds, "retrain"):
                result.losses["retrain"] = retrain_result(result, teacher, batches, loss_fn, options.retrain_steps,
                                                          options.lr, example, prepared.training, check=check or None,
                                                          layer_distillation=options.layer_distillation,
                                                          schedule=options.retrain_schedule,
                                                          score=options.retrain_score,
                                                          task_weight=options.task_loss_weight)
        log.info(
            "compressed %s with %s: params %d -> %d, FLOPs %d -> %d",
            type(model).__name__, strategy.name, result.report.params_before, result.report.params_after,
            result.report.flops_before, result.report.flops_after,
        )  # fmt: skip
    return result


def fit_and_check(held: list[Any], inputs: list[Any], split: bool) -> tuple[list[Any], list[Any]]:
    """The calibration batches' model inputs that reconstruction fits on, and the batches the retrain's guard
    measures on. ``split`` (both run): every fourth batch goes to the guard alone — measured on the batches the
    cut was fitted to, the cut would look better than it is and a retrain that helps would be thrown away; with
    a single batch, both use it. Otherwise every batch serves the one that runs."""
    checked = sorted(every_fourth(len(held))) if split else []
    if not checked:
        return inputs, held
    return [x for i, x in enumerate(inputs) if i not in checked], [held[i] for i in checked]


def retrain_result(result: Result, teacher: torch.nn.Module | None, batches: Any, loss_fn: Any, steps: int,
                   lr: float, example: Any, training: Training | None = None, check: list[Any] | None = None,
                   layer_distillation: float | None = None, schedule: str | None = None,
                   score: Callable[[torch.nn.Module], float] | None = None,
                   task_weight: float = 0.0) -> list[float]:  # fmt: skip
    """Fine-tune the cut model for ``steps`` (:func:`~upop_fx.training.loop.retrain`): ``result.module`` when there
    is one, its weights then copied into the graph ``result.model`` (checked equal); else the graph. The module
    trains in train mode (dropout as the model defines it) on a task loss, and in eval mode when it distils: the
    teacher runs without dropout, and what is matched is its deterministic output, not a noisy copy of it. Returns the losses. ``check``: batches on which the loss is
    measured along the way; the weights where it was lowest are kept, the measurements are in
    ``result.report.retrain_check``. ``layer_distillation`` (None: the option's default; > 0, when it distils from
    a captured ``teacher``): the graph trains on :class:`~upop_fx.training.layerwise.LayerwiseDistillation` with that weight — its
    residual stream is tapped — and the module, which computes what the graph computes in eval mode, receives
    its weights. ``schedule``: the learning rate's (None: ``Options.retrain_schedule``'s default). ``score``:
    what the guard follows instead of the check loss (``Options.retrain_score``), given ``result.module`` where
    there is one (the graph's weights copied in first when the graph trains), else the graph. ``task_weight``:
    with labels, > 0 distils and adds that weight times the model's own loss (``Options.task_loss_weight``)."""
    module = result.module
    history: list[tuple[int, float]] = []
    result.report.retrain_scored = score is not None
    if layer_distillation is None:
        layer_distillation = Options().layer_distillation
    task = loss_fn is None and has_task_loss(result.model, example)
    distils = loss_fn is None and (not task or task_weight > 0)
    layerwise = layer_distillation > 0 and distils and isinstance(teacher, torch.fx.GraphModule)
    if module is None or layerwise:
        objective = (LayerwiseDistillation(teacher, result.model, layer_distillation, task_weight=task_weight if task
                                           else 0.0) if layerwise else None)
        with objective or contextlib.nullcontext():
            if objective is not None:
                log.info("retrain: layer-wise distillation at %d points of the residual stream (weight %g)",
                         objective.points, layer_distillation)
            graph_score = score
            if score is not None and module is not None:  # the caller's score reads the module it gets back
                def graph_score(graph: torch.nn.Module) -> float:
                    _graph_weights_into(module, graph)
                    return score(module)
            losses = retrain(result.model, teacher, batches, loss_fn, steps, lr, example, training=training,
                             check=check, history=history, objective=objective, schedule=schedule, score=graph_score,
                             task_weight=task_weight)
        result.report.retrain_check = [list(h) for h in history]
        if module is not None:
            _graph_weights_into(module, result.model)
        return losses
    module.train(not distils)
    try:
        with cache_off(module):
            losses = retrain(module, teacher, batches, loss_fn, steps, lr, example, training=training, check=check,
                             history=history, schedule=schedule, score=score, task_weight=task_weight)
    finally:
        module.eval()
    result.report.retrain_check = [list(h) for h in history]
    graph = module_tensors(result.model)  # the module's rotary frequencies may be sliced; the graph slices its tables
    sliced = frozenset(n for n, t in module.named_buffers() if n in graph and graph[n].shape != t.shape)
    copy_weights(module, result.model, sliced_ok=False, skip=sliced)  # tensors the graph lacks are unused by the forward
    _check_same(module, result.model)
    return losses


def _graph_weights_into(module: torch.nn.Module, graph: torch.fx.GraphModule) -> None:
    """The retrained graph's parameters copied into the module (its buffers, rotary frequencies included, were not
    trained), checked equal."""
    theirs = dict(module.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in graph.named_parameters(remove_duplicate=False):
            if name in theirs:
                theirs[name].copy_(p)
    _check_same(module, graph)


def _check_same(module: torch.nn.Module, graph: torch.fx.GraphModule) -> None:
    gap = module_gap(module, graph)
    if not gap <= 1e-4:
        raise SurgeryCheckError(f"after the retrain the graph and the module differ (relative error {gap:.3g})")


def run_fingerprint(gm: torch.fx.GraphModule, settings: dict[str, Any]) -> dict[str, Any]:
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
    cap, analysis, budget = prepared.captured, prepared.analysis, prepared.options.budget
    report = Report(
        method=method, ratio=prepared.options.ratio, budget=budget, granularity=prepared.granularity,
        params_before=count_params(cap.gm), params_after=count_params(small),
        flops_before=count_flops(cap.gm, cap.args, cap.kwargs),
        flops_after=count_flops(small, cap.args, cap.kwargs),
        prunable_cost_removed=fraction,
        groups=[  # sizes in positions (a rotary pair counts two)
            GroupRow(
                g.id, g.kind, g.tower, g.layer, g.heads, g.head_positions,
                g.kept_positions(keep[g.id]), g.kept_positions(list(range(g.width))), g.cross,
                len({c // g.head_dim for c in keep[g.id]}) if g.heads else None,
                float(group_cost(g, budget)[keep[g.id]].sum()), float(group_cost(g, budget).sum()), g.where,
            )
            for g in analysis.prunable
        ],
        not_prunable=[g.describe() for g in analysis.groups if not g.prunable],
        class_limits=list(prepared.class_limits),
        whole_heads=[f"{g.where} {g.kind}: {g.whole_heads}" for g in analysis.prunable if g.head_is_channel],
    )  # fmt: skip
    log.debug("\n%s", report.table())
    return report

