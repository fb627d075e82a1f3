"""Bad input gets a clear UPopError, and the caller's model is never changed."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
import transformers

import upop_fx
from upop_fx import errors


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor], training: bool) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
        assert before[k].dtype == after[k].dtype
    assert model.training == training


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5", [0.5]])
def test_ratio_out_of_range(encoder, ratio):
    model, x = encoder
    with pytest.raises(errors.ConfigError, match="ratio"):
        upop_fx.compress(model, x, ratio=ratio)


def test_unknown_method_budget_granularity(encoder):
    model, x = encoder
    with pytest.raises(errors.ConfigError, match="method"):
        upop_fx.compress(model, x, ratio=0.5, method="random")
    with pytest.raises(errors.ConfigError, match="budget"):
        upop_fx.compress(model, x, ratio=0.5, budget="seconds")
    with pytest.raises(errors.ConfigError, match="granularity"):
        upop_fx.compress(model, x, ratio=0.5, granularity="blocks")


def test_inputs_that_do_not_fit(encoder):
    model, _ = encoder
    with pytest.raises(errors.InputError, match="raises on example_inputs"):
        upop_fx.compress(model, torch.randn(2, 10, 17), ratio=0.5)  # wrong feature width
    with pytest.raises(errors.InputError, match="at least 2"):
        upop_fx.compress(model, torch.randn(1, 10, 32), ratio=0.5)
    with pytest.raises(errors.InputError, match="same batch size"):
        upop_fx.compress(model, (torch.randn(2, 10, 32), torch.zeros(3, 10, 10)), ratio=0.5)
    with pytest.raises(errors.InputError, match="tensor"):
        upop_fx.compress(model, "not a tensor", ratio=0.5)
    with pytest.raises(errors.InputError, match="unexpected keyword"):
        upop_fx.compress(model, {"nonexistent": torch.randn(2, 10, 32)}, ratio=0.5)


class _DataDependent(torch.nn.Module):
    """Control flow on a tensor value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:
            h = h * 2
        return self.fc2(torch.relu(h))


def test_model_export_cannot_capture():
    model = _DataDependent().eval()
    before = _state(model)
    with pytest.raises(errors.CaptureError, match="torch.export could not capture _DataDependent"):
        upop_fx.compress(model, torch.randn(2, 8), ratio=0.5)
    _assert_unchanged(model, before, False)


class _ReadsValues(torch.nn.Module):
    """Reads a tensor's values through numpy: runs eagerly, but torch.export traces without values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(x.detach().numpy().std())
        return self.fc(x) * scale


@pytest.mark.parametrize("model_class,text", [(_DataDependent, "if h.sum() > 0:"),
                                              (_ReadsValues, "scale = float(x.detach().numpy().std())")])
def test_capture_error_names_the_models_source_line(model_class, text):
    source, first = inspect.getsourcelines(model_class.forward)
    line = first + next(i for i, code in enumerate(source) if text in code)
    with pytest.raises(errors.CaptureError) as info:
        upop_fx.capture(model_class().eval(), torch.randn(2, 8))
    message = str(info.value)
    head = "\n".join(message.splitlines()[:2])
    assert model_class.__name__ in head and f"{Path(__file__).name}:{line}" in head and text in head
    assert len(message.splitlines()) <= 6 and "Traceback" not in message
    assert info.value.__cause__ is not None  # torch's error, in full
    if model_class is _DataDependent:  # the hint for a branch on a value, and torch's reason, shortened
        assert "torch.where" in message and "torch.cond" in message and "data-dependent" in message
        assert type(info.value.__cause__).__name__ == "GuardOnDataDependentSymNode"
    else:
        assert "torch.where" not in message and ".numpy()" in message


def test_misspelt_input_key_is_named_before_capture():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(errors.InputError, match="'input_id'") as info:
        upop_fx.capture(model, {"input_id": ids})
    message = str(info.value)
    assert "did you mean 'input_ids'?" in message
    assert "BertModel.forward takes input_ids, attention_mask, token_type_ids" in message
    with pytest.raises(errors.InputError, match="did you mean 'attention_mask'"):  # a typo sent to **kwargs
        upop_fx.capture(model, {"input_ids": ids, "attention_masks": torch.ones_like(ids)})


class _NoGroups(torch.nn.Module):
    """One Linear whose channels all reach the output: nothing can be removed exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_model_without_prunable_group():
    with pytest.raises(errors.NoPrunableGroupError, match="reach the model output"):
        upop_fx.compress(_NoGroups().eval(), torch.randn(2, 8), ratio=0.5)


def test_not_a_module():
    with pytest.raises(errors.InputError, match="nn.Module"):
        upop_fx.compress(lambda x: x, torch.randn(2, 8), ratio=0.5)


def test_all_errors_are_upop_errors():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.UPopError)


@pytest.mark.parametrize("train_mode", [False, True])
def test_caller_model_bitwise_unchanged_on_success(encoder, train_mode):
    model, x = encoder
    model.train(train_mode)
    before = _state(model)
    copy_before = copy.deepcopy(model)
    result = upop_fx.compress(model, x, ratio=0.5, search_steps=4, retrain_steps=2)
    _assert_unchanged(model, before, train_mode)
    assert result.report.params_after < result.report.params_before
    # the caller's model still computes what it computed
    model.eval(), copy_before.eval()
    torch.testing.assert_close(model(x), copy_before(x), rtol=0, atol=0)


def test_caller_model_unchanged_on_failure(encoder):
    model, _ = encoder
    before = _state(model)
    with pytest.raises(errors.InputError):
        upop_fx.compress(model, torch.randn(2, 10, 17), ratio=0.5)
    _assert_unchanged(model, before, False)
