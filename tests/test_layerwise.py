"""Layer-wise distillation: the taps, the loss against an independent computation, and the retrain through it.

The reference values come from ``torch.fx.Interpreter`` runs of the dense and the cut graphs (every node's value
by name, :func:`tests.test_reconstruct._values`), the per-layer loss written out from its definition.
"""

from __future__ import annotations

import pytest
import torch

import upop_fx
from upop_fx.training.layerwise import LayerwiseDistillation, Taps, residual_points
from upop_fx.training.loop import distillation_loss

from .models import ZOO
from .test_reconstruct import _batches, _cut, _real, _values


def _spread_error(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Each feature's squared error over the teacher's variance of it (floored at 1% of the mean), averaged."""
    t2, s2 = t.reshape(-1, t.shape[-1]).double(), s.reshape(-1, t.shape[-1]).double()
    var = ((t2 - t2.mean(0)) ** 2).mean(0)
    var = torch.maximum(var, torch.full_like(var, 0.01 * float(var.mean())))
    return ((s2 - t2) ** 2 / var).mean()


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_the_layer_loss_is_the_spread_error_of_the_residual_stream_after_each_cut_layer(name):
    zoo, dense, small = _cut(name)
    batch = _batches(zoo, 1)[0]
    code = (dense.code, small.code)
    objective = LayerwiseDistillation(dense, small, weight=0.5)
    with objective:
        with torch.no_grad():
            loss = objective(small, batch)
    assert (dense.code, small.code) == code  # the taps are gone
    points = residual_points(dense, small)
    assert objective.points == len(points) > 0
    d, s = _values(dense, batch), _values(small, batch)
    layers = torch.stack([_spread_error(_real(batch, s[a.name]), _real(batch, d[b.name])) for a, b in points]).mean()
    with torch.no_grad():
        outputs = distillation_loss(small(**batch), dense(**batch), batch["attention_mask"])
    torch.testing.assert_close(loss.double(), outputs.double() + 0.5 * layers, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_padding_is_no_token_to_distil(name):
    """Other tokens at a batch's padded positions (its mask unchanged) change the padded positions' outputs and
    streams, not the real tokens': the output and layer-wise distillation losses are the same; counted with the
    padding they are not."""
    zoo, dense, small = _cut(name)
    batch = _batches(zoo, 1)[0]
    pad = batch["attention_mask"] == 0
    assert pad.any()
    ids = batch["input_ids"].clone()
    ids[pad] = torch.randint(3, 50, (int(pad.sum()),), generator=torch.Generator().manual_seed(0))
    other = {**batch, "input_ids": ids}
    objective = LayerwiseDistillation(dense, small, weight=1.0)
    with objective, torch.no_grad():
        losses = [objective(small, b) for b in (batch, other)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        counted = [distillation_loss(small(**b), dense(**b)) for b in (batch, other)]
    assert not torch.allclose(counted[0], counted[1], rtol=1e-3)


def test_taps_keep_the_values_with_their_gradient_and_only_while_open():
    zoo, dense, small = _cut("bert")
    batch = _batches(zoo, 1)[0]
    points = [a for a, _ in residual_points(dense, small)]
    with Taps(small, points) as taps:
        out = small(**batch)
        values = taps.take()
    assert all(v.requires_grad for v in values)  # the tensors themselves: a loss on them trains earlier layers
    ref = _values(small, batch)
    for n, v in zip(points, values):
        torch.testing.assert_close(v.detach(), ref[n.name])
    torch.testing.assert_close(small(**batch).last_hidden_state, out.last_hidden_state)
    with pytest.raises(RuntimeError, match="did not run the tapped nodes"):
        taps.take()


def test_compress_retrains_layer_wise_and_the_module_takes_the_graphs_weights():
    zoo = ZOO["bert"]()
    data = _batches(zoo, 8)
    # no check batches: the weights of the last step are kept, whatever the losses did
    kwargs = dict(ratio=0.5, method="magnitude", data=data, calibration_batches=0, retrain_steps=4, lr=1e-3)
    cut = upop_fx.compress(zoo.model, zoo.example_inputs, **{**kwargs, "retrain_steps": 0})
    plain = upop_fx.compress(zoo.model, zoo.example_inputs, layer_distillation=0.0, **kwargs)
    layered = upop_fx.compress(zoo.model, zoo.example_inputs, layer_distillation=1.0, **kwargs)
    assert layered.module is not None and type(layered.module) is type(zoo.model)
    assert "_keep" not in layered.model.code  # the taps are gone from the returned graph
    got = layered.module(**zoo.other_inputs).last_hidden_state
    torch.testing.assert_close(got, layered.model(**zoo.other_inputs).last_hidden_state, rtol=1e-4, atol=1e-5)
    outputs = [r.module(**zoo.other_inputs).last_hidden_state for r in (cut, plain)]
    assert not any(torch.allclose(got, o) for o in outputs)  # trained, and on another objective than the outputs'
    assert layered.losses["retrain"][0] > plain.losses["retrain"][0]  # the first step: the same model, a layer term more


def test_a_task_loss_or_a_loss_fn_retrains_without_the_layer_term():
    zoo = ZOO["bert_cls"]()
    labelled = {**zoo.example_inputs, "labels": torch.tensor([0, 1, 0, 1])[: zoo.example_inputs["input_ids"].shape[0]]}
    data = [labelled] * 6
    result = upop_fx.compress(zoo.model, labelled, ratio=0.3, method="magnitude", data=data, retrain_steps=2,
                              calibration_batches=2)
    plain = upop_fx.compress(zoo.model, labelled, ratio=0.3, method="magnitude", data=data, retrain_steps=2,
                             calibration_batches=2, layer_distillation=0.0)
    assert result.report.retrain_check == plain.report.retrain_check


def test_the_search_distils_layer_wise_at_every_residual_write_of_the_masked_graph(monkeypatch):
    from upop_fx.search import upop as search

    seen = []
    real = search.train_steps

    def recording(model, params, objective, *args, **kwargs):
        seen.append(objective)
        return real(model, params, objective, *args, **kwargs)

    monkeypatch.setattr(search, "train_steps", recording)
    zoo = ZOO["bert"]()
    data = _batches(zoo, 8)
    kwargs = dict(ratio=0.5, data=data, search_steps=4, interval=2, retrain_steps=0, calibration_batches=0, lr=1e-3)
    plain = upop_fx.compress(zoo.model, zoo.example_inputs, layer_distillation=0.0, **kwargs)
    layered = upop_fx.compress(zoo.model, zoo.example_inputs, **kwargs)  # the default: 1
    assert not isinstance(seen[0], LayerwiseDistillation)
    # two layers, each with an attention output projection and an MLP second layer writing into the stream
    assert isinstance(seen[1], LayerwiseDistillation) and seen[1].points == 4
    assert layered.losses["search"][0] == pytest.approx(plain.losses["search"][0], abs=1e-6)  # masks 1: the teacher
    assert layered.losses["search"] != plain.losses["search"]
    assert "_keep" not in layered.model.code


def test_a_task_loss_weight_distils_and_adds_the_models_own_loss():
    """With labels, ``task_weight`` > 0: the KL of the class distributions (the ``loss`` output is no output to
    match) plus the weight times the student's own loss; 0: the own loss alone, as before."""
    from upop_fx.training.loop import Distillation, make_objective

    zoo = ZOO["bert_cls"]()
    batch = {**zoo.example_inputs, "labels": torch.tensor([0, 1, 0, 1])[: zoo.example_inputs["input_ids"].shape[0]]}
    student = __import__("copy").deepcopy(zoo.model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
        s, t = student(**batch), zoo.model(**batch)
        mixed = make_objective(None, zoo.model, task_loss=True, task_weight=0.5)
        assert isinstance(mixed, Distillation)
        kl = torch.nn.functional.kl_div(s.logits.log_softmax(-1), t.logits.log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        torch.testing.assert_close(mixed(student, batch), kl + 0.5 * s.loss)
        torch.testing.assert_close(make_objective(None, zoo.model, task_loss=True)(student, batch), s.loss)


def test_compress_with_a_task_loss_weight_distils_layer_wise_with_labels():
    zoo = ZOO["bert_cls"]()
    labelled = {**zoo.example_inputs, "labels": torch.tensor([0, 1, 0, 1])[: zoo.example_inputs["input_ids"].shape[0]]}
    kwargs = dict(ratio=0.3, method="magnitude", data=[labelled] * 6, retrain_steps=2, calibration_batches=2)
    mixed = upop_fx.compress(zoo.model, labelled, task_loss_weight=0.5, layer_distillation=0.0, **kwargs)
    layered = upop_fx.compress(zoo.model, labelled, task_loss_weight=0.5, **kwargs)
    assert mixed.losses["retrain"][0] < layered.losses["retrain"][0]  # the same cut and batch: a layer term more
