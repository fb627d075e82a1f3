"""UPop inside the tools you already train with: :class:`UPopCallback` runs the search in your own
``transformers.Trainer.train()``.

UPop's search *is* training: the masked model trains on your data while the mask gradients are accumulated and
the masks are re-selected on the schedule. With the callback, that training is your ``Trainer``'s — your
dataset and collator, the model's own ``.loss`` (the batches carry ``labels``), your optimizer, learning-rate
schedule, gradient accumulation, mixed precision and DDP under ``torchrun``. The callback

* captures the model and inserts the masks when it is built (train :attr:`UPopCallback.model`, the masked graph:
  it takes the same keyword inputs as your model and returns its output, loss included);
* sets the schedule's length to the Trainer's ``max_steps`` when training begins;
* after each backward (``on_pre_optimizer_step``: the gradients accumulated, clipped, unscaled) accumulates the
  mask gradients and re-selects — the masks take no optimizer step (their gradients are consumed first);
* when training ends, cuts the model (:attr:`UPopCallback.result`: ``result.module`` is your class, smaller and
  verified; ``result.model`` the graph), then retrains it for ``retrain_steps`` on the Trainer's own training
  batches when asked.

Example:
    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    >>> from transformers.trainer_callback import PrinterCallback
    >>> from upop_fx.integrations import UPopCallback
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...     intermediate_size=64, vocab_size=100, num_labels=2)).eval()
    >>> ids = torch.randint(1, 100, (16, 8))
    >>> rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": int(i[0] % 2)} for i in ids]
    >>> pruner = UPopCallback(model, {k: torch.stack([torch.as_tensor(r[k]) for r in rows[:4]]) for k in rows[0]},
    ...                       ratio=0.5)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     args = TrainingArguments(d, max_steps=6, per_device_train_batch_size=4, report_to=[], save_strategy="no",
    ...                              use_cpu=True, disable_tqdm=True)
    ...     trainer = Trainer(model=pruner.model, args=args, train_dataset=rows, callbacks=[pruner])
    ...     trainer.remove_callback(PrinterCallback)  # (the metrics it prints)
    ...     _ = trainer.train()
    >>> type(pruner.result.module).__name__, pruner.result.report.prunable_cost_removed >= 0.5
    ('BertForSequenceClassification', True)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from .api import UPop
from .errors import UPopError
from .options import Options
from .pipeline import Result, retrain_result

__all__ = ["UPopCallback"]

log = logging.getLogger(__name__)


class UPopCallback(TrainerCallback):
    """UPop's search during ``Trainer.train()`` (see the module docstring): pass :attr:`model` as the Trainer's
    model and the callback in ``callbacks=``; read :attr:`result` after training.

    ``example_inputs``: a batch as your collator makes it (a dict of tensors, ``labels`` included, so that the
    captured model returns its loss). ``ratio``, ``options`` and the keyword options: as in
    :class:`~upop_fx.UPop` (``search_steps`` is the Trainer's ``max_steps``). ``retrain_steps``, ``retrain_lr``:
    the short retrain of the cut model on the Trainer's training batches (0: none; retrain it with another
    ``Trainer`` on ``result.module`` instead, if you like)."""

    def __init__(self, model: torch.nn.Module, example_inputs: Any, ratio: float | None = None, *,
                 retrain_steps: int = 0, retrain_lr: float = 1e-4, options: Options | None = None,
                 **changes: Any) -> None:  # fmt: skip
        self.pruner = UPop(model, example_inputs, ratio, options=options, **changes)
        self.example_inputs = example_inputs
        self.retrain_steps, self.retrain_lr = int(retrain_steps), float(retrain_lr)
        self.result: Result | None = None

    @property
    def model(self) -> torch.fx.GraphModule:
        """The masked model to give the Trainer."""
        return self.pruner.model

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pruner.t:
            raise UPopError("UPopCallback runs one search, from its first step: this one has already run "
                            f"{self.pruner.t} steps (resuming a Trainer checkpoint mid-search is not supported)")
        if state.max_steps < 1:
            raise UPopError("UPopCallback needs the Trainer's max_steps (set max_steps or num_train_epochs)")
        self.pruner.state.total_steps = int(state.max_steps)
        log.info("UPop search over the Trainer's %d steps, re-selecting every %d", state.max_steps,
                 self.pruner.state.interval)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.pruner.step()

    def on_train_end(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                     **kwargs: Any) -> None:  # fmt: skip
        if self.pruner.t < self.pruner.state.total_steps:
            log.warning("training stopped after %d of %d steps: the masks are not yet 0/1, so nothing was cut",
                        self.pruner.t, self.pruner.state.total_steps)
            return
        result = self.pruner.finalize()
        if self.retrain_steps:
            if train_dataloader is None:
                raise UPopError("retrain_steps needs the Trainer's training batches, which it did not pass")
            result.losses["retrain"] = retrain_result(result, None, train_dataloader, None, self.retrain_steps,
                                                      self.retrain_lr, self.example_inputs)
        self.result = result
