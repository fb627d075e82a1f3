"""Torch-Pruning's structured LLM pruning of a Hugging Face Llama-family decoder, as a benchmark baseline.

:func:`tp_prune_decoder` follows Torch-Pruning's own LLM example (``examples/LLMs/prune_llm.py``): importance
``tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")`` (the L2 magnitude of every weight row /
column coupled to a channel, averaged over the coupled layers), local ranking (``global_pruning=False``: every
layer loses the same fraction), whole attention heads rather than head dims (so RoPE never needs pruning), and
the model's attributes patched afterwards so that the Hugging Face forward and ``generate()`` still work.

It prunes, in every decoder layer and at the same ``ratio``:

* **MLP neurons** (the SwiGLU intermediate width: rows of ``gate_proj`` / ``up_proj`` and columns of
  ``down_proj``), with ``tp.pruner.MetaPruner`` (``round_to=4``, as in the example);
* **whole KV groups** — a key/value head together with the ``num_attention_heads // num_key_value_heads`` query
  heads that read it (their rows of ``q_proj`` / ``k_proj`` / ``v_proj`` and columns of ``o_proj``), scored by the
  same importance over that coupled group and averaged per KV group (the example's per-head reduction).

The residual stream (hidden size), the embeddings, ``lm_head`` and the norms are untouched.

Two departures from the example, both forced, neither changing what is scored or cut:

* **KV groups, not query heads.** For grouped-query attention Torch-Pruning's ``prune_num_heads`` removes query
  heads inside every KV group and keeps every KV head (it clears the pruning of the k/v layers), which leaves the
  KV cache, the part decode speed depends on, as large as before. Here the group to remove is chosen per layer
  from the importance of Torch-Pruning's own dependency group of ``q_proj`` (which couples each block of query
  heads with its KV head through ``repeat_kv``), and removed with that group's ``prune()``; the surgery is
  checked against the original weights.
* **RoPE hidden from the trace.** With transformers 5 (and Torch-Pruning 1.6) the dependency graph of the rotary
  embedding (``rotate_half``'s ``cat``) sends Torch-Pruning's index propagation round a loop without end, so the
  graph is traced with ``apply_rotary_pos_emb`` replaced by the identity (and eager attention, whose ``repeat_kv`` the
  graph can follow). RoPE rotates within each head with the same angles for every head, so removing whole heads
  never involves it.

The ratio removes ``ratio`` of each width: the MLP keeps ``int(intermediate * (1 - ratio))`` neurons rounded
down to a multiple of 4, attention keeps ``max(1, floor(kv_heads * (1 - ratio)))`` KV groups (so with 3 KV
heads, ratio 0.3 removes one group, a third of the attention width). ``tp_version()`` gives the Torch-Pruning
version, and refuses one older than this code was written against.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

MIN_TP_VERSION = (1, 6)


def tp_version() -> str:
    """The installed Torch-Pruning version (``torch_pruning.__version__``); raises if it is older than 1.6."""
    import torch_pruning as tp

    version = str(tp.__version__)
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < MIN_TP_VERSION:
        raise RuntimeError(f"torch_pruning {version} is older than {'.'.join(map(str, MIN_TP_VERSION))}")
    return version


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: expected a causal LM with .model.layers (Llama family)")
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        attn_ok = all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
        if not attn_ok or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise TypeError(f"{type(layer).__name__}: expected self_attn.{{q,k,v,o}}_proj, head_dim and "
                            "mlp.{gate,up,down}_proj")
    return list(layers)


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer: ``q_heads``, ``kv_heads`` and ``intermediate`` (the MLP width), read off the weights."""
    out = []
    for layer in _decoder_layers(model):
        a = layer.self_attn
        out.append({"q_heads": a.q_proj.out_features // a.head_dim, "kv_heads": a.k_proj.out_features // a.head_dim,
                    "intermediate": layer.mlp.gate_proj.out_features})  # fmt: skip
    return out


@contextmanager
def _traceable(model: nn.Module, layers: list[nn.Module]) -> Iterator[list[int]]:
    """While tracing: eager attention, RoPE replaced by the identity (see the module docstring), gradients on.
    Yields a one-item list counting the calls that skipped RoPE."""
    modules = {sys.modules[type(layer.self_attn).__module__] for layer in layers}
    calls = [0]

    def no_rope(q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls[0] += 1
        return q, k

    saved_rope = {}
    for mod in modules:
        if not hasattr(mod, "apply_rotary_pos_emb"):
            raise TypeError(f"{mod.__name__} has no apply_rotary_pos_emb to keep out of the trace")
        saved_rope[mod] = mod.apply_rotary_pos_emb
        mod.apply_rotary_pos_emb = no_rope
    saved_attn = model.config._attn_implementation
    try:
        model.config._attn_implementation = "eager"
        for p in model.parameters():  # the trace follows grad_fn; tp_prune_decoder restores the flags by name
            p.requires_grad_(True)
        yield calls
    finally:
        for mod, fn in saved_rope.items():
            mod.apply_rotary_pos_emb = fn
        model.config._attn_implementation = saved_attn


def _kept(n: int, ratio: float) -> int:
    return max(1, math.floor(n * (1.0 - ratio) + 1e-9))


@torch.no_grad()
def _prune_kv_groups(dg: Any, importance: Any, attn: nn.Module, ratio: float) -> None:
    """Remove the least important whole KV groups of one attention layer through Torch-Pruning's group of q_proj."""
    import torch_pruning as tp

    hd = attn.head_dim
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    n_kv, n_q = k.out_features // hd, q.out_features // hd
    rep = n_q // n_kv
    keep = _kept(n_kv, ratio)
    if keep >= n_kv:
        return
    expected = {(q, "out"), (k, "out"), (v, "out"), (o, "in")}

    def coupled(group: Any) -> set[tuple[nn.Module, str]]:
        found = set()  # the weights it touches; Torch-Pruning's own op nodes (tp.ops) hold none
        for dep, _ in group:
            layer = dep.target.module
            is_op = type(layer).__module__ == tp.ops.__name__
            if isinstance(layer, nn.Parameter) or (isinstance(layer, nn.Module) and not is_op):
                found.add((layer, "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"))
        return found

    full = dg.get_pruning_group(q, tp.prune_linear_out_channels, idxs=list(range(q.out_features)))
    if coupled(full) != expected:
        raise RuntimeError("Torch-Pruning's group of q_proj is not {q,k,v}_proj rows + o_proj columns; "
                           f"got {sorted((type(m).__name__, d) for m, d in coupled(full))}")  # fmt: skip
    imp = importance(full)  # one score per q_proj row
    per_group = imp.view(n_kv, rep * hd).mean(1)
    drop = sorted(torch.topk(per_group, n_kv - keep, largest=False).indices.tolist())
    kept_heads = [g for g in range(n_kv) if g not in drop]
    q_rows = [g * rep * hd + i for g in kept_heads for i in range(rep * hd)]
    kv_rows = [g * hd + i for g in kept_heads for i in range(hd)]
    before = {"q": q.weight[q_rows].clone(), "k": k.weight[kv_rows].clone(), "v": v.weight[kv_rows].clone(),
              "o": o.weight[:, q_rows].clone()}  # fmt: skip

    cut = [g * rep * hd + i for g in drop for i in range(rep * hd)]
    group = dg.get_pruning_group(q, tp.prune_linear_out_channels, idxs=cut)
    # Through repeat_kv a k/v channel arrives once per query head reading it; Torch-Pruning's Linear pruner
    # subtracts len(idxs) from out_features (and check_pruning_group counts them), so keep each channel once.
    for i, (dep, idxs) in enumerate(group):
        unique = list({int(j): j for j in idxs}.values())
        layer = dep.target.module
        if isinstance(layer, nn.Linear):
            n = layer.out_features if dg.is_out_channel_pruning_fn(dep.handler) else layer.in_features
            if len(unique) >= n:
                raise RuntimeError(f"the KV-group pruning group would empty a Linear {tuple(layer.weight.shape)}")
        group[i] = (dep, unique)
    group.prune()
    after = {"q": q.weight, "k": k.weight, "v": v.weight, "o": o.weight}
    if any(before[n].shape != after[n].shape or not torch.equal(before[n], after[n]) for n in before) or any(
        (m.out_features, m.in_features) != tuple(m.weight.shape) for m in (q, k, v, o)
    ):
        raise RuntimeError("Torch-Pruning's surgery did not remove exactly the chosen KV groups")


def _fix_attributes(model: nn.Module, layers: list[nn.Module]) -> None:
    """Set the head counts / widths the HF modules and config read to what the weights now hold."""
    widths = layer_widths(model)
    for layer, w in zip(layers, widths):
        a, mlp = layer.self_attn, layer.mlp
        a.num_key_value_groups = w["q_heads"] // w["kv_heads"]
        for name, value in (("num_heads", w["q_heads"]), ("num_attention_heads", w["q_heads"]),
                            ("num_key_value_heads", w["kv_heads"])):  # fmt: skip
            if hasattr(a, name):
                setattr(a, name, value)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = w["intermediate"]
    cfg = model.config
    for key, cfg_name in (("q_heads", "num_attention_heads"), ("kv_heads", "num_key_value_heads"),
                          ("intermediate", "intermediate_size")):  # fmt: skip
        values = {w[key] for w in widths}
        if len(values) == 1:
            setattr(cfg, cfg_name, values.pop())


def tp_prune_decoder(model: nn.Module, example: dict[str, torch.Tensor], ratio: float) -> nn.Module:
    """A pruned deep copy of the Llama-family causal LM ``model`` (left untouched), in eval mode.

    Torch-Pruning removes ``ratio`` of every layer's MLP neurons (``MetaPruner``,
    ``GroupMagnitudeImportance(p=2, group_reduction="mean")``, local ranking, ``round_to=4``) and of its KV groups
    (a KV head with its query heads, same importance over Torch-Pruning's coupled q/k/v/o group); hidden size,
    embeddings, ``lm_head`` and norms are kept. ``example`` (e.g. ``{"input_ids": (1, T)}``) is only traced.
    The attention's ``num_key_value_groups`` (and any head-count attribute it has), the MLP's
    ``intermediate_size`` and ``config.num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size``
    are updated, so the forward, the KV cache and ``generate()`` see the new widths.
    """
    import torch_pruning as tp

    tp_version()
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1) (got {ratio})")
    pruned = copy.deepcopy(model).eval()
    layers = _decoder_layers(pruned)
    if ratio == 0.0:
        return pruned
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    inner = pruned.model
    keep_out = [inner.embed_tokens, pruned.lm_head]
    for layer in layers:
        a = layer.self_attn
        keep_out += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.down_proj]
    norms = [(m.weight, 0) for m in pruned.modules()
             if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None]  # fmt: skip
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    trace_inputs = {**example, "use_cache": False}
    with _traceable(pruned, layers) as rope_calls:
        pruner = tp.pruner.MetaPruner(
            pruned, example_inputs=trace_inputs, importance=importance, global_pruning=False, pruning_ratio=ratio,
            ignored_layers=keep_out, unwrapped_parameters=norms, round_to=4, output_transform=lambda out: out.logits,
        )  # fmt: skip
    if rope_calls[0] == 0:
        raise RuntimeError("apply_rotary_pos_emb was not called while tracing: RoPE may still be in the graph")
    with torch.no_grad():
        for group in pruner.step(interactive=True):  # the MLP groups only: everything else is ignored
            group.prune()
    for layer in layers:
        _prune_kv_groups(pruner.DG, importance, layer.self_attn, ratio)
    del pruner
    _fix_attributes(pruned, layers)
    for name, p in pruned.named_parameters():  # pruned layers hold new Parameters: set every flag back
        p.requires_grad_(name not in frozen)
    return pruned.eval()
