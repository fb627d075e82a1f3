"""FuseMaskedAttention: masked q/k/v + SDPA rewritten into the Triton ``masked_attention`` kernel (run here in
Triton's CPU interpreter), equal to the masked graph in outputs and in the gradients of weights and masks.

The kernel needs head dims of 16..128; the zoo's models have head dim 8 (12 for CLIP's vision tower) and stay
unfused, so the models below are zoo-like with 2 heads of 16: nn.TransformerEncoder (packed in_proj,
unflatten/select, implicit scale), BERT with a padded ``attention_mask`` (HF's boolean mask: key padding AND
``q_idx >= 0``), a timm-style ViT (packed qkv, reshape/permute/unbind) and GPT-2 (Conv1D addmm, split, HF's
causal ``kv_idx <= q_idx`` factor and padding). Test inputs differ from the captured example (in length where
the model takes any).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import upop_fx
from upop_fx.ir.entries import build_entries
from upop_fx.ir.groups import get_analysis
from upop_fx.kernels import MASKED_ATTENTION_OP
from upop_fx.passes import FindGroups, InsertMasks
from upop_fx.passes.fuse_attention import FuseMaskedAttention

from . import models as zoo

SDPA = torch.ops.aten.scaled_dot_product_attention.default
GRANULARITIES = ("upop", "qk_v", "heads")


def _hf(kind: str):
    import transformers

    torch.manual_seed(0)
    text = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=zoo.VOCAB, hidden_size=32, attn_implementation="sdpa", **text)
        return transformers.BertModel(cfg)
    cfg = transformers.GPT2Config(vocab_size=zoo.VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2, n_inner=64,
                                  bos_token_id=1, eos_token_id=zoo.EOS, use_cache=False, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg)


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)


def _vit():
    torch.manual_seed(0)
    return zoo.TimmViT(img=16, patch=8, depth=1, num_heads=2)  # 5 tokens


# name -> (model factory, example inputs, test inputs: other values and length, attention sites); one layer
# where one shows the pattern, two for BERT (one padding mask shared by both sites); batch 2 keeps it quick
MODELS = {
    "encoder": (_encoder, (torch.randn(2, 8, 32, generator=zoo._gen(1)),), (torch.randn(2, 6, 32, generator=zoo._gen(2)),), 1),
    "bert": (lambda: _hf("bert"), zoo._tokens(2, 8, 1), zoo._tokens(2, 6, 2), 2),
    "timm_vit": (_vit, (zoo._pixels(2, 1, 16),), (zoo._pixels(2, 2, 16),), 1),
    "gpt2": (lambda: _hf("gpt2"), zoo._tokens(2, 8, 1), zoo._tokens(2, 6, 2), 1),
}
_CAPTURED: dict[str, upop_fx.Captured] = {}


def _captured(name: str) -> upop_fx.Captured:
    if name not in _CAPTURED:
        factory, example, _, _ = MODELS[name]
        cap = upop_fx.capture(factory().eval(), example)
        FindGroups()(cap.gm)
        _CAPTURED[name] = cap
    return _CAPTURED[name]


def _call(module, inputs):
    return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


def _masked(cap: upop_fx.Captured, granularity: str) -> torch.fx.GraphModule:
    masked = InsertMasks(*build_entries(get_analysis(cap.gm), granularity))(cap.gm).gm
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # in (0, 1], not all ones: the mask gradients are not trivial
        for m in masked.upop_masks.parameters():
            m.copy_(1.0 - 0.95 * torch.rand(m.shape, generator=gen))
    return masked


def _forward_backward(gm: torch.fx.GraphModule, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gm.zero_grad(set_to_none=True)
    out = torch.utils._pytree.tree_leaves(_call(gm, inputs))[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in gm.named_parameters() if p.grad is not None}


def _assert_same_function(masked: torch.fx.GraphModule, fused: torch.fx.GraphModule, inputs) -> None:
    out_m, grads_m = _forward_backward(masked, inputs)
    out_f, grads_f = _forward_backward(fused, inputs)
    torch.testing.assert_close(out_f, out_m, rtol=1e-4, atol=1e-5)
    assert grads_f.keys() == grads_m.keys()
    masks = [k for k in grads_m if k.startswith("upop_masks.")]
    assert masks and all(grads_m[k].abs().max() > 0 for k in masks)
    for k, g in grads_m.items():  # (k biases get ~1e-9 noise where the exact gradient is 0)
        torch.testing.assert_close(grads_f[k], g, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().max().item()), msg=k)


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", ["encoder", "bert", "timm_vit"])
def test_fused_equals_masked(name, granularity):
    masked = _masked(_captured(name), granularity)
    fused = copy.deepcopy(masked)
    result = FuseMaskedAttention(force=True)(fused)
    assert result.modified and result.gm is fused  # in place
    sites = MODELS[name][3]
    assert len(result.value.fused) == sites and not result.value.skipped
    targets = _targets(fused)
    assert SDPA not in targets and targets.count(MASKED_ATTENTION_OP) == sites
    fused.graph.lint()
    read = {n.target for n in fused.graph.nodes if n.op == "get_attr" and n.target.startswith("upop_masks.m")}
    assert read == {f"upop_masks.{k}" for k, _ in masked.upop_masks.named_parameters()}  # every mask still read
    dead = [n for n in fused.graph.nodes if n.op == "call_function" and not n.users and not n.is_impure()]
    dead_before = [n for n in masked.graph.nodes if n.op == "call_function" and not n.users and not n.is_impure()]
    assert len(dead) == len(dead_before)  # nothing left behind
    _assert_same_function(masked, fused, MODELS[name][2])
    again = FuseMaskedAttention(force=True)(fused)
    assert not again.modified and not again.value.fused


def test_gpt2_causal_and_padding():
    masked = _masked(_captured("gpt2"), "qk_v")
    fused = copy.deepcopy(masked)
    result = FuseMaskedAttention(force=True)(fused)
    assert len(result.value.fused) == 1
    calls = [n for n in fused.graph.nodes if n.target is MASKED_ATTENTION_OP]
    assert all(n.kwargs["causal"] and n.kwargs["key_padding_mask"] is not None for n in calls)
    assert all(n.kwargs["scale"] == pytest.approx(1 / 4) for n in calls)
    _assert_same_function(masked, fused, MODELS["gpt2"][2])


def test_unchanged_without_masks_or_off_device():
    cap = _captured("encoder")
    plain = copy.deepcopy(cap.gm)
    with pytest.raises(upop_fx.PreconditionError, match="InsertMasks"):  # no masks: nothing it could fuse
        FuseMaskedAttention(force=True)(plain)

    masked = _masked(cap, "upop")
    code = masked.code
    result = FuseMaskedAttention(device="cuda")(masked)  # parameters on CPU, not forced
    assert not result.modified and masked.code == code and "cpu" in result.value.reason
    assert FuseMaskedAttention(device="cpu")(masked).modified  # asked for the CPU: fuses


class _Attn(nn.Module):
    """One attention layer (2 heads of 16) with a chosen SDPA mask; ``mask``: (B, T) 1 = token, 0 = padding."""

    def __init__(self, mode: str, heads: int = 2) -> None:
        super().__init__()
        self.mode, self.heads = mode, heads
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))  # (B, H, T, d)
        keep = mask.bool()
        kw = {
            "padding": dict(attn_mask=keep[:, None, None, :]),
            "d8": {},  # 4 heads of 8, as in the zoo
            "causal": dict(is_causal=True),
            "float": dict(attn_mask=torch.zeros(B, 1, 1, T).masked_fill(~keep[:, None, None, :], -math.inf)),
            "pairs": dict(attn_mask=keep[:, None, :, None] & keep[:, None, None, :]),  # depends on the query
            "dropout": dict(dropout_p=0.1),
        }[self.mode]
        out = F.scaled_dot_product_attention(q, k, v, **kw)
        return self.o(out.transpose(1, 2).reshape(B, T, C))


def _attn(mode: str, granularity: str = "upop") -> tuple[torch.fx.GraphModule, tuple]:
    if mode not in _CAPTURED:
        torch.manual_seed(0)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0
        _CAPTURED[mode] = upop_fx.capture(_Attn(mode, heads=4 if mode == "d8" else 2), (torch.randn(2, 8, 32), mask))
        FindGroups()(_CAPTURED[mode].gm)
    cap = _CAPTURED[mode]
    other = torch.ones(3, 6, dtype=torch.long)
    other[2, 4:] = 0
    return _masked(cap, granularity), (torch.randn(3, 6, 32), other)


@pytest.mark.parametrize("mode", ["padding", "causal"])
def test_expressible_masks_fuse(mode):
    masked, inputs = _attn(mode)
    fused = copy.deepcopy(masked)
    assert FuseMaskedAttention(force=True)(fused).modified
    (call,) = [n for n in fused.graph.nodes if n.target is MASKED_ATTENTION_OP]
    assert call.kwargs["causal"] == (mode == "causal")
    assert (call.kwargs["key_padding_mask"] is not None) == (mode == "padding")
    assert call.kwargs["scale"] == pytest.approx(0.25)  # SDPA's implicit 1/sqrt(16), pinned
    _assert_same_function(masked, fused, inputs)


@pytest.mark.parametrize(
    ("mode", "why"), [("float", "attn_mask"), ("pairs", "attn_mask"), ("dropout", "dropout"), ("d8", "head dim 8")]
)
def test_inexpressible_sites_stay_unfused(mode, why, caplog):
    masked, _ = _attn(mode)
    code = masked.code
    with caplog.at_level("DEBUG", logger="upop_fx.passes.fuse_attention"):
        result = FuseMaskedAttention(force=True)(masked)
    assert not result.modified and masked.code == code
    (reason,) = result.value.skipped.values()
    assert why in reason and why in caplog.text


@pytest.mark.parametrize("name", ["encoder", "bert"])
def test_heads_times_dims_masks_stay_unfused_and_exact(name):
    """granularity='heads+dims' multiplies a channel by two masks; the kernel takes one per head dim, so every
    site is left as it is, with the reason, and the graph computes what it did."""
    masked = _masked(_captured(name), "heads+dims")
    before = copy.deepcopy(masked)
    result = FuseMaskedAttention(force=True)(masked)
    assert not result.modified and len(result.value.skipped) == MODELS[name][3]
    assert all("its head and its head dim" in why for why in result.value.skipped.values())
    _assert_same_function(before, masked, MODELS[name][2])


class _MultiQuery(nn.Module):
    """One key/value head of 16 dims broadcast (``expand``) to two query heads: its per-head copies carry the masks
    of their query heads (``analysis.copies``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.o = nn.Linear(32, 32), nn.Linear(32, 32)
        self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, 2, 16).transpose(1, 2)
        k, v = (p(x).view(B, T, 1, 16).transpose(1, 2).expand(B, 2, T, 16) for p in (self.k, self.v))
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, 32))


@pytest.mark.parametrize("granularity", ["upop", "heads"])
def test_a_key_value_head_copied_per_query_head_fuses(granularity):
    """Multi-query attention: the masks sit on the expand's per-head copies of k and v (the SDPA reads the masking
    ``mul`` itself); the kernel takes them as any head's, equal to the masked graph in outputs and gradients."""
    cap = upop_fx.capture(_MultiQuery().eval(), torch.randn(2, 8, 32))
    FindGroups()(cap.gm)
    assert len(get_analysis(cap.gm).copies) == 2
    masked = _masked(cap, granularity)
    fused = copy.deepcopy(masked)
    result = FuseMaskedAttention(force=True)(fused)
    assert result.value.fused == ["scaled_dot_product_attention"] and not result.value.skipped
    fused.graph.lint()
    _assert_same_function(masked, fused, (torch.randn(3, 6, 32),))


def test_different_q_and_k_masks_stay_unfused():
    masked, _ = _attn("padding")
    k_idx = [n for n in masked.graph.nodes if n.op == "get_attr" and "idx_" in n.target][1]  # q, k, v producers
    with torch.no_grad():
        buf = masked.get_buffer(k_idx.target)
        buf.copy_(buf.flip(0))  # k now reads the qk mask in another order than q
    result = FuseMaskedAttention(force=True)(masked)
    assert not result.modified
    assert "different masks" in next(iter(result.value.skipped.values()))


def test_upop_search_applies_the_pass_for_cuda(monkeypatch):
    """UPop asks for device="cuda" (a no-op here); forced, the search runs on the fused graph and finalizes."""
    import upop_fx.search.upop as upop_mod

    asked = []

    def spy(device):
        asked.append(device)
        return FuseMaskedAttention(device=device, force=True)

    torch.manual_seed(0)
    x, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.long)
    monkeypatch.setattr(upop_mod, "FuseMaskedAttention", spy)
    pruner = upop_fx.UPop(_Attn("padding"), (x, mask), ratio=0.5, search_steps=3, interval=1, own_class=False)
    assert asked == ["cuda"] and MASKED_ATTENTION_OP in _targets(pruner.model)
    for _ in range(3):
        pruner.model(x, mask).pow(2).mean().backward()
        pruner.step()
    assert pruner.finalize().report.prunable_cost_removed >= 0.5


def test_a_fused_graph_exports_and_compiles():
    """The kernel is a registered op with a fake and an autograd formula: torch.export and torch.compile take
    the fused graph, and both compute what it computes."""
    masked = _masked(_captured("encoder"), "upop")
    fused = FuseMaskedAttention(force=True)(copy.deepcopy(masked)).gm
    x, other = MODELS["encoder"][1], MODELS["encoder"][2]
    want = fused(*x)
    ep = torch.export.export(fused, x, strict=False)
    assert MASKED_ATTENTION_OP in [n.target for n in ep.graph.nodes if n.op == "call_function"]
    torch.testing.assert_close(ep.module()(*x), want, rtol=1e-5, atol=1e-6)
    compiled = torch.compile(fused, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(*x), want, rtol=1e-5, atol=1e-6)
    _assert_same_function(masked, fused, other)


@pytest.mark.parametrize("driver", ["compress", "UPop"])
def test_a_fused_search_distils_from_a_teacher_with_its_arithmetic(monkeypatch, driver):
    """The fused kernel rounds differently from the captured graph; distilling from the captured graph, step 0's
    loss would be rounding noise (~1e-12) and AdamW's normalised step would turn it into a full-lr move of every
    weight. The fused search's teacher is the search graph at masks 1, on the dense tensors: step 0's loss is 0,
    so the first step moves no weight, as in the unfused search."""
    import upop_fx.search.upop as upop_mod

    monkeypatch.setattr(upop_mod, "FuseMaskedAttention", lambda device: FuseMaskedAttention(device=device, force=True))
    torch.manual_seed(0)
    model = _Attn("padding").eval()
    x, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.long)
    if driver == "compress":
        result = upop_fx.compress(model, (x, mask), ratio=0.5, data=[(x, mask)], search_steps=2, interval=1, own_class=False,
                                  retrain_steps=0)
        assert result.losses["search"][0] == 0.0
        return
    pruner = upop_fx.UPop(model, (x, mask), ratio=0.5, search_steps=2, interval=1, own_class=False)
    assert pruner.state.fused and MASKED_ATTENTION_OP in _targets(pruner.teacher)
    dense = dict(pruner.prepared.captured.gm.named_parameters())
    assert all(p is dense[n] for n, p in pruner.teacher.named_parameters() if n in dense)  # shared, not copied
    with torch.no_grad():
        unmatched = upop_fx.training.loop.distillation_loss(pruner.model(x, mask), pruner.prepared.captured.gm(x, mask))
        matched = upop_fx.training.loop.distillation_loss(pruner.model(x, mask), pruner.teacher(x, mask))
    assert matched == 0.0 and unmatched > 0.0
