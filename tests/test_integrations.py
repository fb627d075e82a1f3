"""UPopCallback: UPop's search inside a Hugging Face ``Trainer.train()`` — the Trainer's data, loss, optimizer
and schedule — then the cut (and a short retrain) at the end, the caller's class back."""

from __future__ import annotations

import pytest
import torch

import upop_fx
from upop_fx.compare import relative_error
from upop_fx.integrations import UPopCallback

transformers = pytest.importorskip("transformers")


def _rows(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (n, 8), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": int(i[0] % 2)} for i in ids]


def _model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=100, num_labels=2)).eval()


def _train(pruner: UPopCallback, rows: list[dict], steps: int, tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=pruner.model, args=args, train_dataset=rows, callbacks=[pruner]).train()


@pytest.mark.parametrize("retrain_steps", [0, 2])
def test_the_search_runs_in_the_trainer_and_the_cut_comes_back_as_the_class(tmp_path, retrain_steps):
    model, rows = _model(), _rows()
    example = {k: torch.stack([torch.as_tensor(r[k]) for r in rows[:4]]) for k in rows[0]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = UPopCallback(model, example, ratio=0.5, interval=2, retrain_steps=retrain_steps)
    seen = []
    original_step = pruner.pruner.step

    def spy(*args, **kwargs):  # the masks at each step, before the re-selection
        seen.append(torch.cat([m.detach().clone() for m in pruner.pruner.masks]))
        return original_step(*args, **kwargs)

    pruner.pruner.step = spy
    _train(pruner, rows, 6, tmp_path)
    assert pruner.pruner.t == 6 and len(seen) == 6  # one UPop step per optimizer step, over max_steps
    final = torch.cat(pruner.pruner.mask_values())
    assert set(final.unique().tolist()) <= {0.0, 1.0}  # the schedule, not AdamW, set the masks
    assert any(((s > 0) & (s < 1)).any() for s in seen)  # progressive on the way
    result = pruner.result
    assert type(result.module) is type(model) and result.report.prunable_cost_removed >= 0.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model untouched
    assert len(result.losses.get("retrain", [])) == retrain_steps
    with torch.no_grad():  # the module and the graph agree (after the retrain too)
        assert relative_error(result.module(**example).logits, result.model(**example).logits) <= 1e-4
    dense_trained = pruner.pruner.state.dense_trained()  # the search trained the weights (the Trainer's optimizer)
    assert any(not torch.equal(p, before[n]) for n, p in dense_trained.state_dict().items() if n in before)


def test_a_training_stopped_early_cuts_nothing(tmp_path, caplog):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            control.should_training_stop = state.global_step >= 2

    model, rows = _model(), _rows()
    example = {k: torch.stack([torch.as_tensor(r[k]) for r in rows[:4]]) for k in rows[0]}
    pruner = UPopCallback(model, example, ratio=0.5)
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=pruner.model, args=args, train_dataset=rows, callbacks=[pruner, Stop()]).train()
    assert pruner.result is None and "nothing was cut" in caplog.text
    with pytest.raises(upop_fx.UPopError, match="already run"):
        pruner.on_train_begin(args, type("S", (), {"max_steps": 6})(), None)
