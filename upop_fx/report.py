"""The compression report: what was kept per group and layer, and the model's cost before and after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .capture.program import run_module
from .training.loop import guard_reading

__all__ = ["GroupRow", "Report", "count_params", "count_flops"]


@dataclass
class GroupRow:
    group: int
    kind: str
    tower: str
    layer: int
    heads: int | None
    head_dim: int | None
    kept: int
    total: int
    cross: bool = False
    kept_heads: int | None = None  # attention groups: heads with at least one kept dim
    cost_kept: float = 0.0  # in the report's budget unit (parameters or FLOPs)
    cost_total: float = 0.0

    @property
    def shape(self) -> str:
        """``heads x head_dim`` kept, for attention groups."""
        if not self.heads or not self.kept_heads:
            return ""
        return f"{self.heads}x{self.head_dim}->{self.kept_heads}x{self.kept // self.kept_heads}"

    place: str = ""  # where the group is (:attr:`DimGroup.where`); the rows of older reports lack it

    @property
    def where(self) -> str:
        if self.place:
            return self.place
        return f"{self.tower}[{self.layer}]" if self.layer >= 0 else self.tower or "<root>"


@dataclass
class Report:
    """Per-group kept/total, and params/FLOPs of the whole model before and after (FLOPs on the example inputs,
    counted by ``torch.utils.flop_counter``)."""

    method: str
    ratio: float
    budget: str
    granularity: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    prunable_cost_removed: float  # the fraction of the prunable cost (in `budget` units) removed
    groups: list[GroupRow] = field(default_factory=list)
    not_prunable: list[str] = field(default_factory=list)
    #: ``own_class=True``: per group the model's class could not cut as the graph can, what was done instead
    #: (``"whole heads only; ..."`` or ``"left whole; ..."``) and why
    class_limits: list[str] = field(default_factory=list)
    #: attention groups whose heads go whole in the graph itself (a norm over each head's q/k dims couples them):
    #: where and why
    whole_heads: list[str] = field(default_factory=list)
    #: why ``Result.module`` is None (the cut cannot be expressed by the model's own class); None when it is set
    module_reason: str | None = None
    #: ``budget="latency"``: runtime, shape, the dense latency, the predicted latency after the cut and the
    #: speedup measured on the runtime beside the predicted one; the seconds the latency model took, the classes
    #: measured now (not read from the cache), what the tables sum to with every structure at its narrowest beside
    #: what that floor cut measured (``floor_summed``, ``floor_measured``) and each calibration round (``rounds``);
    #: ``phase`` (``latency_phase``), and for a module that can ``generate()`` on a torch runtime, ``generate``:
    #: prefill and decode with the KV cache, dense and cut, measured
    #: (:func:`~upop_fx.calibration.measured_generation`); with ``phase="decode"`` the rounds were judged by that
    #: decode speedup (each round's ``graph_speedup`` is the graph's one token)
    latency: dict[str, Any] | None = None
    #: sizes the model's code fixed at capture (``"batch 2 (input 'x', axis 0)"``): the graph runs only at those
    runs_only_at: list[str] = field(default_factory=list)
    #: the layers re-fitted after the cut (``options.reconstruct``): weight, calibration rows, relative error on
    #: the calibration batches before and after (:class:`~upop_fx.training.reconstruct.LayerFit`)
    reconstruction: list[dict[str, Any]] = field(default_factory=list)
    #: the retrain's check loss ``[steps done, loss]`` (measured on held batches before the first step and along
    #: the way); the weights kept are those of the lowest. With ``retrain_scored``, minus ``options.retrain_score``
    retrain_check: list[list[float]] = field(default_factory=list)
    #: whether ``retrain_check`` holds minus the caller's ``retrain_score`` rather than a check loss
    retrain_scored: bool = False
    #: wall-clock seconds of each phase of the run, in the order they ran (capture, groups, latency tables,
    #: selection, cut, latency calibration, report, reconstruction, rebuild, generate, retrain: those it had)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["towers"] = self.towers()
        return out

    def towers(self) -> dict[str, dict[str, float]]:
        """Per tower (the module list holding the layers): the kept fraction of its prunable cost, overall and
        per layer — what the unified ranking chose for each modality."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.groups:
            t = out.setdefault(r.tower or "<root>", {"kept": 0.0, "total": 0.0, "layers": {}})
            t["kept"] += r.cost_kept
            t["total"] += r.cost_total
            layer = t["layers"].setdefault(r.layer, [0.0, 0.0])
            layer[0] += r.cost_kept
            layer[1] += r.cost_total
        return {
            name: {
                "kept_fraction": t["kept"] / t["total"] if t["total"] else 1.0,
                "layers": {layer: k / n if n else 1.0 for layer, (k, n) in sorted(t["layers"].items())},
            }
            for name, t in out.items()
        }

    def table(self) -> str:
        """A readable plain-text table."""
        lines = [
            f"method={self.method} ratio={self.ratio} budget={self.budget} granularity={self.granularity}",
            f"{'where':<34} {'kind':<9} {'heads x dim':>14} {'kept':>11} {'kept %':>7}",
        ]
        for r in self.groups:
            kind = ("x-" if r.cross else "") + r.kind
            lines.append(f"{r.where:<34} {kind:<9} {r.shape:>14} {r.kept:>5}/{r.total:<5} {100 * r.kept / r.total:>6.1f}")
        lines += [
            f"parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_before / max(self.params_after, 1):.2f}x smaller)",
            f"FLOPs:      {self.flops_before:,} -> {self.flops_after:,} "
            f"({self.flops_before / max(self.flops_after, 1):.2f}x fewer)",
            f"prunable {self.budget} removed: {100 * self.prunable_cost_removed:.1f}% (asked {100 * self.ratio:.1f}%)",
        ]
        if self.class_limits:
            lines.append(f"restricted to what the model's class can express: {len(self.class_limits)} groups "
                         "(report.class_limits; own_class=False cuts the graph alone, wider)")
        if self.whole_heads:
            lines.append(f"whole heads only (the graph couples each head's dims): {len(self.whole_heads)} groups "
                         "(report.whole_heads)")
        if self.runs_only_at:
            lines.append("runs only at: " + "; ".join(self.runs_only_at) + " (the model's code fixes it)")
        if self.reconstruction:
            before = sum(f["before"] for f in self.reconstruction) / len(self.reconstruction)
            after = sum(f["after"] for f in self.reconstruction) / len(self.reconstruction)
            lines.append(f"reconstruction: {len(self.reconstruction)} layers re-fitted to the dense model, mean "
                         f"relative error {before:.3f} -> {after:.3f} (calibration batches)")
        if self.retrain_check:
            first, best = self.retrain_check[0], min(self.retrain_check, key=lambda h: h[1])
            sign, what = guard_reading(self.retrain_scored)
            lines.append(f"retrain: {what} {sign * first[1]:.4f} at the cut -> {sign * best[1]:.4f}, the weights "
                         f"after {int(best[0])} steps kept")
        if self.latency:
            t = self.latency
            seq = f", seq {t['seq']}" if t.get("seq") else ""
            what = "one decode token" if t.get("phase") == "decode" else "latency"
            lines.append(
                f"{what} on {t['runtime']} (batch {t['batch']}{seq}): predicted "
                f"{t['dense_ms']:.2f} -> {t['predicted_ms']:.2f} ms ({t['predicted_speedup']:.2f}x); measured "
                f"{t['measured_dense_ms']:.2f} -> {t['measured_ms']:.2f} ms ({t['measured_speedup']:.2f}x)"
            )
            if t.get("generate"):
                g = t["generate"]
                lines.append(
                    f"generate with the KV cache (batch {g['batch']}, context {g['context']}): prefill "
                    f"{g['dense']['prefill_ms']:.1f} -> {g['cut']['prefill_ms']:.1f} ms ({g['prefill_speedup']:.2f}x), "
                    f"decode {g['dense']['decode_ms']:.2f} -> {g['cut']['decode_ms']:.2f} ms per token "
                    f"({g['decode_speedup']:.2f}x), measured"
                    + ("; the cut was calibrated to this decode" if any("graph_speedup" in r for r in t.get("rounds", []))
                       else "")
                )
        towers = self.towers()
        if len(towers) > 1:
            lines.append("kept per tower: " + ", ".join(f"{n} {100 * t['kept_fraction']:.1f}%" for n, t in towers.items()))
        if self.seconds:
            lines.append(f"time: {sum(self.seconds.values()):.1f} s (" + ", ".join(
                f"{name} {s:.1f}" for name, s in self.seconds.items()) + ")")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        run_module(module, args, kwargs)
    return int(counter.get_total_flops())
