"""The typed data that passes exchange: channel blocks, parameter uses, attention sites and dimension groups.

Vocabulary:
    label     an integer naming one channel of one producing op (a row of a Linear weight, say).
    class     a set of labels that must be removed together (their union-find root).
    Block     where the labels sit on a tensor: ``node.meta["upop_dims"]`` (see :data:`DIMS_KEY`).
    ParamUse  one parameter axis whose entries are tied to labels (sliced by surgery).
    DimGroup  the classes of one coupled structure (an attention layer's q/k dims, its v dims, an MLP's
              hidden neurons), in a canonical channel order, with each channel's exact cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import NoPrunableGroupError

__all__ = [
    "DIMS_KEY",
    "GROUPS_KEY",
    "Block",
    "ParamUse",
    "AttentionSite",
    "TableUse",
    "HeadCopies",
    "Padding",
    "followers",
    "followers_removed",
    "DimGroup",
    "GroupAnalysis",
    "get_analysis",
]

#: ``node.meta`` key holding the node's :class:`Block` (or a list of them for multi-output nodes, or None).
DIMS_KEY = "upop_dims"
#: ``gm.meta`` key holding the :class:`GroupAnalysis` of a graph.
GROUPS_KEY = "upop_groups"

GroupKind = Literal["qk", "v", "mlp", "other"]


@dataclass
class Block:
    """Channel labels carried by a tensor.

    ``axes`` are the tensor axes that carry labels (increasing); ``labels`` has one dimension per axis. A tensor
    axis may also hold an unlabelled *outer* factor (``view(T, B, C) → (T, B·H, d)`` puts the batch outside the
    head index): then ``size(axis) == outer[i] * labels.shape[i]``.
    ``zero`` says whether a removed channel is exactly zero here when its producers are zeroed.
    """

    axes: tuple[int, ...]
    labels: np.ndarray
    outer: tuple[Any, ...] = ()
    zero: bool = True

    def __post_init__(self) -> None:
        if not self.outer:
            self.outer = (1,) * len(self.axes)
        assert len(self.axes) == self.labels.ndim == len(self.outer), (self.axes, self.labels.shape, self.outer)

    def axis_labels(self, axis: int) -> int:
        return int(self.labels.shape[self.axes.index(axis)])


@dataclass
class ParamUse:
    """Parameter (or buffer) ``name`` has its entries along ``axis`` tied to ``labels`` (one per entry).

    ``role`` is ``"out"`` where the entry produces the channel's value (weight rows, biases, scales) and
    ``"in"`` where it consumes it (the contracted axis of a following Linear). When an op uses a *view* of the
    parameter (a chunk of a packed projection, a transposed weight), ``positions`` says which entries along
    ``axis`` the labels tie (one per label); the other entries are not tied by this use. ``size`` is the length
    of ``axis``.
    """

    name: str
    axis: int
    labels: np.ndarray
    role: Literal["in", "out"]
    node: str
    flops: float = 0.0  # FLOPs per entry on the example batch (matmul-like ops only)
    positions: np.ndarray | None = None
    size: int = -1

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.labels)

    @property
    def where(self) -> np.ndarray:
        """The entries along ``axis`` tied by this use, one per label."""
        return self.positions if self.positions is not None else np.arange(len(self.labels))

    def full(self, per_label: np.ndarray, fill: object) -> np.ndarray:
        """``per_label`` (one value per label) spread over the whole axis, ``fill`` where this use ties nothing."""
        if self.positions is None:
            return np.asarray(per_label)
        out = np.full(self.size, fill, dtype=np.asarray(per_label).dtype)
        out[self.positions] = per_label
        return out


@dataclass
class TableUse:
    """A computed tensor that multiplies channels elementwise (RoPE's cos/sin): operand ``operand`` of node
    ``node`` runs along ``axis`` with the channels ``labels`` (one column per entry of that axis; rows: the
    other labelled axes it broadcasts over). Surgery keeps the entries whose channels stay (an
    ``index_select`` per use, so a table shared by layers is sliced for each as that layer needs)."""

    node: str
    operand: int
    axis: int
    labels: np.ndarray  # (rows, size of axis)


@dataclass
class HeadCopies:
    """Channels that ``node`` (an ``expand``) broadcasts over an attention's query heads — multi-query attention's
    one key/value head, latent attention's rotary key part — labelled afresh in every head: ``copies[h]`` are head
    ``h``'s copies of ``source`` (``copies.shape == (heads, *source.shape)``). A query head goes with its copies; a
    source channel (its projection's row) goes only when every copy of it goes (:func:`followers_removed`)."""

    node: str
    copies: np.ndarray
    source: np.ndarray


@dataclass
class Padding:
    """Positions a constant pad (``node``) adds along a channel axis (a head dim padded to a kernel's size),
    labelled afresh: ``labels[i]`` are the added positions of row ``i`` (one position of the block's other
    labelled axes: a head), ``rows[i]`` the labels of the row they extend. A padded position is no channel of any
    weight: it goes only with its whole row (a removed head takes its padding along), so the pad widths never
    change."""

    node: str
    labels: np.ndarray  # (rows, added positions)
    rows: np.ndarray  # (rows, channels of the padded axis)


def followers(copies: list[HeadCopies], paddings: list[Padding]) -> tuple[np.ndarray, np.ndarray]:
    """Labels that follow others, elementwise ``(follower, leader)``: a follower's class goes only when the leaders
    of all its labels are removed — a broadcast head's source with its copies, a padded position with its row."""
    pairs = [np.broadcast_arrays(c.source, c.copies) for c in copies]
    pairs += [np.broadcast_arrays(p.labels[:, :, None], p.rows[:, None, :]) for p in paddings]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return (np.concatenate([f.reshape(-1) for f, _ in pairs]).astype(np.int64),
            np.concatenate([lead.reshape(-1) for _, lead in pairs]).astype(np.int64))


def followers_removed(copies: list[HeadCopies], paddings: list[Padding], removed: np.ndarray,
                      label_class: np.ndarray) -> np.ndarray:
    """Boolean array over labels: ``removed`` (a boolean array over labels) with every follower class
    (:func:`followers`; ``label_class``: label -> class) whose every label's every leader is removed: a source goes
    with its last copy, a padded position with its row. Repeated until nothing changes (a pad of copies follows
    them)."""
    follower, leader = followers(copies, paddings)
    out = removed.copy()
    is_follower = np.zeros_like(out)
    is_follower[follower] = True
    while follower.size:
        kept_any = np.zeros_like(out)
        np.logical_or.at(kept_any, follower, ~out[leader])
        gone = np.setdiff1d(label_class[is_follower & ~kept_any], label_class[is_follower & kept_any])
        now = out | np.isin(label_class, gone)
        if np.array_equal(now, out):
            break
        out = now
    return out


@dataclass
class AttentionSite:
    """One scaled-dot-product attention: the labels of its q, k and v head blocks, each (heads, head_dim)."""

    node: str
    q: np.ndarray | None
    k: np.ndarray | None
    v: np.ndarray | None
    scale: float | None
    index: int
    flops_qk: float = 0.0  # FLOPs per q/k entry (one head, one dim) on the example batch
    flops_v: float = 0.0
    cross: bool = False
    fixed_heads: str | None = None  # why whole heads cannot be removed here (a per-head additive bias: ALiBi)


@dataclass
class DimGroup:
    """One set of coupled channels: removing channel ``c`` means removing every entry tied to it.

    Channels are numbered ``0 .. width-1``; for attention groups channel ``c`` is head ``c // head_dim``,
    dim ``c % head_dim``. Where a rotary embedding couples q/k dims in pairs (``j`` with ``j + d/2``, or ``2i``
    with ``2i + 1``; with partial rotary only the rotated dims), a channel may be a *pair*: ``head_dim`` counts
    channels per head, ``dims[j]`` gives the positions within the head of channel ``j`` (one or two), and
    :attr:`head_positions` the head's size in positions. ``cost_params[c]`` is the number of parameters removed with channel ``c``;
    ``cost_flops[c]`` the FLOPs per sample it saves at the example sequence length (matmuls and attention,
    including the T×T terms).
    """

    id: int
    kind: GroupKind
    width: int
    tower: str
    layer: int
    scope: str
    heads: int | None = None
    head_dim: int | None = None
    cross: bool = False
    site: int | None = None
    prunable: bool = True
    reason: str | None = None
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    producers: list[tuple[str, int, np.ndarray]] = field(default_factory=list, repr=False)
    consumers: list[tuple[str, int, np.ndarray]] = field(default_factory=list, repr=False)
    shape_nodes: list[str] = field(default_factory=list, repr=False)
    cost_params: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    cost_flops: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    dims: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False)  #: positions of each channel
    #: stacked experts (an MoE layer's ``[E, ...]`` weights): channel ``c`` is neuron ``c`` of each of them
    experts: int | None = None
    #: why only whole heads of this attention group can go: the graph couples a head's dims (a per-head q/k norm:
    #: then a channel is a whole head), or the model's class fixes its head size
    #: (:mod:`upop_fx.module.class_limits`); None: head dims can go too
    whole_heads: str | None = None
    #: attention groups with the same key keep the same head dims (their rotary pairs, and v as many), one
    #: structure of entries over all of them: the model's class computes one rotary table for every layer
    #: (:mod:`upop_fx.module.class_limits`); None: each layer keeps its own
    joint: str | None = None

    def positions(self, j: int) -> list[int]:
        """The positions within a head of channel ``j`` of a head (``[j]`` unless paired)."""
        return [j] if self.dims is None else list(self.dims[j])

    @property
    def head_is_channel(self) -> bool:
        """Each head is one channel: the graph couples a head's dims (a per-head q/k norm), so only whole heads
        can go, whatever the model's class."""
        return self.dims is not None and len(self.dims) == 1 and len(self.dims[0]) > 1

    @property
    def head_positions(self) -> int | None:
        """Positions (dims) per head: ``head_dim``, or more where rotary pairs are channels."""
        if self.head_dim is None or self.dims is None:
            return self.head_dim
        return sum(len(d) for d in self.dims)

    def kept_positions(self, channels: list[int]) -> int:
        """How many positions ``channels`` (indices into this group) cover."""
        if self.dims is None or not self.head_dim:
            return len(channels)
        return sum(len(self.dims[c % self.head_dim]) for c in channels)

    @property
    def where(self) -> str:
        """Where the group is, for people: ``tower[layer]``, else the modules' common scope, else (a group whose
        modules share only the root, e.g. a pooler feeding a classifier) the modules that produce it."""
        if self.layer >= 0:
            return f"{self.tower}[{self.layer}]"
        if self.scope:
            return self.scope
        modules = list(dict.fromkeys(name.rpartition(".")[0] or name for name, _, _ in self.producers))
        if not modules:
            return "<root>"
        more = f" and {len(modules) - 2} more" if len(modules) > 2 else ""
        return ", ".join(modules[:2]) + more

    def describe(self) -> str:
        pairs = ""
        if self.dims is not None:
            n = sum(len(d) == 2 for d in self.dims)
            pairs = f" (rotary: {n} pairs of {self.head_dim} channels per head)"
        heads = f" heads={self.heads}x{self.head_positions}{pairs}" if self.heads else ""
        where = self.where
        cross = " cross" if self.cross else ""
        state = "" if self.prunable else f" (not prunable: {self.reason})"
        if self.prunable and self.whole_heads:
            state = f" (whole heads only: {self.whole_heads})"
        experts = f" experts={self.experts}" if self.experts else ""
        return f"#{self.id} {self.kind}{cross} {where}{heads}{experts} width={self.width}{state}"

    def signature(self) -> tuple[Any, ...]:
        """(kind, tower, layer, heads, head_dim, width, cross): what golden listings compare."""
        return (self.kind, self.tower, self.layer, self.heads, self.head_dim, self.width, self.cross)


@dataclass
class GroupAnalysis:
    """Result of :class:`~upop_fx.passes.find_groups.FindGroups`, stored under ``gm.meta[GROUPS_KEY]``."""

    groups: list[DimGroup]
    uses: list[ParamUse]
    sites: list[AttentionSite]
    label_class: np.ndarray  # label -> class id (its union-find root)
    class_channel: dict[int, tuple[int, int]]  # class id -> (group id, channel index)
    batch_size: int
    seeded: list[str] = field(default_factory=list)  # nodes whose output channels were labelled (in a group)
    tables: list[TableUse] = field(default_factory=list)  # computed tensors multiplying channels (RoPE cos/sin)
    copies: list[HeadCopies] = field(default_factory=list)  # channels broadcast over the query heads, per head
    paddings: list[Padding] = field(default_factory=list)  # positions a constant pad adds along a channel axis

    def __deepcopy__(self, memo: dict[int, Any]) -> GroupAnalysis:
        """Shared, not copied: the analysis is read-only once :class:`~upop_fx.passes.find_groups.FindGroups` made
        it, and a graph copied for a cut or a reference would otherwise copy a class per vocabulary entry of an LM
        head each time."""
        return self

    @property
    def prunable(self) -> list[DimGroup]:
        return [g for g in self.groups if g.prunable]

    def require_prunable(self, model_name: str) -> None:
        """Raise :class:`~upop_fx.errors.NoPrunableGroupError`, with the reasons, when nothing can be pruned."""
        if self.prunable:
            return
        reasons = sorted({g.reason for g in self.groups if g.reason})[:5]
        raise NoPrunableGroupError(
            f"{model_name} has no prunable group of channels; reasons: " + "; ".join(reasons or ["none found"])
        )


def get_analysis(gm: torch.fx.GraphModule) -> GroupAnalysis:
    """The group analysis of ``gm``; raises if :class:`FindGroups` has not been run on it."""
    analysis = getattr(gm, "meta", {}).get(GROUPS_KEY)
    if analysis is None:
        raise LookupError("no dimension-group analysis on this graph (gm.meta['upop_groups']): run FindGroups first")
    return analysis
