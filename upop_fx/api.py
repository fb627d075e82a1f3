"""``compress()`` and ``UPop``: the public entry points, thin layers over :mod:`upop_fx.pipeline`.

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
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .pipeline import Result, check_options, cut, prepare, run, seeded
from .search.magnitude import Magnitude
from .search.strategy import ALLOCATIONS, Allocate
from .search.train import PRECISIONS, retrain
from .search.upop import SCORES, UPopSearch
from .structures import BUDGETS, GRANULARITIES, keep_sets

__all__ = [
    "compress", "retrain", "UPop", "Result", "METHODS", "SCORES", "GRANULARITIES", "BUDGETS", "ALLOCATIONS",
    "PRECISIONS",
]

log = logging.getLogger(__name__)

METHODS = ("upop", "magnitude")


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
    granularity: str | None = None,
    round_to: int = 1,
    lr: float = 1e-4,
    interval: int = 10,
    seed: int = 0,
    score: str = "gradient",
    allocate: str | Allocate | None = None,
    precision: str = "fp32",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    own_class: bool = False,
    runtime: str | None = None,
    latency_shape: tuple[int, int | None] | None = None,
) -> Result:
    """Remove ``ratio`` of the prunable cost of ``model`` and return a dense, smaller model.

    Args:
        model: any ``nn.Module`` that ``torch.export`` captures (Hugging Face BERT, ViT, CLIP, BLIP, GPT-2, ...).
            It is never modified, and the global RNG state is the same after the call as before.
        example_inputs: a tensor, a tuple of positional args, or a dict of keyword args; batch ≥ 2.
        ratio: fraction of the prunable cost to remove, in [0, 1).
        method: ``"upop"`` — the unified progressive search (masks scored by accumulated gradients while the
            weights train); ``"magnitude"`` — one-shot global ranking by mean |weight|.
        data: training batches for the search and the retrain, any iterable, streamed: a re-iterable (a list,
            a ``DataLoader``) is iterated afresh per phase and epoch; a one-shot iterator is read once across
            the search and the retrain. Batches are model inputs shaped like ``example_inputs`` (with their
            ``labels`` for a Hugging Face model that returns a ``.loss``: that loss is then the task loss), or
            ``(inputs, target)`` pairs when ``loss_fn`` is given. Default: the example inputs.
        loss_fn: ``loss_fn(outputs, target) -> scalar``; default: the model's ``.loss`` when the example inputs
            carry ``labels``, else distillation from the dense model.
        search_steps: training steps of the UPop search (ignored by ``"magnitude"``).
        retrain_steps: fine-tuning steps of the dense small model after the cut (0 = none).
        budget: one of :data:`BUDGETS` — the unit of cost: ``"params"``, ``"flops"``, or ``"latency"``: the
            latency measured on ``runtime`` (``ratio=0.5`` removes half of the dense model's measured time;
            what no pruning changes counts too). Each structure's latency is measured at a few widths on that
            runtime (:mod:`upop_fx.latency`, cached on disk), and ``report.latency`` gives the predicted
            latency after the cut beside the speedup measured there.
        runtime: with ``budget="latency"``: ``"onnxruntime-cpu"`` (default), ``"torch-cpu"``, ``"torch-cuda"``
            or ``"onnxruntime-cuda"`` (the last two need a GPU).
        latency_shape: with ``budget="latency"``: ``(batch, seq)`` to time at (``seq`` None: the inputs' own
            length); default: the example inputs' shape.
        granularity: one of :data:`GRANULARITIES`: ``"upop"`` (head-dims shared across heads and q/k/v),
            ``"qk_v"``, ``"heads"`` or ``"heads+dims"`` (whole heads and head dims compete in one ranking; with
            ``budget="latency"`` what removing a head saves — its softmax and score work — is measured too).
            Default: ``"heads+dims"`` with ``budget="latency"``, ``"upop"`` otherwise.
        round_to: keep head dims and MLP widths at multiples of this (the budget is still met).
        lr: AdamW learning rate of the search and the retrain.
        interval: the search re-selects the entries to prune every ``interval`` steps.
        seed: results are deterministic for a seed (and the same data).
        score: one of :data:`SCORES` — how the UPop search ranks entries: ``"gradient"`` (the signed
            accumulated mask gradient, as in the paper) or ``"sensitivity"`` (accumulated ``|∂L/∂mask|``, which
            prunes entries the loss never sees first). Ignored by ``"magnitude"``.
        allocate: how the ranking becomes a cut: ``"unified"`` (default: one ranking over every layer and
            tower), ``"uniform"`` (the same fraction in every structure), or a callable (see
            :data:`~upop_fx.search.strategy.Allocate`).
        precision: one of :data:`PRECISIONS`: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast and a
            gradient scaler) for the search and the retrain. Mask gradients are unscaled and accumulated in
            float64 either way.
        checkpoint_dir: write the training state there every ``checkpoint_every`` steps (atomically); called
            again with the same directory, the same model, data and settings, the run resumes where it stopped
            and gives the result an uninterrupted run gives. A directory of another run raises
            :class:`~upop_fx.errors.CheckpointError`.
        checkpoint_every: steps between checkpoints (and one at the end of each phase).
        own_class: prune only what the model's own class can express, so that ``result.module`` exists
            (layers whose code fixes a size the cut would change are left whole, each listed in
            ``report.not_prunable`` with the reason). Default: prune everything the graph can cut; the result's
            ``module`` is then None where the class cannot follow, and ``report.module_reason`` says why.

    Returns a :class:`Result`: ``result.model`` (the dense small graph, what :func:`export_onnx` exports) and
    ``result.module`` (the caller's model of its own class, cut alike and verified equal to the graph — it
    trains, saves with :func:`~upop_fx.save_pretrained`, and generates).

    Runs where the model is (CPU or CUDA; batches are moved to its device). Inside an initialised
    ``torch.distributed`` process group (``torchrun``) every rank trains on its own batches under
    ``DistributedDataParallel``, mask gradients averaged across ranks; every rank keeps the same channels and
    returns the same result; rank 0 alone logs and writes checkpoints.

    Raises:
        ConfigError, InputError, CaptureError, NoPrunableGroupError, SurgeryError — all :class:`UPopError`.
        Options are checked before the model is captured.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    search = UPopSearch(search_steps, interval, score, lr, allocate)  # validates the search options either way
    strategy = search if method == "upop" else Magnitude(allocate)
    return run(
        model, example_inputs, strategy, ratio=ratio, data=data, loss_fn=loss_fn,
        search_steps=search_steps if method == "upop" else 0, retrain_steps=retrain_steps, lr=lr, budget=budget,
        granularity=granularity, round_to=round_to, seed=seed, precision=precision,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, own_class=own_class, runtime=runtime,
        latency_shape=latency_shape,
    )  # fmt: skip


class UPop:
    """The UPop search driven by your own training loop: ``model`` to train, :meth:`step` after each
    backward, :meth:`finalize` for the dense small model — the same pipeline as :func:`compress`.

    ``score``, ``allocate`` and ``own_class`` as in :func:`compress`; :meth:`finalize`'s result carries
    ``module`` (the caller's class, cut alike) as :func:`compress`'s does. On CUDA, ``model``'s masked
    attention sites run the fused Triton kernel. The global RNG state is left as it was.

    Example:
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

    def __init__(
        self,
        model: torch.nn.Module,
        example_inputs: Any,
        ratio: float = 0.5,
        *,
        total_steps: int = 100,
        interval: int = 10,
        budget: str = "params",
        granularity: str | None = None,
        seed: int = 0,
        round_to: int = 1,
        score: str = "gradient",
        allocate: str | Allocate | None = None,
        own_class: bool = False,
        runtime: str | None = None,
        latency_shape: tuple[int, int | None] | None = None,
    ) -> None:
        check_options(ratio, budget, granularity, round_to, seed, runtime, latency_shape)
        self.search = UPopSearch(total_steps, interval, score, allocate=allocate)
        with seeded(seed, model):
            self.prepared = prepare(model, example_inputs, ratio, budget, granularity, round_to, own_class, runtime,
                                    latency_shape)
            self.state = self.search.start(self.prepared)

    @property
    def model(self) -> torch.fx.GraphModule:
        """The masked graph to train."""
        return self.state.model

    @property
    def t(self) -> int:
        return self.state.t

    @property
    def total_steps(self) -> int:
        return self.state.total_steps

    @property
    def scores(self) -> list[torch.Tensor]:
        """The accumulated mask gradients, one tensor per structure."""
        return self.state.scores

    @property
    def pruned(self) -> np.ndarray:
        """The entries marked for pruning at the last re-selection."""
        return self.state.pruned

    @property
    def teacher(self) -> torch.fx.GraphModule:
        """The captured dense graph (what :func:`compress` distils from)."""
        return self.prepared.captured.gm

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The model's weights, masks excluded: give these to your optimizer."""
        return self.state.parameters()

    @property
    def masks(self) -> list[torch.nn.Parameter]:
        """The mask parameters, one per structure."""
        return self.state.masks

    def mask_values(self) -> list[torch.Tensor]:
        """A copy of the current mask values."""
        return self.state.mask_values()

    def step(self, grad_scale: float = 1.0) -> float:
        """Call once per training step, after ``backward()``; returns π_t. With a ``torch.amp.GradScaler``, pass
        ``scaler.get_scale()`` of that backward: the mask gradients are unscaled before they are accumulated.
        Under ``DistributedDataParallel`` (wrap :attr:`model` yourself) the mask gradients arrive averaged, and
        every re-selection checks that all ranks chose the same entries."""
        return self.state.step(grad_scale)

    def keep(self) -> dict[int, list[int]]:
        """Kept channel indices per group, as the current selection stands."""
        return keep_sets(self.prepared.analysis, self.state.state.entries, self.state.pruned)

    def finalize(self, method: str = "upop") -> Result:
        """Cut the pruned entries out: the dense small model (its report labelled ``method``), equal to the
        final masked model."""
        return cut(self.prepared, self.state.selection(), method)
