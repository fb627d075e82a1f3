"""Mixed precision: the search and the retrain under bf16 and fp16 autocast; mask gradients unscaled and
accumulated in float64; keep-sets close to fp32."""

from __future__ import annotations

import pytest
import torch

import upop_fx
from upop_fx.ir.entries import keep_jaccard
from upop_fx.search.upop import UPopSearch

from . import scaleout


def _run(precision: str, seen: list | None = None, **kwargs) -> upop_fx.Result:
    data = scaleout.global_batches()

    def loss(out, target):
        if seen is not None:
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
        return scaleout.mse(out.float(), target)

    return upop_fx.compress(
        scaleout.encoder(), data[0][0], 0.5, data=data, loss_fn=loss, search_steps=scaleout.SEARCH,
        retrain_steps=scaleout.RETRAIN, interval=scaleout.INTERVAL, lr=1e-3, precision=precision,
        calibration_batches=0, **kwargs,
    )  # fmt: skip


def test_bf16_search_runs_under_autocast_and_keeps_nearly_the_fp32_channels():
    seen: list = []
    bf16 = _run("bf16", seen)
    assert len(seen) == scaleout.SEARCH + scaleout.RETRAIN
    assert all(enabled and dtype == torch.bfloat16 for enabled, dtype, _ in seen)
    fp32 = _run("fp32")
    assert bf16.losses["search"] != fp32.losses["search"]  # autocast changed the arithmetic
    assert keep_jaccard(bf16.keep, fp32.keep) >= 0.7
    assert bf16.report.prunable_cost_removed == pytest.approx(fp32.report.prunable_cost_removed, abs=0.05)
    # the small model itself stays in float32
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())


def test_fp16_search_with_a_grad_scaler_runs():
    seen: list = []
    result = _run("fp16", seen)
    assert all(enabled and dtype == torch.float16 for enabled, dtype, _ in seen)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.losses.values())


def _state():
    encoder = scaleout.encoder()
    prepared = upop_fx.pipeline.prepare(encoder, torch.randn(2, 5, scaleout.D), ratio=0.5, search_steps=4, interval=4)
    return UPopSearch().start(prepared)


def test_mask_gradients_are_unscaled_in_float64_before_they_are_accumulated():
    state = _state()
    grads = [torch.randn_like(m) for m in state.masks]
    for m, g in zip(state.masks, grads):
        m.grad = g * 1024.0
    state.step(grad_scale=1024.0)
    for s, g in zip(state.scores, grads):
        assert s.dtype == torch.float64
        torch.testing.assert_close(s, g.double(), rtol=1e-7, atol=0)


def test_a_step_with_non_finite_mask_gradients_is_not_accumulated():
    state = _state()
    for m in state.masks:
        m.grad = torch.full_like(m, float("inf"))
    state.step(grad_scale=65536.0)
    assert all(torch.equal(s, torch.zeros_like(s)) for s in state.scores)


def test_unknown_precision_is_refused_before_capture():
    with pytest.raises(upop_fx.ConfigError, match="precision must be one of fp32, bf16, fp16"):
        upop_fx.compress(None, None, 0.5, precision="int8")
