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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .ir.entries import keep_sets
from .options import Options
from .pipeline import Result, finish, prepare, run, seeded
from .search.upop import UPopSearch
from .training import distributed
from .training.loop import retrain

__all__ = ["compress", "retrain", "UPop", "Result"]

log = logging.getLogger(__name__)


def _options(options: Options | None, ratio: float | None, method: str | None, changes: dict[str, Any]) -> Options:
    given = {k: v for k, v in (("ratio", ratio), ("method", method)) if v is not None}
    return Options.make(options, **given, **changes)


def compress(
    model: torch.nn.Module,
    example_inputs: Any,
    ratio: float | None = None,
    method: str | None = None,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    options: Options | None = None,
    **changes: Any,
) -> Result:
    """Remove ``ratio`` of the prunable cost of ``model`` and return a dense, smaller model.

    Args:
        model: any ``nn.Module`` that ``torch.export`` captures (Hugging Face BERT, ViT, CLIP, BLIP, GPT-2, ...).
            It is never modified, and the global RNG state is the same after the call as before.
        example_inputs: a tensor, a tuple of positional args, or a dict of keyword args; batch ≥ 2.
        ratio, method: the options of those names (None: their defaults, ``0.5`` and ``"upop"``).
        data: training batches for the search and the retrain, any iterable, streamed: a re-iterable (a list,
            a ``DataLoader``) is iterated afresh per phase and epoch; a one-shot iterator is read once across
            the search and the retrain. Batches are model inputs shaped like ``example_inputs`` (with their
            ``labels`` for a Hugging Face model that returns a ``.loss``: that loss is then the task loss), or
            ``(inputs, target)`` pairs when ``loss_fn`` is given. Default: the example inputs.
        loss_fn: ``loss_fn(outputs, target) -> scalar``; default: the model's ``.loss`` when the example inputs
            carry ``labels``, else distillation from the dense model.
        options, **changes: every other setting, by keyword (``search_steps=200, budget="latency"``) or as an
            :class:`~upop_fx.options.Options` (with keywords changing it): each option is explained there, once.
            All are checked before the model is captured; an unknown keyword is a ConfigError naming it.

    Returns a :class:`Result`: ``result.model`` (the dense small graph, what :func:`export_onnx` exports) and
    ``result.module`` (the caller's model of its own class, cut alike and verified equal to the graph — it
    trains, saves with :func:`~upop_fx.save_pretrained`, and generates).

    Runs where the model is (CPU or CUDA; batches are moved to its device). Inside an initialised
    ``torch.distributed`` process group (``torchrun``) every rank trains on its own batches under
    ``DistributedDataParallel``, mask gradients averaged across ranks; every rank keeps the same channels and
    returns the same result; rank 0 alone logs and writes checkpoints.

    Raises:
        ConfigError, InputError, CaptureError, NoPrunableGroupError, SurgeryError — all :class:`UPopError`.
    """
    return run(model, example_inputs, None, _options(options, ratio, method, changes), data=data, loss_fn=loss_fn)


#: options that belong to ``compress``'s own training loop: with :class:`UPop` your loop decides them
_NOT_FOR_UPOP = ("method", *Options().group("training"))


class UPop:
    """The UPop search driven by your own training loop: ``model`` to train, :meth:`step` after each
    backward, :meth:`finalize` for the dense small model — the same pipeline as :func:`compress`.

    Options as in :func:`compress` (those of the search, the latency budget and the outputs:
    :class:`~upop_fx.options.Options`; your loop and optimizer decide the training's); :meth:`finalize`'s
    result carries ``module`` (the caller's class, cut alike) as :func:`compress`'s does. On CUDA, ``model``'s masked
    attention sites run the fused Triton kernel. The global RNG state is left as it was.

    Example:
        >>> import torch, upop_fx
        >>> model = torch.nn.TransformerEncoder(
        ...     torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False).eval()
        >>> x = torch.randn(4, 10, 32)
        >>> pruner = upop_fx.UPop(model, x, ratio=0.5, search_steps=20)
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
        ratio: float | None = None,
        *,
        options: Options | None = None,
        **changes: Any,
    ) -> None:
        for name in _NOT_FOR_UPOP:
            if name in changes:
                raise ConfigError(f"{name} is an option of compress()'s own loop; with UPop your training loop "
                                  "and optimizer decide it")
        opts = _options(options, ratio, None, changes)
        distributed.init_from_environment()  # under torchrun without a process group: one search, not one per rank
        self.search = UPopSearch()
        with seeded(opts.seed, model):
            self.prepared = prepare(model, example_inputs, opts)
            self.state = self.search.start(self.prepared)
        self._teacher = self.state.matched_teacher() if self.state.fused else self.prepared.captured.gm

    @property
    def model(self) -> torch.fx.GraphModule:
        """The masked graph to train."""
        return self.state.model

    @property
    def t(self) -> int:
        return self.state.t

    @property
    def search_steps(self) -> int:
        """How many steps the search runs (``options.search_steps``)."""
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
        """The dense model to distil from (what :func:`compress` distils from): the captured graph, or, where the
        search runs the fused attention kernel, the same function computed by the search graph at masks 1, so
        that the loss starts at exactly zero."""
        return self._teacher

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
        return keep_sets(self.prepared.analysis, self.prepared.entries, self.state.pruned)

    def finalize(self, method: str = "upop") -> Result:
        """Cut the pruned entries out: the dense small model (its report labelled ``method``), equal to the
        final masked model."""
        return finish(self.prepared, self.state.selection(), method)
