"""``own_class=True`` (the default): prune only what the model's own class can express, so that ``result.module`` exists.

Some layers compute a size from something no cut can change — a rotary cos/sin table computed once for every
layer, one ``head_dim`` attribute that sizes q, k and v, an attention scale computed from the head size (SDPA's
default, ``/ sqrt(attention_head_size)``), Hugging Face's BLIP vision attention reshaping to
``embed_dim // num_heads`` of its *input* width. The graph cuts them exactly; the model's class cannot. Before the
search, :func:`restrict_to_class` makes a trial cut (one entry of every structure), rebuilds the module
(:func:`~upop_fx.module.rebuild.rebuild`, checked by running it) and, for every module that could not follow:

* with ``shared_rotary=True``, where the class computes one rotary cos/sin table for every layer and the layers
  keep different pairs, the rotary attention layers are tried again with **their head dims shared** (one structure whose entry ``j`` is
  rotary pair ``j`` in every layer, :attr:`~upop_fx.ir.groups.DimGroup.joint`): every layer keeps the same pairs,
  and the rebuild slices the class's rotary frequencies to them;
* an attention layer that loses head dims is tried again with **whole heads** as its entries (every head keeps
  its size, its rotary pairs and its scale; :attr:`~upop_fx.ir.groups.DimGroup.whole_heads` holds why);
* anything else, or whole heads that still fail, is marked not prunable, with the reason.

It repeats until the trial module is verified, or no failure names a module. What was done is listed per
structure in the returned lines (``report.class_limits``); ``own_class=False`` cuts the graph alone, wider.

Example:
    >>> import torch, upop_fx
    >>> enc = torch.nn.TransformerEncoder(
    ...     torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False).eval()
    >>> result = upop_fx.compress(enc, torch.randn(2, 5, 16), ratio=0.3, method="magnitude", retrain_steps=0)
    >>> sorted({row.kind for row in result.report.groups}), type(result.module).__name__
    (['mlp'], 'TransformerEncoder')
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..ir.entries import build_entries, keep_sets
from ..ir.groups import DimGroup, GroupAnalysis
from ..passes import Surgery
from ..passes.surgery import removed_labels
from .rebuild import reason_of, rebuild

__all__ = ["restrict_to_class"]

log = logging.getLogger(__name__)

#: trial rounds: each one leaves whole (or to whole heads) what the previous trial named
ROUNDS = 6


def _params(g: DimGroup) -> set[str]:
    return {name for name, _, _ in [*g.producers, *g.consumers]}


def _trial(analysis: GroupAnalysis, granularity: str, budget: str) -> dict[int, list[int]] | None:
    """Keep-sets removing a few entries from every structure that has more than one: the last ``multiple``
    (one for most), and where more than two are left also one from the front; from the ``k``-th structure of a
    kind, the ``k``-th from each end — so that layers keep different entries, and a size or a table the class
    shares between layers that the cut would make different shows up."""
    structures, entries = build_entries(analysis, granularity, budget)
    pruned = np.zeros(len(entries), dtype=bool)
    seen: dict[str, int] = {}
    for s, st in enumerate(structures):
        mine = [i for i, e in enumerate(entries) if e.structure == s and not e.head]
        mine = mine or [i for i, e in enumerate(entries) if e.structure == s]
        n, m = len(mine), st.multiple
        if n <= m:
            continue
        k = seen[st.kind] = seen.get(st.kind, -1) + 1
        last = n - (k * m) % (n - m + 1)  # one past the last of the ``m`` removed from the back
        pruned[mine[last - m:last]] = True
        if m == 1 and n > 2:
            pruned[mine[k % (n - 1)]] = True  # and one from the front (another where the back one is it)
    return keep_sets(analysis, entries, pruned) if pruned.any() else None


def _site_groups(analysis: GroupAnalysis, g: DimGroup) -> list[DimGroup]:
    """The prunable attention groups of ``g``'s attention site (``[g]`` without a site)."""
    if g.site is None:
        return [g]
    return [o for o in analysis.prunable if o.site == g.site and o.kind in ("qk", "v")]


def _heads_can_go(analysis: GroupAnalysis, site: list[DimGroup]) -> bool:
    """Whole heads are still to try for an attention site's prunable groups: its q/k and its v (a head goes from
    both, or q, k and v would differ in heads), of as many heads, several, not whole heads yet, and no per-head
    bias fixes them."""
    kinds = sorted(g.kind for g in site)
    if kinds != ["qk", "v"] or site[0].heads != site[1].heads or not site[0].heads or site[0].heads < 2:
        return False
    if any(g.whole_heads for g in site):
        return False
    where = site[0].site
    return where is None or where >= len(analysis.sites) or not analysis.sites[where].fixed_heads


def _alike(model: torch.nn.Module, at: dict[str, list[str]]) -> dict[str, list[str]]:
    """The problems found per module path, extended to every module of the same class as one that failed (its
    code is the same: the run stops at the first failing layer, the others would fail alike), with the texts of
    the one that failed."""
    out = {path: list(texts) for path, texts in at.items()}
    failed = {}
    for path, texts in at.items():
        try:
            failed.setdefault(type(model.get_submodule(path)), texts)
        except AttributeError:
            continue
    for path, m in model.named_modules():
        if path and path not in out and type(m) in failed:
            out[path] = failed[type(m)]
    return out


def _share_rotary_dims(analysis: GroupAnalysis) -> bool:
    """Give every rotary attention layer (q/k in pairs, v beside it) one key, so that their head dims become one
    structure (see the module docstring). False where there are fewer than two such layers."""
    sites = {}
    for g in analysis.prunable:
        if g.kind == "qk" and g.dims is not None and not g.whole_heads:
            sites[g.site] = _site_groups(analysis, g)
    if len(sites) < 2:
        return False
    key = ("its class computes one rotary cos/sin table for every layer: every layer keeps the same rotary pairs, "
           "and the class's frequencies are sliced to them")
    for groups in sites.values():
        for o in groups:
            o.joint = key
    log.info("own_class: the head dims of %d rotary attention layers are shared (one rotary table)", len(sites))
    return True


def _whole_partner(analysis: GroupAnalysis, g: DimGroup) -> str:
    """Where ``g`` is one side of an attention whose other side is not prunable (q/k under a per-head norm, say):
    why whole heads cannot go either — a head leaves q, k and v together."""
    if g.site is None or g.kind not in ("qk", "v"):
        return ""
    other = next((o for o in analysis.groups if o.site == g.site and o.kind in ("qk", "v") and o.kind != g.kind
                  and not o.prunable), None)
    if other is None or not other.reason:
        return ""
    return (f" — and whole heads cannot go: this attention's {other.kind} is not prunable ({other.reason}), and a "
            f"head leaves q, k and v together")


def restrict_to_class(model: torch.nn.Module, gm: torch.fx.GraphModule, analysis: GroupAnalysis,
                      granularity: str, budget: str, share_rotary: bool = False) -> list[str]:
    """Restrict the groups of ``analysis`` to what ``model``'s class can cut (see the module docstring): whole
    heads where head dims fail, not prunable where that fails too. ``gm``: the captured graph that ``analysis``
    describes. Returns one line per restricted group: where, what was done and why (a group whose heads the graph
    itself couples, under a per-head norm, is not the class's doing: ``report.whole_heads`` lists it).
    ``share_rotary``: rotary layers whose class computes one table are first tried with shared head dims (see the
    module docstring; ``Options.shared_rotary``); else they go to whole heads."""
    tried_joint = False
    for _ in range(ROUNDS):
        if not analysis.prunable:
            break
        keep = _trial(analysis, granularity, budget)
        if keep is None:
            break
        small = Surgery(keep)(gm).gm
        back = rebuild(model, gm, small, analysis, removed_labels(analysis, keep), granularity)
        if back.module is not None:
            break
        texts = _alike(model, back.problems.at)
        if back.problems.rotary and share_rotary and not tried_joint and _share_rotary_dims(analysis):
            tried_joint = True
            continue
        hit, why = [], {}
        for g in analysis.prunable:
            rotary = back.problems.rotary and g.kind == "qk" and g.dims is not None
            owners = [path for path in texts if path == "" or any(p.startswith(path + ".") for p in _params(g))]
            if rotary or owners:
                hit.append(g)
                why[g.id] = reason_of(([back.problems[0]] if rotary else []) + [t for path in owners for t in texts[path]])
        if not hit:
            wide = [g for g in analysis.prunable if g.whole_heads]
            if not wide:
                log.info("own_class: the trial cut fails without naming a module (%s); nothing more is excluded",
                         back.reason)
                break
            hit = wide  # their whole heads are what the trial changed: they stay whole
            why = {g.id: back.reason for g in wide}
        done: set[int] = set()
        for g in hit:
            if g.id in done:  # done with its site
                continue
            site = _site_groups(analysis, g)
            done.update(o.id for o in site)
            for o in site:
                o.joint = None
            if _heads_can_go(analysis, site):
                for o in site:
                    o.whole_heads = f"its class cannot cut head dims: {why[g.id]}"
            else:
                context = _whole_partner(analysis, g)
                for o in site:
                    o.prunable = False
                    o.reason = f"its module cannot express a cut (own_class=True): {why[g.id]}{context}"
    lines = [f"{g.where} {g.kind}: whole heads only; {g.whole_heads}" for g in analysis.prunable
             if g.whole_heads and not g.head_is_channel]
    lines += [f"{g.where} {g.kind}: head dims shared by every rotary layer; {g.joint}" for g in analysis.prunable
              if g.joint]
    lines += [f"{g.where} {g.kind}: left whole; {g.reason}" for g in analysis.groups
              if not g.prunable and g.reason and "own_class=True" in g.reason]
    if lines:
        log.info("own_class: %d groups restricted so that the model's own class can express the cut (whole heads "
                 "or left whole; own_class=False cuts the graph alone, wider)", len(lines))
    return lines
