"""Reconstruction after the cut, the retrain's guard and the distillation loss.

The per-layer errors :func:`reconstruct` reports are checked against an independent computation: every node's
value recorded by ``torch.fx.Interpreter`` on the dense and the cut graphs, the residual sums compared directly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import upop_fx
from upop_fx.compare import relative_error
from upop_fx.passes import FindGroups, Surgery
from upop_fx.training.loop import VARIANCE_FLOOR, distillation_loss
from upop_fx.training.reconstruct import input_norms, reconstruct, refit_sites

from .models import ZOO, ZooModel, _pixels, _tokens

MODELS = ["bert", "gpt2", "llama", "timm_vit"]  # linear and addmm (Conv1D) layers; post- and pre-norm residuals


def _values(gm: torch.fx.GraphModule, inputs) -> dict[str, torch.Tensor]:
    """Every node's value (by name) when ``gm`` runs ``inputs``."""
    args, kwargs = ZooModel.split(inputs)
    flat = torch.fx._pytree.tree_flatten_spec((args, kwargs), gm.graph._codegen.pytree_info.in_spec)
    env: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            env[n.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*flat)
    return env


def _batches(zoo, n: int) -> list:
    """``n`` calibration batches shaped like the zoo model's example (text: token ids; images: pixels)."""
    ex = zoo.example_inputs
    if isinstance(ex, dict):
        batch, seq = ex["input_ids"].shape
        return [{**ex, **_tokens(batch, seq, seed=100 + i)} for i in range(n)]
    return [(_pixels(ex[0].shape[0], seed=100 + i, size=ex[0].shape[-1]),) for i in range(n)]


def _cut(name: str):
    zoo = ZOO[name]()
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    groups = FindGroups()(cap.gm).value.prunable
    keep = {g.id: [c for c in range(g.width) if (c % g.head_dim if g.heads else c) % 3 != 1] for g in groups}
    return zoo, cap.gm, Surgery(keep)(cap.gm).gm


def _real(batch, t: torch.Tensor) -> torch.Tensor:
    """The (batch, tokens, features) value's rows at the batch's real tokens (the zoo's text batches pad their last
    row)."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return t[mask.bool()] if mask is not None else t.reshape(-1, t.shape[-1])


def _site_error(dense: torch.fx.GraphModule, small: torch.fx.GraphModule, site, batches) -> float:
    """The residual sum's error at ``site`` on the real tokens, over the centred spread of its target, computed
    from node values."""
    num = 0.0
    ys = []
    for b in batches:
        d, s = _values(dense, b), _values(small, b)
        target = _real(b, d[site.dense_add.name] - s[site.residual.name])
        got = _real(b, s[site.small_add.name] - s[site.residual.name])
        num += float((got - target).double().pow(2).sum())
        ys.append(target.double())
    y = torch.cat(ys)
    return num / float((y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("name", MODELS)
def test_reconstruct_lowers_each_layers_error_and_reports_it_exactly(name):
    zoo, dense, small = _cut(name)
    batches = _batches(zoo, 8)
    before_dense = {k: v.clone() for k, v in dense.state_dict().items()}
    before_small = {k: v.clone() for k, v in small.state_dict().items()}
    code = (dense.code, small.code)
    sites = refit_sites(dense, small)
    assert sites and all(s.residual is not None for s in sites)
    first_before = _site_error(dense, small, sites[0], batches)

    fits = reconstruct(dense, small, batches)

    assert [f.weight for f in fits] == [s.weight for s in sites]
    applied = [f for f in fits if f.ridge is not None]
    assert applied, "no layer re-fitted"
    for f in fits:  # applied: lower on all the batches and on the held-out ones; else left as cut
        if f.ridge is not None:
            assert f.after < f.before and f.held_after < f.held_before, f
        else:
            assert f.after == f.before and f.held_after >= f.held_before, f
    assert math.isclose(fits[0].before, first_before, rel_tol=1e-5)
    for site, fit in zip(sites, fits):  # each layer was fitted after the ones before it: the final weights give it
        assert math.isclose(_site_error(dense, small, site, batches), fit.after, rel_tol=1e-4, abs_tol=1e-7)
    # the dense graph is untouched; of the cut graph, only the re-fitted layers changed; both graphs restored
    assert all(torch.equal(v, before_dense[k]) for k, v in dense.state_dict().items())
    refitted = {f.weight for f in applied} | {s.bias for s, f in zip(sites, fits) if s.bias and f.ridge is not None}
    for k, v in small.state_dict().items():
        assert torch.equal(v, before_small[k]) != (k in refitted), k
    assert (dense.code, small.code) == code
    small.graph.lint()


def test_reconstruct_is_deterministic_and_leaves_uncut_layers():
    zoo, dense, small = _cut("bert")
    twin = copy.deepcopy(small)
    batches = _batches(zoo, 4)
    reconstruct(dense, small, batches)
    reconstruct(dense, twin, batches)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), twin.state_dict().values()))
    # an uncut model has nothing to re-fit
    assert reconstruct(dense, copy.deepcopy(dense), batches) == []


@pytest.mark.parametrize("name", ["bert", "gpt2"])  # linear on (batch, tokens, features); Conv1D's 2-D addmm
def test_padded_positions_are_no_rows_of_the_fits(name):
    """The same batches with other tokens at their padded positions (the mask unchanged): the real tokens' values
    are the same, so are the fits, on as many rows as there are real tokens, and the activation score's input
    norms."""
    zoo, dense, small = _cut(name)
    batches = _batches(zoo, 8)
    other = []
    for i, b in enumerate(batches):
        ids = b["input_ids"].clone()
        pad = b["attention_mask"] == 0
        ids[pad] = torch.randint(3, 50, (int(pad.sum()),), generator=torch.Generator().manual_seed(i))
        other.append({**b, "input_ids": ids})
    twin = copy.deepcopy(small)
    fits = [reconstruct(dense, small, batches), reconstruct(dense, twin, other)]
    assert fits[0] and all(f.rows == sum(int(b["attention_mask"].sum()) for b in batches) for f in fits[0])
    for a, b in zip(*fits):
        assert a.ridge == b.ridge and math.isclose(a.after, b.after, rel_tol=1e-4), (a, b)
    for (k, a), b in zip(small.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k
    norms = [input_norms(dense, batches), input_norms(dense, other)]  # the activation score's norms alike
    assert norms[0].keys() == norms[1].keys() and all(torch.allclose(norms[0][k], norms[1][k], rtol=1e-5)
                                                      for k in norms[0])


def test_compress_reconstructs_by_default_with_data_and_the_module_follows():
    zoo = ZOO["bert"]()
    data = _batches(zoo, 8)
    kwargs = dict(ratio=0.5, method="magnitude", retrain_steps=0, data=data, calibration_batches=8)
    result = upop_fx.compress(zoo.model, zoo.example_inputs, **kwargs)
    plain = upop_fx.compress(zoo.model, zoo.example_inputs, reconstruct=False, **kwargs)
    assert result.report.reconstruction and not plain.report.reconstruction
    assert all(f["after"] < f["before"] for f in result.report.reconstruction if f["ridge"] is not None)
    assert "reconstruction:" in result.report.table()
    assert "reconstruction" in result.report.seconds and "reconstruction" not in plain.report.seconds
    dense = zoo.call(zoo.example_inputs).last_hidden_state
    err = relative_error(result.model(**zoo.example_inputs).last_hidden_state, dense)
    err_plain = relative_error(plain.model(**zoo.example_inputs).last_hidden_state, dense)
    assert err < err_plain
    torch.testing.assert_close(plain.model(**zoo.other_inputs), plain.reference()(**zoo.other_inputs))
    assert result.module is not None  # rebuilt from the re-fitted weights, verified equal to the graph
    torch.testing.assert_close(result.module(**zoo.other_inputs).last_hidden_state,
                               result.model(**zoo.other_inputs).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_retrain_never_ends_worse_than_the_cut_on_its_check_batches():
    zoo = ZOO["bert"]()
    data = [zoo.example_inputs, zoo.other_inputs] * 4
    kwargs = dict(ratio=0.5, method="magnitude", data=data, calibration_batches=2, reconstruct=False)
    cut = upop_fx.compress(zoo.model, zoo.example_inputs, retrain_steps=0, **kwargs)
    wrecked = upop_fx.compress(zoo.model, zoo.example_inputs, retrain_steps=10, lr=1.0, **kwargs)  # lr 1: ruinous
    check = wrecked.report.retrain_check
    assert [int(s) for s, _ in check] == [0, 2, 4, 6, 8, 10]  # before the first step, then every fifth of them
    assert min(v for _, v in check) == check[0][1] < check[-1][1]
    torch.testing.assert_close(wrecked.model(**zoo.other_inputs), cut.model(**zoo.other_inputs))  # the cut kept
    assert "kept" in wrecked.report.table()
    assert list(wrecked.report.seconds)[-1] == "retrain" and "retrain" not in cut.report.seconds


@pytest.mark.parametrize("best, distil", [("cut", True), ("end", False)])
def test_a_retrain_score_is_what_the_guard_keeps_the_best_weights_by(best, distil):
    """``retrain_score``: the guard follows the caller's score (higher is better) instead of the check loss. Scored
    by closeness to the cut's weights the retrain keeps the cut; scored by distance from them it keeps the last
    weights, even where the check loss rose. The score reads the module of the caller's class, also where the
    graph trains (layer-wise distillation: the graph's weights copied in first)."""
    zoo = ZOO["bert"]()
    data = [zoo.example_inputs, zoo.other_inputs] * 4
    kwargs = dict(ratio=0.5, method="magnitude", data=data, calibration_batches=2, reconstruct=False)
    if not distil:  # a loss of the caller's: the module trains
        kwargs |= dict(data=[(x, None) for x in data], loss_fn=lambda out, _: out.last_hidden_state.pow(2).mean())
    cut = upop_fx.compress(zoo.model, zoo.example_inputs, retrain_steps=0, **kwargs)
    start = cut.module.encoder.layer[0].intermediate.dense.weight.detach().clone()
    seen = []

    def score(model):
        seen.append((type(model), model.training, torch.is_grad_enabled()))
        moved = float((model.encoder.layer[0].intermediate.dense.weight - start).norm())
        return -moved if best == "cut" else moved

    result = upop_fx.compress(zoo.model, zoo.example_inputs, retrain_steps=10, lr=1.0, retrain_score=score, **kwargs)
    report = result.report
    assert report.retrain_scored and [int(s) for s, _ in report.retrain_check] == [0, 2, 4, 6, 8, 10]
    assert seen == [(type(zoo.model), False, False)] * 6  # the module, in eval mode, without gradients
    scores = [-v for _, v in report.retrain_check]
    weight = result.module.encoder.layer[0].intermediate.dense.weight
    if best == "cut":
        assert scores[0] == 0.0 == max(scores)
        torch.testing.assert_close(weight, start)
        torch.testing.assert_close(result.model(**zoo.other_inputs), cut.model(**zoo.other_inputs))
    else:
        assert scores[-1] == max(scores) > 0 and not torch.equal(weight, start)
    assert "retrain: score " in report.table()
    with pytest.raises(upop_fx.ConfigError, match="retrain_score must be a callable"):
        upop_fx.compress(zoo.model, zoo.example_inputs, retrain_score=0.5, **kwargs)


def test_the_cosine_retrain_warms_up_then_decays_to_zero(monkeypatch):
    """retrain_schedule="cosine": each retrain step's learning rate is lr x lr_factor, a linear warm-up over the
    first tenth of the steps then a cosine decay to 0; "constant" (the default) keeps lr."""
    from upop_fx.training.loop import lr_factor

    seen: list[float] = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    zoo = ZOO["bert"]()
    data = [zoo.example_inputs, zoo.other_inputs] * 15
    kwargs = dict(ratio=0.5, method="magnitude", data=data, calibration_batches=2, retrain_steps=20, lr=1e-3)
    upop_fx.compress(zoo.model, zoo.example_inputs, retrain_schedule="cosine", **kwargs)
    assert seen == pytest.approx([1e-3 * lr_factor("cosine", i, 20) for i in range(20)])
    assert seen[0] == pytest.approx(5e-4) and max(seen) == pytest.approx(1e-3) and seen[-1] == 0.0
    seen.clear()
    upop_fx.compress(zoo.model, zoo.example_inputs, **kwargs)
    assert seen == [1e-3] * 20
    with pytest.raises(upop_fx.ConfigError, match="retrain_schedule must be one of"):
        upop_fx.compress(zoo.model, zoo.example_inputs, retrain_schedule="linear", **kwargs)


def test_distillation_loss_weighs_features_by_their_spread_and_logits_by_kl():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4, 6, 8, generator=gen) * torch.linspace(0.5, 2, 8)
    s = t + 0.1 * torch.randn(4, 6, 8, generator=gen)
    base = distillation_loss(s, t)
    offset, scale = 100 * torch.randn(8, generator=gen), torch.rand(8, generator=gen) + 0.5
    # what every input shares does not count, and each feature is measured in its own spread
    torch.testing.assert_close(distillation_loss(s + offset, t + offset), base, rtol=1e-4, atol=0)
    torch.testing.assert_close(distillation_loss(s * scale, t * scale), base, rtol=1e-4, atol=0)
    var = t.reshape(-1, 8).var(0, unbiased=False).clamp_min(VARIANCE_FLOOR * float(t.reshape(-1, 8).var(0, unbiased=False).mean()))
    torch.testing.assert_close(base, ((s - t).reshape(-1, 8) ** 2 / var).mean())
    assert float(distillation_loss(t, t)) == 0.0

    from transformers.modeling_outputs import CausalLMOutput

    logits_t, logits_s = torch.randn(2, 3, 11, generator=gen), torch.randn(2, 3, 11, generator=gen)
    kl = (logits_t.softmax(-1) * (logits_t.log_softmax(-1) - logits_s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(CausalLMOutput(logits=logits_s), CausalLMOutput(logits=logits_t)), kl)
    torch.testing.assert_close(distillation_loss(CausalLMOutput(logits=logits_s + 3.0), CausalLMOutput(logits=logits_s)),
                               torch.tensor(0.0), atol=1e-6, rtol=0)


def test_the_dense_targets_of_every_layer_come_from_one_dense_forward(monkeypatch):
    """The dense model does not change while the cut one is re-fitted: its residual stream after every site is
    recorded in few forwards per batch (one site first, to learn a site's size, then as many as half its
    parameters' memory holds), not in a forward up to each site — and the fits are the same as with one dense
    forward per site."""
    import upop_fx.training.reconstruct as rc

    zoo = ZOO["bert"]()
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    keep = {g.id: list(range(0, g.width, 2)) for g in FindGroups()(cap.gm).value.prunable}
    small = Surgery(keep)(cap.gm).gm
    data = _batches(zoo, 4)
    calls = []
    record = rc._record

    def counting(gm, nodes, batches, **kwargs):
        calls.append((gm is cap.gm, len(nodes)))
        return record(gm, nodes, batches, **kwargs)

    monkeypatch.setattr(rc, "_record", counting)
    batched = copy.deepcopy(small)
    fits = reconstruct(cap.gm, batched, data)
    assert len(fits) == 4 and [c for c in calls if c[0]] == [(True, 1), (True, 3)]  # the first learns the size
    placeholders = len([n for n in small.graph.nodes if n.op == "placeholder"])
    assert [c for c in calls if not c[0]] == [(False, placeholders)]  # the cut model: one resumed run per batch
    init = rc._DenseTargets.__init__

    def per_site(self, *args):  # noqa: ANN001, ANN202 - a budget of nothing: one site per dense forward
        init(self, *args)
        self.budget = 0

    monkeypatch.setattr(rc._DenseTargets, "__init__", per_site)
    calls.clear()
    one_by_one = copy.deepcopy(small)
    assert [f.after for f in reconstruct(cap.gm, one_by_one, data)] == [f.after for f in fits]
    assert calls.count((True, 1)) == 4
    for a, b in zip(batched.state_dict().values(), one_by_one.state_dict().values()):
        assert torch.equal(a, b)


def test_the_cut_model_runs_once_per_batch_across_its_sites_and_fits_as_a_forward_per_site(monkeypatch):
    """The cut model's inputs to each site come from one run per calibration batch, resumed site after site with
    the weights re-fitted so far: the fits are bitwise those of a fresh forward up to each site."""
    import upop_fx.training.reconstruct as rc

    zoo = ZOO["llama"]()
    cap = upop_fx.capture(zoo.model, zoo.example_inputs)
    keep = {g.id: list(range(0, g.width, 2)) for g in FindGroups()(cap.gm).value.prunable if g.kind == "mlp"}
    small = Surgery(keep)(cap.gm).gm
    data = _batches(zoo, 6)  # enough real tokens for both fits to pass their held-out check
    resumed = copy.deepcopy(small)
    fits = reconstruct(cap.gm, resumed, data)
    assert len(fits) == 2 and all(f.after < f.before for f in fits)
    monkeypatch.setattr(rc._CutRuns, "until", lambda self, stop, want: None)  # a forward up to each site
    fresh = copy.deepcopy(small)
    assert [f.after for f in reconstruct(cap.gm, fresh, data)] == [f.after for f in fits]
    for a, b in zip(resumed.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_the_retrains_check_batches_are_not_the_ones_reconstruction_fits_on():
    from upop_fx.pipeline import fit_and_check

    batches = [{"i": i} for i in range(8)]
    fit, check = fit_and_check(batches, batches, split=True)
    assert check == [batches[3], batches[7]] and fit == [b for b in batches if b not in check]
    assert fit_and_check(batches, batches, split=False) == (batches, batches)
    assert fit_and_check(batches[:1], batches[:1], split=True) == (batches[:1], batches[:1])
    zoo = ZOO["bert"]()
    data = _batches(zoo, 12)
    kwargs = dict(ratio=0.5, method="magnitude", data=data, calibration_batches=8)
    rows = int(data[0]["attention_mask"].sum())  # the real tokens of each batch (every batch pads alike)
    assert all(int(b["attention_mask"].sum()) == rows for b in data)
    alone = upop_fx.compress(zoo.model, zoo.example_inputs, retrain_steps=0, **kwargs)
    both = upop_fx.compress(zoo.model, zoo.example_inputs, retrain_steps=2, **kwargs)
    assert {f["rows"] for f in alone.report.reconstruction} == {8 * rows}
    assert {f["rows"] for f in both.report.reconstruction} == {6 * rows}
