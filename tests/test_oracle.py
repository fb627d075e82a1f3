"""An independent oracle for compressed models.

``Result.reference()`` zeroes removed channels in the *captured graph*, through the same label analysis the
surgery uses, so a bug shared by the two passes would pass ``test_compress_zoo``. The oracle here starts from
the ORIGINAL ``nn.Module`` (a deep copy of the model handed to ``compress``, taken before the call), runs its
own eager forward (not the exported graph), and zeroes, in the module's own parameters and by parameter name, the weight rows / biases
that produce every removed channel. With ``method="magnitude"`` and ``retrain_steps=0`` the weights are not
trained, so that module must compute what ``result.model`` computes (attention scale, head count, split sizes
and all) on the example batch and on a batch of another size and sequence length.

Two oracles:

* **producers oracle** (every case): trusts ``DimGroup.producers`` only for *which parameter entries*
  produce a channel, never for the arithmetic;
* **structural oracle** (one BERT-style encoder, one packed Conv1D GPT-2, one ``nn.MultiheadAttention``
  encoder): derives the producing rows from the module structure and the documented channel convention
  (channel ``c`` = head ``c // head_dim``, dim ``c % head_dim``; an MLP channel = a hidden neuron), checks
  ``.producers`` / ``.consumers`` list exactly those, and zeroes without reading ``.producers`` at all.

The zoo models are compressed with their weights redrawn at a trained-like scale (``_spread``: with the
zoo's 0.02-std init and zero biases, q/k groups and biases barely touch the output, and a q/k bug hides below
the tolerance); ``test_zoo_weights_oracle`` runs the producers oracle on the zoo's own weights as well.

Each comparison is shown not to be vacuous: every compared group lost channels, and zeroing them (all
together, and each group alone) moves the original's output far beyond the tolerance.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import upop_fx
from upop_fx.compare import relative_error

from .models import ZOO, ZooModel

TOL = 1e-4  # oracle vs compressed model, relative error in norm, per floating output leaf
MOVED = 1e-2  # the zeroing must move the original's output at least this much (100x TOL)

# (zoo model, granularity): a BERT-style encoder (separate q/k/v Linears), GPT-2 (packed Conv1D c_attn, [in, out]
# weights) and nn.TransformerEncoder (packed in_proj of nn.MultiheadAttention); each granularity at least once.
CASES = [
    ("bert", "upop"),
    ("bert", "heads"),
    ("gpt2", "upop"),
    ("gpt2", "qk_v"),
    ("torch_encoder", "upop"),
    ("torch_encoder", "qk_v"),
]
PRUNED_KINDS = ("qk", "v", "mlp")


@dataclass
class Case:
    name: str
    granularity: str
    zoo: ZooModel
    original: nn.Module  # deep copy of zoo.model taken before compress()
    result: Any  # upop_fx.Result


def _spread(model: nn.Module, seed: int = 0) -> None:
    """Redraw the weights at a trained-like scale, in place: every matrix N(0, 1/fan_in), every bias / norm
    parameter offset by N(0, 0.1²); embeddings untouched.

    Why: Hugging Face initialises matrices at std 0.02 and biases at 0, so attention is nearly uniform and
    biases are zero. Then zeroing (or mis-slicing) a q/k group or a bias hardly moves the output: with the
    zoo's own weights, BERT layer 0's q/k group alone moves it by 1.8e-5, below TOL, so a q/k or bias bug in
    the surgery would pass unseen. With spread weights every group's zeroing moves the output >> TOL.
    """
    gen = torch.Generator().manual_seed(seed)
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    seen: set[int] = set()
    with torch.no_grad():
        for m in model.modules():
            for p in m.parameters(recurse=False):
                if id(p) in emb or id(p) in seen or not p.is_floating_point():
                    continue
                seen.add(id(p))
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
                elif p.ndim == 2:  # Conv1D (GPT-2) stores [in, out]; nn.Linear and in_proj [out, in]
                    fan_in = p.shape[0] if type(m).__name__ == "Conv1D" else p.shape[1]
                    p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


@functools.cache
def _compressed(name: str, granularity: str, spread: bool = True) -> Case:
    zoo = ZOO[name]()
    if spread:
        _spread(zoo.model)
    original = copy.deepcopy(zoo.model)
    result = upop_fx.compress(zoo.model, zoo.example_inputs, ratio=0.5, method="magnitude", retrain_steps=0, own_class=False,
                              granularity=granularity)
    # The oracle's premise: nothing was trained, so the cut was made from the original weights.
    dense = dict(result.dense.named_parameters())
    for pname, p in original.named_parameters():
        assert pname in dense, f"{name}: {pname} is not a parameter of the captured graph"
        assert torch.equal(dense[pname].detach(), p.detach()), f"{name}: {pname} changed before the cut"
    return Case(name, granularity, zoo, original, result)


def _case_id(c: tuple[str, str]) -> str:
    return f"{c[0]}-{c[1]}"


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def case(request) -> Case:
    return _compressed(*request.param)


@pytest.fixture(scope="module", params=[c for c in CASES if c[0] == "bert"], ids=_case_id)
def bert_case(request) -> Case:
    return _compressed(*request.param)


# ---------------------------------------------------------------------------------------------- helpers

def _call(module: nn.Module, zoo: ZooModel, inputs: Any) -> Any:
    args, kwargs = zoo.split(inputs)
    with torch.no_grad():
        return module(*args, **kwargs)


def _leaf_errors(out: Any, ref: Any) -> list[float]:
    """Relative error of every floating tensor leaf; the trees must match and other leaves be equal."""
    a, spec_a = tree_flatten(out)
    b, spec_b = tree_flatten(ref)
    assert spec_a == spec_b, f"output trees differ:\n{spec_a}\nvs\n{spec_b}"
    errs = []
    for x, y in zip(a, b):
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            assert isinstance(x, torch.Tensor) and x.shape == y.shape, (getattr(x, "shape", x), y.shape)
            errs.append(relative_error(x, y))
        elif isinstance(y, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y
    assert errs, "no floating output leaf to compare"
    return errs


def _removed(case: Case) -> dict[int, np.ndarray]:
    """Group id -> removed channel indices, for the groups that lost channels."""
    out = {}
    for gid, kept in case.result.keep.items():
        g = case.result.analysis.groups[gid]
        kept = np.asarray(list(kept), dtype=np.int64)
        assert len(set(kept.tolist())) == kept.size and kept.min() >= 0 and kept.max() < g.width, g.describe()
        rem = np.setdiff1d(np.arange(g.width), kept)
        if rem.size:
            out[gid] = rem
    return out


Producers = list[tuple[str, int, np.ndarray]]  # (parameter FQN, axis, channel of each entry or -1)


def _zeroed(original: nn.Module, plan: list[tuple[Producers, np.ndarray]]) -> nn.Module:
    """A copy of ``original`` with, for each ``(producers, removed)``, the entries producing a removed channel
    zeroed in the named parameter along its axis."""
    model = copy.deepcopy(original)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for producers, removed in plan:
            for pname, axis, chan in producers:
                rows = np.nonzero(np.isin(chan, removed))[0]
                assert rows.size, f"{pname}: no entry produces the removed channels"
                params[pname].index_fill_(axis, torch.as_tensor(rows, dtype=torch.long), 0.0)
    return model


def _check_oracle(case: Case, oracle: nn.Module, plan_by_group: dict[int, tuple[Producers, np.ndarray]],
                  moved_min: float = MOVED, per_group: bool = True) -> None:
    """``result.model`` equals ``oracle`` on both batches, and the comparison can fail: the zeroing moves the
    original's output by more than ``moved_min`` (all groups together, and, with ``per_group``, each alone)."""
    zoo, result = case.zoo, case.result
    for label, inputs in (("example_inputs", zoo.example_inputs), ("other_inputs", zoo.other_inputs)):
        ref = _call(oracle, zoo, inputs)
        errs = _leaf_errors(_call(result.model, zoo, inputs), ref)
        assert max(errs) <= TOL, f"{case.name}/{case.granularity} {label}: per-leaf relative errors {errs}"
        moved = _leaf_errors(_call(case.original, zoo, inputs), ref)
        assert max(moved) > moved_min, f"{case.name}: zeroing barely changes the output ({moved}): vacuous"
    if not per_group:
        return
    base = _call(case.original, zoo, zoo.example_inputs)
    for gid, item in plan_by_group.items():
        alone = _call(_zeroed(case.original, [item]), zoo, zoo.example_inputs)
        moved = max(_leaf_errors(alone, base))
        assert moved > moved_min, f"{case.name}: zeroing group {result.analysis.groups[gid].describe()} alone " \
                              f"moves the output by only {moved:.2e}"


def _check_pruned_groups(case: Case, removed: dict[int, np.ndarray]) -> None:
    """Non-vacuity: every prunable q/k, v and MLP group lost channels and kept some."""
    groups = [g for g in case.result.analysis.prunable if g.kind in PRUNED_KINDS]
    assert {g.kind for g in groups} == set(PRUNED_KINDS), [g.describe() for g in groups]
    for g in groups:
        assert g.id in removed, f"{case.name}: {g.describe()} lost no channel"
        assert 0 < removed[g.id].size < g.width, g.describe()


# ------------------------------------------------------------------------------------ producers oracle

def test_producers_name_original_parameters(case):
    """Every producer of a pruned group is a parameter FQN of the original module, its channel map spans
    that parameter's axis, and every channel of the group has at least one producing entry."""
    params = dict(case.original.named_parameters(remove_duplicate=False))
    removed = _removed(case)
    _check_pruned_groups(case, removed)
    for gid in removed:
        g = case.result.analysis.groups[gid]
        assert g.producers, g.describe()
        covered = np.zeros(g.width, dtype=bool)
        for pname, axis, chan in g.producers:
            assert pname in params, f"{g.describe()}: producer {pname!r} is not a parameter of the original"
            assert chan.shape == (params[pname].shape[axis],), (pname, axis, chan.shape, params[pname].shape)
            assert chan.min() >= -1 and chan.max() < g.width, (pname, chan)
            covered[chan[chan >= 0]] = True
        assert covered.all(), f"{g.describe()}: channels {np.nonzero(~covered)[0]} have no producer"


def test_compressed_parameters_are_the_surviving_entries(case):
    """In ``result.model``, each producer parameter (same FQN) has exactly the entries whose channel was
    kept (or that belong to no pruned channel) along its axis, with the original values, in order."""
    removed = _removed(case)
    drop: dict[tuple[str, int], np.ndarray] = {}
    for gid, rem in removed.items():
        for pname, axis, chan in case.result.analysis.groups[gid].producers:
            mask = drop.setdefault((pname, axis), np.zeros(chan.shape, dtype=bool))
            mask |= np.isin(chan, rem)
    orig = dict(case.original.named_parameters(remove_duplicate=False))
    small = dict(case.result.model.named_parameters(remove_duplicate=False))
    compared = 0
    for (pname, axis), mask in drop.items():
        assert pname in small, f"{pname} missing from the compressed model"
        keep_rows = torch.as_tensor(np.nonzero(~mask)[0], dtype=torch.long)
        want = orig[pname].detach().index_select(axis, keep_rows)
        got = small[pname].detach()
        assert got.shape == want.shape, f"{pname}: {tuple(got.shape)}, expected {tuple(want.shape)}"
        # another axis may also be sliced (as a consumer of another group): compare values only when not
        if all(got.shape[d] == orig[pname].shape[d] for d in range(got.ndim) if d != axis):
            assert torch.equal(got, want), f"{pname}: kept entries differ from the original's"
            compared += 1
    assert compared, "no producer parameter compared by value"


def test_zeroed_original_equals_compressed(case):
    """The oracle: the original module with every removed channel's producers zeroed (by name, from
    ``.producers``) equals ``result.model`` on ``example_inputs`` and ``other_inputs``."""
    removed = _removed(case)
    _check_pruned_groups(case, removed)
    groups = case.result.analysis.groups
    plan = {gid: (groups[gid].producers, rem) for gid, rem in removed.items()}
    oracle = _zeroed(case.original, list(plan.values()))
    _check_oracle(case, oracle, plan)


def test_oracle_sees_one_wrong_channel(case):
    """Sensitivity: zeroing one *kept* channel more, in any one group, makes the oracle disagree with
    ``result.model`` by more than 10x TOL — a surgery that kept or dropped a single wrong channel would fail."""
    removed = _removed(case)
    groups = case.result.analysis.groups
    plan = {gid: (groups[gid].producers, rem) for gid, rem in removed.items()}
    out = _call(case.result.model, case.zoo, case.zoo.example_inputs)
    for gid, (producers, rem) in plan.items():
        extra = int(np.setdiff1d(np.arange(groups[gid].width), rem)[0])
        wrong = {**plan, gid: (producers, np.append(rem, extra))}
        err = max(_leaf_errors(out, _call(_zeroed(case.original, list(wrong.values())), case.zoo,
                                          case.zoo.example_inputs)))
        assert err > 10 * TOL, f"{case.name}: {groups[gid].describe()} channel {extra} is invisible ({err:.1e})"


@pytest.mark.parametrize("name", sorted({n for n, _ in CASES}))
def test_zoo_weights_oracle(name):
    """The producers oracle on the zoo's own (unspread) weights. Only the whole zeroing is shown to matter
    here (> 10x TOL): with these weights a q/k group alone moves the BERT output by ~1e-5 (see _spread)."""
    case = _compressed(name, "upop", spread=False)
    removed = _removed(case)
    _check_pruned_groups(case, removed)
    groups = case.result.analysis.groups
    plan = {gid: (groups[gid].producers, rem) for gid, rem in removed.items()}
    _check_oracle(case, _zeroed(case.original, list(plan.values())), plan, moved_min=10 * TOL, per_group=False)


def test_keep_respects_granularity(case):
    """``keep`` has the shape the granularity promises (structures.py): "upop" — the same head dims in every
    head, shared by q/k and v; "qk_v" — the same head dims in every head, q/k and v apart; "heads" — whole
    heads, shared by q/k and v."""
    analysis, keep = case.result.analysis, case.result.keep
    by_site: dict[int, dict[str, Any]] = {}
    for g in analysis.prunable:
        if g.kind in ("qk", "v"):
            by_site.setdefault(g.site, {})[g.kind] = g
    assert by_site
    for site, kinds in by_site.items():
        assert set(kinds) == {"qk", "v"}, site
        sets = {}
        for kind, g in kinds.items():
            kept = np.zeros(g.width, dtype=bool)
            kept[list(keep[g.id])] = True
            grid = kept.reshape(g.heads, g.head_dim)  # channel c = head c // head_dim, dim c % head_dim
            if case.granularity == "heads":
                assert (grid.all(axis=1) | ~grid.any(axis=1)).all(), f"{g.describe()}: partial heads {grid}"
            else:
                assert (grid == grid[0]).all(), f"{g.describe()}: head dims differ across heads {grid}"
            sets[kind] = kept
        if case.granularity in ("upop", "heads"):
            assert (sets["qk"] == sets["v"]).all(), f"site {site}: q/k and v keep different channels"


# ----------------------------------------------------------------------------------- structural oracle

Layout = dict[tuple[str, int], tuple[int, Producers, Producers]]  # (kind, layer) -> (width, producers, consumers)


def _arange(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def _none(n: int) -> np.ndarray:
    return np.full(n, -1, dtype=np.int64)


def _layout(name: str, model: nn.Module) -> Layout:
    """Which parameter entries produce (and consume) each prunable channel, read off the module structure and
    the layouts the libraries document — never off the graph analysis."""
    fqn = {id(m): n for n, m in model.named_modules()}
    out: Layout = {}
    if name == "bert":  # separate q/k/v nn.Linear, rows = head * head_dim + dim
        cfg = model.config
        e, hidden = cfg.hidden_size, cfg.intermediate_size
        for i, layer in enumerate(model.encoder.layer):
            att = layer.attention.self
            q, k, v = (fqn[id(m)] for m in (att.query, att.key, att.value))
            o, up, down = (fqn[id(m)] for m in (layer.attention.output.dense, layer.intermediate.dense,
                                                 layer.output.dense))
            out["qk", i] = (e, [(f"{m}.{p}", 0, _arange(e)) for m in (q, k) for p in ("weight", "bias")], [])
            out["v", i] = (e, [(f"{v}.{p}", 0, _arange(e)) for p in ("weight", "bias")],
                           [(f"{o}.weight", 1, _arange(e))])
            out["mlp", i] = (hidden, [(f"{up}.{p}", 0, _arange(hidden)) for p in ("weight", "bias")],
                             [(f"{down}.weight", 1, _arange(hidden))])
    elif name == "gpt2":  # Conv1D weights are [in, out]; c_attn's output is split(n_embd) into q, k, v
        cfg = model.config
        e = cfg.n_embd
        hidden = cfg.n_inner or 4 * e
        qk, vv = np.concatenate([_arange(e), _arange(e), _none(e)]), np.concatenate([_none(2 * e), _arange(e)])
        for i, block in enumerate(model.transformer.h):
            a, p, fc, proj = (fqn[id(m)] for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                    block.mlp.c_proj))
            out["qk", i] = (e, [(f"{a}.weight", 1, qk), (f"{a}.bias", 0, qk)], [])
            out["v", i] = (e, [(f"{a}.weight", 1, vv), (f"{a}.bias", 0, vv)], [(f"{p}.weight", 0, _arange(e))])
            out["mlp", i] = (hidden, [(f"{fc}.weight", 1, _arange(hidden)), (f"{fc}.bias", 0, _arange(hidden))],
                             [(f"{proj}.weight", 0, _arange(hidden))])
    elif name == "torch_encoder":  # nn.MultiheadAttention: in_proj rows are [q; k; v]
        for i, layer in enumerate(model.layers):
            att = layer.self_attn
            e = att.embed_dim
            hidden = layer.linear1.out_features
            qk, vv = np.concatenate([_arange(e), _arange(e), _none(e)]), np.concatenate([_none(2 * e), _arange(e)])
            m, o, up, down = (fqn[id(x)] for x in (att, att.out_proj, layer.linear1, layer.linear2))
            out["qk", i] = (e, [(f"{m}.in_proj_weight", 0, qk), (f"{m}.in_proj_bias", 0, qk)], [])
            out["v", i] = (e, [(f"{m}.in_proj_weight", 0, vv), (f"{m}.in_proj_bias", 0, vv)],
                           [(f"{o}.weight", 1, _arange(e))])
            out["mlp", i] = (hidden, [(f"{up}.{p}", 0, _arange(hidden)) for p in ("weight", "bias")],
                             [(f"{down}.weight", 1, _arange(hidden))])
    else:
        raise AssertionError(f"no structural layout for {name}")
    return out


def _groups_of(case: Case, layout: Layout) -> dict[tuple[str, int], Any]:
    """The prunable groups, one per structural (kind, layer) and none besides."""
    groups = {(g.kind, g.layer): g for g in case.result.analysis.prunable}
    assert len(groups) == len(case.result.analysis.prunable), "two prunable groups share a (kind, layer)"
    assert set(groups) == set(layout), f"groups {sorted(groups)} vs structure {sorted(layout)}"
    return groups


def _as_set(entries: Producers) -> dict[tuple[str, int], list[int]]:
    return {(n, a): c.tolist() for n, a, c in entries}


@pytest.mark.parametrize("name", sorted({n for n, _ in CASES}))
def test_producers_match_module_structure(name):
    """``.producers`` / ``.consumers`` list exactly the entries the module structure says produce / consume
    each group's channels (MLP: ``intermediate.dense`` rows and bias; attention: q/k/v rows, packed slots
    included), and widths / head shapes match the config."""
    case = _compressed(name, "upop")
    layout = _layout(name, case.original)
    groups = _groups_of(case, layout)
    for key, (width, producers, consumers) in layout.items():
        g = groups[key]
        assert g.width == width, (g.describe(), width)
        if g.kind in ("qk", "v"):
            heads = case.original.config.num_attention_heads if name == "bert" else (
                case.original.config.n_head if name == "gpt2" else case.original.layers[key[1]].self_attn.num_heads)
            assert (g.heads, g.head_dim) == (heads, width // heads), g.describe()
        assert _as_set(g.producers) == _as_set(producers), f"{g.describe()}: producers differ from the structure"
        assert _as_set(g.consumers) == _as_set(consumers), f"{g.describe()}: consumers differ from the structure"


def test_compressed_widths_match_module_structure(case):
    """The compressed model's producing and consuming weights (found by structure, not by the analysis) are
    ``len(keep[gid])`` wide per packed slot and hold the original's kept rows / columns."""
    layout = _layout(case.name, case.original)
    groups = _groups_of(case, layout)
    orig = dict(case.original.named_parameters(remove_duplicate=False))
    small = dict(case.result.model.named_parameters(remove_duplicate=False))
    survive: dict[tuple[str, int], np.ndarray] = {}
    for key, (_, producers, consumers) in layout.items():
        kept = np.asarray(case.result.keep[groups[key].id], dtype=np.int64)
        assert 0 < kept.size < groups[key].width, groups[key].describe()
        for pname, axis, chan in producers + consumers:
            mask = survive.setdefault((pname, axis), np.ones(chan.shape, dtype=bool))
            mask &= (chan < 0) | np.isin(chan, kept)
    for (pname, axis), mask in survive.items():
        want = orig[pname].detach().index_select(axis, torch.as_tensor(np.nonzero(mask)[0], dtype=torch.long))
        got = small[pname].detach()
        assert got.shape == want.shape, f"{pname}: {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert torch.equal(got, want), f"{pname}: kept entries differ from the original's"


def test_structurally_zeroed_original_equals_compressed(case):
    """The stronger oracle: zero the producing entries found from the module structure (``.producers`` is
    not read) in the original module; it equals ``result.model`` on both batches."""
    layout = _layout(case.name, case.original)
    groups = _groups_of(case, layout)
    removed = _removed(case)
    _check_pruned_groups(case, removed)
    plan = {groups[key].id: (producers, removed[groups[key].id]) for key, (_, producers, _) in layout.items()}
    _check_oracle(case, _zeroed(case.original, list(plan.values())), plan)


def test_bert_mlp_neurons_from_module_structure(bert_case):
    """For every BERT layer's MLP group: the hidden neurons' parameters, named from the module tree
    (``encoder.layer.<i>.intermediate.dense`` rows and bias), are exactly ``.producers``; the compressed
    ``intermediate.dense`` has ``len(keep[gid])`` rows and ``output.dense`` as many columns."""
    case = bert_case
    model = case.original
    cfg = model.config
    fqn = {id(m): n for n, m in model.named_modules()}
    mlp = {g.layer: g for g in case.result.analysis.prunable if g.kind == "mlp"}
    assert sorted(mlp) == list(range(cfg.num_hidden_layers))
    small = dict(case.result.model.named_parameters())
    for i, layer in enumerate(model.encoder.layer):
        up, down = fqn[id(layer.intermediate.dense)], fqn[id(layer.output.dense)]
        assert up == f"encoder.layer.{i}.intermediate.dense"
        g = mlp[i]
        assert g.width == cfg.intermediate_size == layer.intermediate.dense.out_features
        assert sorted((n, a) for n, a, _ in g.producers) == [(f"{up}.bias", 0), (f"{up}.weight", 0)]
        for _, _, chan in g.producers:
            assert chan.tolist() == list(range(g.width)), "neuron c is not row c"
        k = len(case.result.keep[g.id])
        assert 0 < k < g.width
        assert tuple(small[f"{up}.weight"].shape) == (k, cfg.hidden_size)
        assert tuple(small[f"{up}.bias"].shape) == (k,)
        assert tuple(small[f"{down}.weight"].shape) == (cfg.hidden_size, k)
