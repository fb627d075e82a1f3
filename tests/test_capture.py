"""Capture: one shared batch dim for all inputs (with a fallback for models that fix their batch), decoders
captured without their KV cache, the caller's model and config untouched."""

from __future__ import annotations

import pytest
import torch
import transformers

import upop_fx
from upop_fx.passes import FindGroups


class CrossAttend(torch.nn.Module):
    """Cross-attention whose keys/values come from a second input of another width (``kdim``/``vdim``)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(x, memory, memory, need_weights=False)[0]
        return h + self.fc2(torch.relu(self.fc1(h)))


def test_inputs_share_one_batch_dim():
    torch.manual_seed(0)
    model = CrossAttend().eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    cap = upop_fx.capture(model, (x, memory))
    spec = cap.info.dynamic_shapes
    batch_dims = {spec["x"][0], spec["memory"][0]}
    assert len(batch_dims) == 1 and next(iter(batch_dims)).__name__ == "batch"
    other = (torch.randn(3, 4, 32), torch.randn(3, 9, 16))
    torch.testing.assert_close(cap.gm(*other), model(*other))
    kinds = sorted(g.kind for g in FindGroups()(cap.gm).value.prunable)
    assert kinds == ["mlp", "qk", "v"]


class FixedBatch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).reshape(2, -1)  # a literal batch of 2


def test_a_model_that_fixes_its_batch_is_captured_with_automatic_dims(caplog):
    model = FixedBatch().eval()
    x = torch.randn(2, 8)
    with caplog.at_level("INFO", logger="upop_fx"):
        cap = upop_fx.capture(model, x)
    assert "one automatic batch dim per input" in caplog.text
    torch.testing.assert_close(cap.gm(x), model(x))


def test_decoder_is_captured_without_its_cache_and_the_callers_config_is_untouched(caplog):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert model.config.use_cache
    x = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}
    with caplog.at_level("INFO", logger="upop_fx"):
        result = upop_fx.compress(model, x, 0.5, method="magnitude", retrain_steps=0)
    assert "use_cache=False" in caplog.text
    assert model.config.use_cache  # the caller's config is left as it was
    assert result.model(input_ids=torch.randint(0, 100, (3, 5))).logits.shape == (3, 5, 100)


@pytest.mark.parametrize("view", ["transpose", "stride"])
def test_non_contiguous_example_inputs_are_captured_as_contiguous(view):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    x = torch.randn(5, 2, 16).transpose(0, 1) if view == "transpose" else torch.randn(2, 10, 16)[:, ::2]
    assert x.shape == (2, 5, 16) and not x.is_contiguous()
    strides = x.stride()
    cap = upop_fx.capture(layer, x)
    result = upop_fx.compress(layer, x, 0.5, method="magnitude", retrain_steps=0)
    assert x.stride() == strides and not x.is_contiguous()  # the caller's tensor is left as it was
    for batch, seq in [(3, 7), (1, 5)]:
        other = torch.randn(batch, seq, 16)
        torch.testing.assert_close(cap.gm(other), layer(other))
        assert result.model(other).shape == (batch, seq, 16)


class _FixesItsBatch(torch.nn.Module):
    """Reshapes with a literal batch of 2: torch.export cannot keep the batch dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x)))
        return h.reshape(2, -1)  # the line that fixes the batch


def test_a_size_the_model_fixes_is_said_and_refused_by_name(caplog):
    """No silent specialisation: capture says the batch is fixed, the report says so, and the returned graph
    refuses another batch with an InputError naming the size (the sequence axis stays dynamic)."""
    import logging

    x = torch.randn(2, 5, 8)
    with caplog.at_level(logging.INFO, logger="upop_fx"):
        result = upop_fx.compress(_FixesItsBatch(), x, ratio=0.5, method="magnitude", retrain_steps=0)
    import inspect

    lines, first = inspect.getsourcelines(_FixesItsBatch.forward)
    line = first + next(i for i, text in enumerate(lines) if "fixes the batch" in text)
    where = f"{__file__}:{line}: return h.reshape(2, -1)"
    assert f"runs only at batch 2 (input 'x', axis 0, fixed by {where}" in caplog.text
    assert result.report.runs_only_at == [f"batch 2 (input 'x', axis 0, fixed by {where}  # the line that fixes the batch)"]
    assert "runs only at: batch 2" in result.report.table()
    assert result.model(torch.randn(2, 7, 8)).shape == (2, 7 * 8)  # another sequence length: fine
    with pytest.raises(upop_fx.InputError, match="runs only at batch 2 .* got 3"):
        result.model(torch.randn(3, 5, 8))


def test_a_model_with_free_sizes_has_nothing_fixed():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    cap = upop_fx.capture(layer, torch.randn(2, 5, 16))
    assert cap.info.fixed == []


class _Filled(torch.nn.Module):
    """A key assembled as DeepSeek's latent attention does: an empty buffer, a per-head part and a part shared
    by the heads copied into slices of it. ``early``: the buffer is read before the last copy."""

    def __init__(self, early: bool = False, gap: bool = False) -> None:
        super().__init__()
        self.early, self.gap = early, gap
        self.per_head, self.shared = torch.nn.Linear(8, 4 * 6), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        part = self.per_head(x).view(b, t, 4, 6).transpose(1, 2)
        shared = self.shared(x).view(b, 1, t, 2).expand(-1, 4, -1, -1)
        key = part.new_empty(b, 4, t, 8)
        key[..., : 6 if not self.gap else 5].copy_(part[..., : 6 if not self.gap else 5])
        seen = key.sum() if self.early else 0
        key[..., 6:].copy_(shared)
        return key * 2 + seen


@pytest.mark.parametrize("early,gap,rewritten", [(False, False, True), (True, False, False), (False, True, False)],
                         ids=["filled", "read-before-full", "not-covering"])
def test_a_buffer_filled_by_slice_copies_is_captured_as_the_cat_of_its_pieces(early, gap, rewritten):
    """Covering writes before any read: the graph holds ``cat`` instead of ``new_empty`` + ``copy_`` (the same
    values, and channels a rule can follow). A read before the buffer is full, or writes that leave a gap, keep
    the graph as torch.export gave it."""
    from upop_fx.capture.filled_buffers import fill_to_cat

    model = _Filled(early, gap).eval()
    x = torch.randn(2, 5, 8)
    gm = torch.export.export(model, (x,)).module()
    assert (fill_to_cat(gm) == 1) is rewritten
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert (torch.ops.aten.cat.default in targets) is rewritten
    assert (torch.ops.aten.new_empty.default in targets) is not rewritten
    if rewritten:  # (the other two read uninitialised memory: nothing to compare)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_another_size_on_an_axis_capture_keeps_static_is_refused_by_name():
    """Axes other than the batch and the sequence are captured at the example's size: another size there (an
    image of another resolution, a feature width) is an InputError naming the input, the axis and the size,
    instead of torch's guard failure; batch and sequence still vary."""
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    cap = upop_fx.capture(layer, torch.randn(2, 5, 16))
    assert [(f.input, f.axis, f.size, f.asked) for f in cap.info.static] == [("src", 2, 16, False)]
    assert cap.gm(torch.randn(3, 7, 16)).shape == (3, 7, 16)
    with pytest.raises(upop_fx.InputError, match="captured at size 16 on axis 2 of input 'src', got 12"):
        cap.gm(torch.randn(3, 7, 12))
    result = upop_fx.compress(layer, torch.randn(2, 5, 16), ratio=0.5, method="magnitude", retrain_steps=0)
    with pytest.raises(upop_fx.InputError, match="captured at size 16 on axis 2"):
        result.model(torch.randn(2, 5, 12))
