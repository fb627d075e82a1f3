"""Training data is streamed, the caller's RNG is untouched, Hugging Face batches bring their own loss."""

from __future__ import annotations

import logging

import pytest
import torch

import upop_fx
from upop_fx.training.loop import Batches


def _tiny():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    return torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()


class Counting(torch.utils.data.Dataset):
    """100,000 items, made on demand; counts how many were read."""

    def __init__(self, n: int = 100_000) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        g = torch.Generator().manual_seed(i)
        return torch.randn(5, 16, generator=g)


def test_a_dataloader_is_streamed_not_materialised():
    data = Counting()
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    result = upop_fx.compress(_tiny(), torch.randn(2, 5, 16), 0.5, data=loader, search_steps=6, retrain_steps=4,
                              interval=2, calibration_batches=2)
    # the search reads 6 batches; the calibration starts a fresh epoch and reads 2, the retrain another and reads 4
    assert data.reads == 2 * (6 + 2 + 4), data.reads
    assert len(result.losses["search"]) == 6 and len(result.losses["retrain"]) == 4


def test_ten_steps_read_ten_batches():
    data = Counting()
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    upop_fx.compress(_tiny(), torch.randn(2, 5, 16), 0.5, "magnitude", data=loader, retrain_steps=10,
                     calibration_batches=3)
    assert data.reads == 4 * (3 + 10)


def test_a_one_shot_iterator_is_read_once_across_search_and_retrain():
    seen = []

    def gen():
        for i in range(9):
            seen.append(i)
            yield torch.randn(2, 5, 16)

    result = upop_fx.compress(_tiny(), torch.randn(2, 5, 16), 0.5, data=gen(), search_steps=4, retrain_steps=3,
                              interval=2, calibration_batches=2)  # 4 + 2 (after the search) + 3
    assert seen == list(range(9)) and len(result.losses["retrain"]) == 3


def test_a_one_shot_iterator_that_runs_out_says_so():
    def gen():
        yield from (torch.randn(2, 5, 16) for _ in range(5))

    with pytest.raises(upop_fx.InputError, match="ran out after 5 batches"):
        upop_fx.compress(_tiny(), torch.randn(2, 5, 16), 0.5, data=gen(), search_steps=4, retrain_steps=3,
                         interval=2)


def test_a_short_iterator_of_known_length_is_refused_before_training(caplog):
    batches = iter([torch.randn(2, 5, 16)] * 5)
    with caplog.at_level(logging.INFO, logger="upop_fx"), pytest.raises(upop_fx.InputError, match="5 batches left"):
        upop_fx.compress(_tiny(), torch.randn(2, 5, 16), 0.5, data=batches, search_steps=4, retrain_steps=3)
    assert not [r for r in caplog.records if "step" in r.getMessage()]  # no training step ran


@pytest.mark.parametrize("data", [[], iter([])], ids=["empty-list", "empty-iterator"])
def test_empty_data_is_refused_before_training(data):
    with pytest.raises(upop_fx.InputError, match="data is empty"):
        upop_fx.compress(_tiny(), torch.randn(2, 5, 16), 0.5, data=data, search_steps=2, retrain_steps=0)


def test_not_iterable_data_is_refused():
    with pytest.raises(upop_fx.InputError, match="iterable"):
        upop_fx.compress(_tiny(), torch.randn(2, 5, 16), 0.5, data=3, search_steps=2)


def test_batches_continue_a_one_shot_iterator_and_restart_a_list():
    one_shot = Batches(iter(range(5)), None)
    one_shot.require(5)
    assert list(one_shot.take(2)) == [0, 1] and list(one_shot.take(3)) == [2, 3, 4]
    again = Batches([0, 1, 2], None)
    again.require(4)
    assert list(again.take(4)) == [0, 1, 2, 0] and list(again.take(2)) == [0, 1]


@pytest.mark.parametrize("method", ["upop", "magnitude"])
def test_the_global_rng_state_is_untouched(method):
    model, x = _tiny(), torch.randn(2, 5, 16)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    upop_fx.compress(model, x, 0.5, method, search_steps=3, retrain_steps=2, seed=7)
    assert torch.equal(torch.get_rng_state(), before)


def test_upop_constructor_leaves_the_rng_alone():
    model = _tiny()
    x = torch.randn(2, 5, 16)
    before = torch.get_rng_state()
    upop_fx.UPop(model, x, 0.5, search_steps=2, seed=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_hugging_face_labels_give_the_task_loss():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    batch = {"input_ids": torch.randint(0, 50, (4, 8)), "labels": torch.tensor([0, 1, 2, 1])}
    with torch.no_grad():
        want = model(**batch).loss.item()
    result = upop_fx.compress(model, batch, 0.5, data=[batch], search_steps=2, retrain_steps=1, interval=1, lr=0.0)
    assert result.losses["search"][0] == pytest.approx(want, rel=1e-5)  # the model's own cross-entropy


def test_progress_bars_stay_off_a_non_terminal(capsys):
    upop_fx.compress(_tiny(), torch.randn(2, 5, 16), 0.5, search_steps=3, retrain_steps=2, interval=1)
    err = capsys.readouterr().err
    assert "upop search" not in err and "retrain" not in err
