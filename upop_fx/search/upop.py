"""UPop: unified and progressive search over learnable masks (Shi et al., ICML 2023), as prepare → step →
finalize.

* **Scores** are the mask gradients accumulated over the whole search (never zeroed); masks are not trained;
  weights train jointly with the task loss.
* **Unified ranking**: accumulated scores are z-scored per structure kind, all layers and towers are ranked
  together, weighted by each entry's exact cost (``budget="params"`` or ``"flops"``), and the entries past
  ``π_t × total cost`` are marked for pruning (a large accumulated gradient means raising the mask raises the
  loss: the entry matters little). Each structure keeps at least one entry.
* ``score="sensitivity"`` (opt-in, not the paper's) accumulates ``|∂L/∂mask|`` instead: the first-order
  Taylor estimate of what removing the entry costs, so an entry whose mask never gets a gradient — a dead
  neuron, a tower the loss does not see — ranks last and goes first. The paper's signed score puts such an
  entry at 0, the middle of the ranking, and prunes live entries with a positive accumulated gradient before it.
* **Progressive pruning**: ``π_t = p · sin(π (t+1) / (2T))``; marked masks are set to ``1 − π_t / p``, the
  others to 1, re-selected every ``interval`` steps and at the last step, where the marked masks are exactly 0,
  so surgery changes nothing ("no weight gap").
* **The first marking** (step 0) is ranked by weight magnitude (:func:`~upop_fx.search.magnitude.magnitude_scores`;
  ``first_marking="activation"``: by |weight| × the norm of the activation it multiplies on the calibration
  batches, :func:`~upop_fx.search.activation.activation_scores`), not by the one gradient seen so far: distilling from the dense model, that gradient is exactly zero at step 0
  (student = teacher), and z-scoring would let rounding noise (a fused kernel's last bits) or index order
  decide which entries the whole search then starts from. From step ``interval`` on, the masks have moved, the
  gradients carry the loss, and the accumulated scores rank as in the paper.

The search is a :class:`~upop_fx.search.strategy.Strategy` (:class:`UPopSearch`): ``compress(method="upop")``
runs its loop; ``upop_fx.UPop`` hands the same state (:class:`UPopState`) to your own training loop.

Example (the state driven by hand; ``upop_fx.UPop`` wraps this with capture and the cut):
    >>> import torch, upop_fx
    >>> from upop_fx.search.upop import UPopSearch
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> x = torch.randn(2, 5, 16)
    >>> prepared = upop_fx.pipeline.prepare(layer, x, ratio=0.5, search_steps=3)
    >>> state = UPopSearch().start(prepared)
    >>> for _ in range(3):
    ...     state.model(x).pow(2).mean().backward()
    ...     pi = state.step()
    >>> round(pi, 3), bool(state.selection().pruned.any())
    (0.5, True)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, UPopError
from ..passes import InsertMasks, get_masks
from ..passes.fuse_attention import FuseMaskedAttention
from ..training import distributed
from ..training.layerwise import LayerwiseDistillation, named_points
from ..training.loop import Batches, Distillation, Objective, Training, train_steps
from .activation import calibrated_scores
from .magnitude import magnitude_scores
from .strategy import Prepared, Selection, allocation, checked

__all__ = ["UPopSearch", "UPopState", "schedule"]

log = logging.getLogger(__name__)


def schedule(t: int, total_steps: int, target: float) -> float:
    """π_t = p · sin(π (t+1) / (2T)): the fraction of the cost marked for pruning at step ``t`` (0-based)."""
    return target * math.sin(math.pi * (t + 1) / (2 * total_steps))


class UPopSearch:
    """The UPop search as a strategy: ``options.search_steps`` training steps of the masked graph (AdamW at
    ``options.lr``), re-selecting every ``options.interval`` steps, ranking by ``options.score`` and allocating
    by ``options.allocate`` (the scores, the schedule and the mask updates stay UPop's). On CUDA the masked
    attention runs in the fused kernel (``fuse=False``: the masked graph as it is, e.g. to compare the two)."""

    name = "upop"
    trains = True

    def __init__(self, fuse: bool = True) -> None:
        self.fuse = bool(fuse)

    def start(self, prepared: Prepared) -> UPopState:
        """The masked graph and the search state, ready for the first training step."""
        return UPopState(prepared, self)

    def select(self, prepared: Prepared, batches: Batches, objective: Objective | None) -> Selection:
        if objective is None:
            raise ConfigError("the UPop search trains: it needs an objective")
        state = self.start(prepared)
        options = prepared.options
        layers: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if isinstance(objective, Distillation):
            task_weight = objective.task_weight
            if state.fused:
                objective = Distillation(state.matched_teacher(), task_weight)
            teacher = objective.teacher
            if options.layer_distillation > 0 and isinstance(teacher, torch.fx.GraphModule):
                objective = layers = LayerwiseDistillation(teacher, state.model, options.layer_distillation,
                                                           named_points(teacher, state.model), task_weight)
                log.info("search: layer-wise distillation at %d points of the residual stream (weight %g)",
                         objective.points, options.layer_distillation)

        def after(i: int, grad_scale: float) -> str:
            return f"pi={state.step(grad_scale):.4f}"

        with layers:
            losses = train_steps(
                state.model, list(state.parameters()), objective, batches, options.search_steps, options.lr,
                "upop search", after, log_every=options.interval, training=prepared.training or Training(),
                phase="search", state=state,
            )  # fmt: skip
        return state.selection(losses)


class UPopState:
    """One search in progress: ``model`` (the masked graph) to train, :meth:`step` after each backward,
    :meth:`selection` once ``total_steps`` steps have run."""

    def __init__(self, prepared: Prepared, search: UPopSearch) -> None:
        self.prepared, self.search = prepared, search
        options = prepared.options
        self.target, self.total_steps, self.interval = prepared.target, options.search_steps, options.interval
        self.score = options.score
        masked = InsertMasks(prepared.structures, prepared.entries)(prepared.captured.gm)
        if not masked.modified:
            raise UPopError("nothing to mask: the analysis found prunable groups but no producer to mask")
        # on CUDA the masked attention sites run in the Triton kernel; a no-op off CUDA
        fused = FuseMaskedAttention(device="cuda")(masked.gm) if search.fuse else None
        self.fused = fused is not None and fused.modified
        self.model: torch.fx.GraphModule = fused.gm if fused is not None else masked.gm
        self.state = get_masks(self.model)
        self._masks = self.state.masks(self.model)
        self.scores = [torch.zeros_like(m, dtype=torch.float64) for m in self._masks]
        self.pruned = np.zeros(len(self.state.entries), dtype=bool)
        self.t = 0
        self.pi = 0.0
        self._allocate = allocation(options)

    # --------------------------------------------------------------- training
    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The model's weights, masks excluded: give these to your optimizer."""
        masks = {id(m) for m in self._masks}
        return (p for p in self.model.parameters() if id(p) not in masks)

    @property
    def masks(self) -> list[torch.nn.Parameter]:
        """The mask parameters, one per structure (not in the optimizer: the search sets them)."""
        return list(self._masks)

    def mask_values(self) -> list[torch.Tensor]:
        return [m.detach().clone() for m in self._masks]

    def step(self, grad_scale: float = 1.0) -> float:
        """Call once per training step, after ``backward()``: accumulates the mask gradients and, every
        ``interval`` steps and at the last one, re-selects the entries to prune and sets the masks.

        ``grad_scale``: the factor the gradients were scaled by (``GradScaler.get_scale()`` under fp16): the
        mask gradients are divided by it, in float64, before they are accumulated, and a mask gradient that is
        not finite (a step the scaler skips) is not accumulated. Runs on the masks' device; reads nothing back
        to the host except at a re-selection."""
        if self.t >= self.total_steps:
            raise UPopError(f"the search has already run its {self.total_steps} steps; call finalize()")
        sensitivity = self.score == "sensitivity"
        for m, s in zip(self._masks, self.scores):
            if m.grad is not None:
                g = m.grad.detach().double()
                if grad_scale != 1.0:
                    g = g / grad_scale
                    g = torch.where(torch.isfinite(g).all(), g, torch.zeros_like(g))
                s += g.abs() if sensitivity else g
                m.grad = None
        last = self.t == self.total_steps - 1
        if self.t % self.interval == 0 or last:
            self.pi = schedule(self.t, self.total_steps, self.target)
            self._select(self.pi)
        self.t += 1
        return self.pi

    @functools.cached_property
    def _prior(self) -> np.ndarray:
        """The first marking's ranking (see the module docstring): read once, and only by a search at step 0."""
        p = self.prepared
        if p.options.first_marking == "activation":
            return calibrated_scores(p, p.captured.info.kwargs or p.captured.info.args)
        return magnitude_scores(p.captured.gm, p.analysis, self.state.entries)

    def _importance(self) -> np.ndarray:
        if self.t == 0:  # no gradient to rank on yet (see the module docstring): the weights' magnitude
            return self._prior
        scores = torch.cat(self.scores).cpu().numpy()
        # "gradient": a large accumulated gradient means the entry matters little; "sensitivity": it matters much
        return scores if self.score == "sensitivity" else -scores

    def _select(self, pi: float) -> None:
        entries = self.state.entries
        self.pruned = checked(self._allocate(self._importance(), entries, self.state.structures, pi), entries)
        distributed.check_same(distributed.checksum([self.pruned]), f"the entries selected at step {self.t}")
        value = 1.0 - pi / self.target if self.target > 0 else 1.0
        with torch.no_grad():
            for s, (a, b) in enumerate(self.state.entry_slices):
                m = torch.ones(b - a, dtype=self._masks[s].dtype)
                m[torch.as_tensor(self.pruned[a:b])] = value
                self._masks[s].copy_(m)
        log.debug("step %d: pi=%.4f, %d entries marked", self.t, pi, int(self.pruned.sum()))

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The search's own state (the masks and weights are the model's): step, π_t, scores, selection."""
        return {"t": self.t, "pi": self.pi, "scores": [s.detach().cpu() for s in self.scores],
                "pruned": self.pruned.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["scores"]
        if len(saved) != len(self.scores) or any(a.shape != b.shape for a, b in zip(saved, self.scores)):
            raise UPopError("the saved search state does not fit this model's masks")
        self.t, self.pi = int(state["t"]), float(state["pi"])
        for s, v in zip(self.scores, saved):
            s.copy_(v)
        self.pruned = np.asarray(state["pruned"], dtype=bool).copy()

    # --------------------------------------------------------------- result
    def dense_trained(self) -> torch.fx.GraphModule:
        """The captured graph carrying the weights trained during the search (masks left out). Its parameters
        and buffers *are* the masked model's (shared, not copied): the search holds no third copy of the model."""
        return self._copy_sharing(self.prepared.captured.gm, self.model)

    def matched_teacher(self) -> torch.fx.GraphModule:
        """The dense model computed with the student's arithmetic: the search graph (fused kernel included) at
        masks 1, on the captured graph's own tensors (shared, not copied). Distilling from it, the loss and every
        gradient start at exactly zero. From the captured graph, the fused kernel's last bits would make a
        gradient of ~1e-6 that AdamW's normalised step turns into a full ``lr`` step of every weight at step 0.
        Call before the first step (the masks must still be 1)."""
        if self.t != 0 or any(bool((m != 1).any()) for m in self._masks):
            raise UPopError("matched_teacher() needs the search graph as it starts: masks at 1, before step 0")
        return self._copy_sharing(self.model, self.prepared.captured.gm)

    def _copy_sharing(self, graph: torch.fx.GraphModule, source: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """A deep copy of ``graph`` (the captured graph or the search graph) whose tensors named as the captured
        graph's are ``source``'s own (shared, not copied); the masks and gathers of the search graph are copied."""
        dense, search = _tensors(self.prepared.captured.gm), _tensors(self.model)
        missing = sorted(set(dense) - set(search))
        if missing:
            raise UPopError(f"the search graph lacks the dense graph's tensors {missing[:3]}")
        mine, theirs = _tensors(graph), _tensors(source)
        return copy.deepcopy(graph, {id(mine[name]): theirs[name] for name in dense})

    def selection(self, losses: list[float] | None = None) -> Selection:
        """The entries marked at the last step, the trained dense graph to cut, and the final masked graph
        the cut must reproduce. Raises before ``total_steps`` steps: the masks are not yet 0/1."""
        if self.t < self.total_steps:
            raise UPopError(
                f"finalize() after {self.t} of {self.total_steps} steps: the masks are not yet 0/1, "
                f"so cutting now would change the model; run the remaining steps"
            )
        importance = self._prior if self.total_steps == 1 else self._importance()

        def reselect(fraction: float) -> np.ndarray:  # the final scores, allocated at another fraction
            entries = self.state.entries
            return checked(self._allocate(importance, entries, self.state.structures, fraction), entries)

        return Selection(self.pruned.copy(), self.dense_trained(), self.model, list(losses or []), reselect)


def _tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(gm.named_parameters()) | dict(gm.named_buffers())
