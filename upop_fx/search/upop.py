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

Example (your own training loop):
    >>> import torch, upop_fx
    >>> model = torch.nn.TransformerEncoder(
    ...     torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False).eval()
    >>> x = torch.randn(4, 10, 32)
    >>> pruner = upop_fx.UPop(model, x, ratio=0.5, total_steps=20)
    >>> opt = torch.optim.AdamW(pruner.parameters(), lr=1e-4)
    >>> for _ in range(20):
    ...     loss = (pruner.model(x) - model(x).detach()).pow(2).mean()
    ...     loss.backward()
    ...     pi = pruner.step()     # reads the mask gradients, updates π_t and the masks
    ...     opt.step(); opt.zero_grad()
    >>> result = pruner.finalize()
    >>> result.report.prunable_cost_removed >= 0.5
    True
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..capture import capture
from ..errors import ConfigError, UPopError
from ..passes import FindGroups, InsertMasks, Surgery, get_masks
from ..passes.fuse_attention import FuseMaskedAttention
from ..passes.surgery import relative_error
from .ranking import select_pruned
from .structures import Entry, Structure, keep_sets, removed_fraction

__all__ = ["UPop", "schedule", "SCORES"]

SCORES = ("gradient", "sensitivity")

#: ``allocate(importance, entries, structures, pi) -> prune mask``: importance is higher for entries that matter
#: more; the mask is True for the entries to mark at ``π_t = pi``. The default is the unified ranking.
Allocate = Callable[[np.ndarray, Sequence[Entry], Sequence[Structure], float], np.ndarray]

log = logging.getLogger(__name__)


def schedule(t: int, total_steps: int, ratio: float) -> float:
    """π_t = p · sin(π (t+1) / (2T)): the fraction of the cost marked for pruning at step ``t`` (0-based)."""
    return ratio * math.sin(math.pi * (t + 1) / (2 * total_steps))


class UPop:
    """The UPop search on a masked graph: ``model`` to train, :meth:`step` after each backward,
    :meth:`finalize` for the dense small model (see the module docstring for a runnable example).
    On CUDA, ``model``'s masked attention sites run the fused Triton kernel (``FuseMaskedAttention``).

    ``score`` is ``"gradient"`` (the paper's signed accumulated mask gradient) or ``"sensitivity"`` (accumulated
    ``|gradient|``). ``allocate`` replaces the unified ranking by your own allocation (see :data:`Allocate`),
    e.g. a fixed fraction per layer, keeping the scores, the schedule and the mask updates.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        example_inputs: Any,
        ratio: float = 0.5,
        *,
        total_steps: int = 100,
        interval: int = 10,
        budget: str = "params",
        granularity: str = "upop",
        seed: int = 0,
        round_to: int = 1,
        score: str = "gradient",
        allocate: Allocate | None = None,
    ) -> None:
        if score not in SCORES:
            raise ConfigError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise ConfigError(f"ratio must be a number in [0, 1), got {ratio!r}")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"interval must be a positive integer, got {interval!r}")
        torch.manual_seed(seed)
        self.ratio, self.total_steps, self.interval = float(ratio), total_steps, interval
        self.cap = capture(model, example_inputs)
        self.analysis = FindGroups()(self.cap.gm, self.cap.batch_size).value
        self.analysis.require_prunable(type(model).__name__)
        self.model: torch.fx.GraphModule = InsertMasks(granularity, budget)(self.cap.gm).gm
        self.model = FuseMaskedAttention(device="cuda")(self.model).gm  # in place; a no-op off CUDA
        self.state = get_masks(self.model)
        self._masks = self.state.masks(self.model)
        self.scores = [torch.zeros_like(m, dtype=torch.float64) for m in self._masks]
        self.pruned = np.zeros(len(self.state.entries), dtype=bool)
        self.t = 0
        self.pi = 0.0
        self.budget, self.granularity, self.round_to, self.score = budget, granularity, round_to, score
        self.allocate = allocate

    # --------------------------------------------------------------- training
    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The model's weights, masks excluded: give these to your optimizer."""
        masks = {id(m) for m in self._masks}
        return (p for p in self.model.parameters() if id(p) not in masks)

    def mask_values(self) -> list[torch.Tensor]:
        return [m.detach().clone() for m in self._masks]

    def step(self) -> float:
        """Call once per training step, after ``backward()``: accumulates the mask gradients and, every
        ``interval`` steps and at the last one, re-selects the entries to prune and sets the masks."""
        if self.t >= self.total_steps:
            raise UPopError(f"the search has already run its {self.total_steps} steps; call finalize()")
        for m, s in zip(self._masks, self.scores):
            if m.grad is not None:
                g = m.grad.detach().double()
                s += g.abs() if self.score == "sensitivity" else g
                m.grad = None
        last = self.t == self.total_steps - 1
        if self.t % self.interval == 0 or last:
            self.pi = schedule(self.t, self.total_steps, self.ratio)
            self._select(self.pi)
        self.t += 1
        return self.pi

    def _select(self, pi: float) -> None:
        scores = torch.cat(self.scores).cpu().numpy()
        # "gradient": a large accumulated gradient means the entry matters little; "sensitivity": it matters much
        importance = scores if self.score == "sensitivity" else -scores
        if self.allocate is None:
            self.pruned = select_pruned(importance, self.state.entries, self.state.structures, pi, self.round_to)
        else:
            self.pruned = np.asarray(self.allocate(importance, self.state.entries, self.state.structures, pi), dtype=bool)
            if self.pruned.shape != (len(self.state.entries),):
                raise UPopError(f"allocate returned shape {self.pruned.shape}, expected ({len(self.state.entries)},)")
        value = 1.0 - pi / self.ratio if self.ratio > 0 else 1.0
        with torch.no_grad():
            for s, (a, b) in enumerate(self.state.entry_slices):
                m = torch.ones(b - a, dtype=self._masks[s].dtype)
                m[torch.as_tensor(self.pruned[a:b])] = value
                self._masks[s].copy_(m)
        log.debug("step %d: pi=%.4f, %d entries marked", self.t, pi, int(self.pruned.sum()))

    # --------------------------------------------------------------- result
    def keep(self) -> dict[int, list[int]]:
        return keep_sets(self.analysis, self.state.entries, self.pruned)

    def dense_trained(self) -> torch.fx.GraphModule:
        """The captured graph carrying the weights trained during the search (masks left out)."""
        gm = copy.deepcopy(self.cap.gm)
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith("upop_masks.")}
        gm.load_state_dict(state, strict=True)
        return gm

    def finalize(self, method: str = "upop") -> Any:
        """Cut the pruned entries out: the dense small model (``Result``, its report labelled ``method``), equal
        to the final masked model."""
        from ..api import build_result

        if self.t < self.total_steps:
            raise UPopError(
                f"finalize() after {self.t} of {self.total_steps} steps: the masks are not yet 0/1, "
                f"so cutting now would change the model; run the remaining steps"
            )
        keep = self.keep()
        dense = self.dense_trained()
        small = Surgery()(dense, keep, self.cap.args, self.cap.kwargs).gm
        with torch.no_grad():
            gap = relative_error(_run(small, self.cap), _run(self.model, self.cap))
        log.info("finalize: surgery vs final masked model, relative error %.2e", gap)
        if not gap <= 1e-4:
            raise UPopError(f"the reduced model differs from the final masked model (relative error {gap:.3g})")
        return build_result(
            small, dense, self.cap, self.analysis, keep, method, self.ratio, self.budget, self.granularity,
            removed_fraction(self.state.entries, self.pruned),
        )  # fmt: skip


def _run(module: torch.nn.Module, cap: Any) -> Any:
    return module(*cap.args, **cap.kwargs)
