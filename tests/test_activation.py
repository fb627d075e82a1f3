"""The activation-weighted one-shot importance, against |W|·‖X‖ computed from the module's own forward hooks."""

from __future__ import annotations

import numpy as np
import torch

import upop_fx
from upop_fx.ir.entries import build_entries
from upop_fx.passes import FindGroups
from upop_fx.search.activation import activation_scores
from upop_fx.search.magnitude import magnitude_scores
from upop_fx.training.reconstruct import input_norms


def _layer() -> torch.nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    with torch.no_grad():  # neuron 5: the largest weights, and never active (ReLU of a very negative input)
        layer.linear1.weight[5] = 3.0
        layer.linear1.bias[5] = -1e4
        layer.linear2.weight[:, 5] = 3.0
    return layer


def _hooked_norms(layer: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
        return fn

    handles = [layer.linear1.register_forward_pre_hook(hook("linear1")),
               layer.linear2.register_forward_pre_hook(hook("linear2"))]
    with torch.no_grad():
        for b in batches:
            layer(b)
    for h in handles:
        h.remove()
    return {k: v.sqrt() for k, v in sums.items()}


def test_activation_scores_equal_weights_times_input_norms():
    layer = _layer()
    batches = [torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cap = upop_fx.capture(layer, batches[0])
    analysis = FindGroups()(cap.gm).value
    _, entries = build_entries(analysis, "upop", "params")
    norms = input_norms(cap.gm, batches)
    hooked = _hooked_norms(layer, batches)
    torch.testing.assert_close(norms["linear1.weight"], hooked["linear1"])
    torch.testing.assert_close(norms["linear2.weight"], hooked["linear2"])

    scores = activation_scores(cap.gm, analysis, entries, norms)
    mlp = next(g for g in analysis.prunable if g.kind == "mlp")
    w2 = layer.linear2.weight.detach().double()
    expected = hooked["linear2"] * w2.abs().sum(0) / 16  # what each neuron adds to linear2's output
    qk = next(g for g in analysis.prunable if g.kind == "qk")  # consumed by the scores: its producing rows count
    assert qk.consumers == [] or all(u[0] not in norms for u in qk.consumers)
    got = {next(iter(e.channels.values()))[0]: scores[i] for i, e in enumerate(entries) if mlp.id in e.channels}
    np.testing.assert_allclose([got[c] for c in range(32)], expected.numpy(), rtol=1e-6)

    # the dead neuron: first by magnitude, nothing by activation
    by_mag = magnitude_scores(cap.gm, analysis, entries)
    mlp_entries = [i for i, e in enumerate(entries) if mlp.id in e.channels]
    dead = next(i for i in mlp_entries if next(iter(entries[i].channels.values()))[0] == 5)
    assert by_mag[dead] == max(by_mag[mlp_entries])
    assert scores[dead] == 0.0 < min(np.delete(scores[mlp_entries], mlp_entries.index(dead)))


def test_compress_activation_prunes_the_dead_neuron_and_reads_the_calibration_batches():
    layer = _layer()
    batches = [torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = upop_fx.compress(layer, batches[0], 0.25, "activation", data=batches, calibration_batches=3,
                              retrain_steps=0, allocate="uniform", reconstruct=False)
    magnitude = upop_fx.compress(layer, batches[0], 0.25, "magnitude", retrain_steps=0, allocate="uniform")
    mlp = next(g.id for g in result.analysis.prunable if g.kind == "mlp")
    assert 5 not in result.keep[mlp] and 5 in magnitude.keep[mlp]
    assert result.report.method == "activation"
    torch.testing.assert_close(result.model(batches[1]), result.reference()(batches[1]))


def test_upop_first_marking_by_activation_ranks_on_the_calibration_batches_read_before_the_search():
    """first_marking="activation": the calibration batches are read first (from a stream, the search trains on the
    batches after them) and the step-0 marking is the activation-weighted ranking on them; with one search step that marking is
    the cut, so the dead neuron (largest weights, never active) goes, where the magnitude marking keeps it."""
    from upop_fx import pipeline
    from upop_fx.search.upop import UPopSearch

    layer = _layer()
    batches = [torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    seen = {}  # Recording reads one batch more than the run: the stream's next one when the search starts

    class Recording(UPopSearch):
        def select(self, prepared, batches_, objective):
            seen["calibration"] = prepared.calibration
            seen["first_search_batch"] = next(iter(batches_.take(1)))
            return super().select(prepared, batches_, objective)

    common = dict(ratio=0.25, search_steps=1, interval=1, calibration_batches=3, retrain_steps=0,
                  allocate="uniform", reconstruct=False)
    by_activation = pipeline.run(layer, batches[0], Recording(), data=iter(batches), first_marking="activation",
                                 **common)
    assert [b is x for b, x in zip(seen["calibration"], batches[:3])] == [True] * 3
    assert seen["first_search_batch"] is batches[3]
    by_magnitude = pipeline.run(layer, batches[0], Recording(), data=iter(batches), **common)
    assert seen["first_search_batch"] is batches[0]  # the default reads them after the search
    mlp = next(g.id for g in by_activation.analysis.prunable if g.kind == "mlp")
    assert 5 not in by_activation.keep[mlp] and 5 in by_magnitude.keep[mlp]
    expected = upop_fx.compress(layer, batches[0], 0.25, "activation", data=batches, calibration_batches=3,
                                retrain_steps=0, allocate="uniform", reconstruct=False)
    assert by_activation.keep == expected.keep  # the same ranking as the one-shot method on the same batches
