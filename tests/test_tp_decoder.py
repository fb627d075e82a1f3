"""The Torch-Pruning decoder baseline: whole KV groups and MLP neurons cut from a tiny GQA Llama, the copy runs
(any batch and length, ``generate()``) and equals the original with the removed heads and neurons zeroed."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torch_pruning")
transformers = pytest.importorskip("transformers")

from benchmarks.tp_decoder import layer_widths, tp_prune_decoder, tp_version  # noqa: E402

RATIO = 0.5
HEADS, KV_HEADS = 6, 2


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    # hidden 96, not 64: transformers 5 requires hidden_size % num_attention_heads == 0 (head_dim 16)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    example = {"input_ids": torch.randint(0, 128, (1, 16))}
    return model, state, tp_prune_decoder(model, example, RATIO)


def _rows(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """Indices of the rows of ``old`` that ``new`` keeps, in order (each row of ``new`` is a row of ``old``)."""
    match = (new[:, None, :] == old[None, :, :]).all(-1)
    assert bool((match.sum(1) == 1).all()), "a pruned row is not a row of the original"
    return match.float().argmax(1).tolist()


def test_version():
    assert tuple(int(p) for p in tp_version().split(".")[:2]) >= (1, 6)


def test_original_untouched(models):
    model, state, pruned = models
    assert pruned is not model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert layer_widths(model) == [{"q_heads": HEADS, "kv_heads": KV_HEADS, "intermediate": 128}] * 2
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (HEADS, KV_HEADS)
    assert model.config.intermediate_size == 128 and model.config._attn_implementation == "sdpa"
    assert all(p.requires_grad for p in pruned.parameters())
    assert not pruned.training


def test_widths(models):
    model, _, pruned = models
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    hd = model.config.head_dim
    for layer, w in zip(pruned.model.layers, layer_widths(pruned)):
        a = layer.self_attn
        assert a.k_proj.out_features % hd == 0 and a.k_proj.weight.shape[0] == a.k_proj.out_features
        assert w["kv_heads"] == KV_HEADS // 2  # half of the KV groups
        assert w["q_heads"] == w["kv_heads"] * (HEADS // KV_HEADS)  # each keeps all its query heads
        assert a.v_proj.out_features == a.k_proj.out_features and a.o_proj.in_features == a.q_proj.out_features
        assert a.num_key_value_groups == HEADS // KV_HEADS
        assert w["intermediate"] == 64 and layer.mlp.down_proj.in_features == 64
        assert layer.input_layernorm.weight.shape == (96,) and a.o_proj.out_features == 96  # residual kept
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (3, 1)
    assert pruned.config.intermediate_size == 64 and pruned.config.hidden_size == 96


def test_whole_kv_groups_removed(models):
    """k/v keep whole heads, and q/o keep exactly the query heads of the KV heads kept."""
    model, _, pruned = models
    hd, rep = model.config.head_dim, HEADS // KV_HEADS
    for old, new in zip(model.model.layers, pruned.model.layers):
        o, n = old.self_attn, new.self_attn
        kv = _rows(n.k_proj.weight, o.k_proj.weight)
        assert _rows(n.v_proj.weight, o.v_proj.weight) == kv
        heads = kv[::hd]
        assert all(h % hd == 0 for h in heads) and kv == [h + i for h in heads for i in range(hd)]
        q = [h // hd * rep * hd + i for h in heads for i in range(rep * hd)]
        assert _rows(n.q_proj.weight, o.q_proj.weight) == q
        assert torch.equal(n.o_proj.weight, o.o_proj.weight[:, q])


def _masked(model, pruned):
    """The original with the removed query heads (o_proj columns) and MLP neurons (down_proj columns) zeroed."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for m, p in zip(masked.model.layers, pruned.model.layers):
            q = _rows(p.self_attn.q_proj.weight, m.self_attn.q_proj.weight)
            dropped = sorted(set(range(m.self_attn.o_proj.in_features)) - set(q))
            m.self_attn.o_proj.weight[:, dropped] = 0
            g = _rows(p.mlp.gate_proj.weight, m.mlp.gate_proj.weight)
            assert _rows(p.mlp.up_proj.weight, m.mlp.up_proj.weight) == g
            assert torch.equal(p.mlp.down_proj.weight, m.mlp.down_proj.weight[:, g])
            m.mlp.down_proj.weight[:, sorted(set(range(m.mlp.down_proj.in_features)) - set(g))] = 0
    return masked


def test_forward_equals_masked_original(models):
    model, _, pruned = models
    masked = _masked(model, pruned)
    torch.manual_seed(1)
    for batch, seq in ((1, 7), (3, 20)):
        ids = torch.randint(0, 128, (batch, seq))
        with torch.no_grad():
            out = pruned(input_ids=ids, labels=ids)
            ref = masked(input_ids=ids).logits
        assert out.logits.shape == (batch, seq, 128)
        assert torch.isfinite(out.loss)
        torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-5)


def test_generate(models):
    model, _, pruned = models
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (2, 4))
    mask = torch.ones_like(ids)
    kw = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out = pruned.generate(ids, **kw)
        ref = _masked(model, pruned).generate(ids, **kw)
    assert out.shape == (2, 9) and torch.equal(out, ref)


def test_frozen_flags_kept(models):
    model = models[0]
    frozen = copy.deepcopy(model).requires_grad_(False)
    small = tp_prune_decoder(frozen, {"input_ids": torch.randint(0, 128, (1, 8))}, RATIO)
    assert not any(p.requires_grad for p in small.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())


def test_ratio_zero_and_range(models):
    model, state, _ = models
    same = tp_prune_decoder(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, 0.0)
    assert all(torch.equal(state[k], v) for k, v in same.state_dict().items())
    with pytest.raises(ValueError):
        tp_prune_decoder(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, 1.0)
