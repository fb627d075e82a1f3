"""Saved artifacts of a compression: ``save(result, example_inputs, DIR)`` and ``load(DIR)``.

``DIR`` receives ``model.pt2`` (``torch.export.save`` of the dense small model, dynamic batch and sequence),
``model.onnx`` (parity-checked in ONNX Runtime), ``report.json`` and ``report.md`` (kept/total per group and
layer, per tower; params and FLOPs before and after), ``widths.png`` (kept width per layer and structure, one
bar chart per tower) and, when ``result.module`` is a Hugging Face model, ``pretrained/`` (it, of the caller's
class, by :func:`~upop_fx.save_pretrained`, with the tokenizer or processor when given). Writing is atomic: everything is staged in a hidden sibling directory and moved into place
only when complete; a failure leaves no partial ``DIR``.

Example:
    >>> import tempfile, torch, upop_fx
    >>> model = torch.nn.TransformerEncoder(
    ...     torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False).eval()
    >>> x = torch.randn(2, 10, 32)
    >>> result = upop_fx.compress(model, x, ratio=0.5, method="magnitude", retrain_steps=0)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = upop_fx.save(result, x, f"{d}/small")
    ...     upop_fx.load(f"{d}/small")(torch.randn(3, 7, 32)).shape
    torch.Size([3, 7, 32])
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .capture.program import export_program, get_capture
from .errors import InputError
from .logs import quietly
from .module.pretrained import from_pretrained, save_pretrained
from .runtime.export import export_onnx

__all__ = ["save", "load", "report_markdown", "FILES", "PRETRAINED"]

log = logging.getLogger(__name__)

FILES = ("model.pt2", "model.onnx", "report.json", "report.md", "widths.png")
PRETRAINED = "pretrained"  #: the folder of the module save, beside FILES, when the result has a Hugging Face module


@quietly
def save(result: Any, example_inputs: Any, directory: str | os.PathLike[str], *, force: bool = False,
         onnx: bool = True, extra: dict[str, Any] | None = None, processor: Any = None) -> Path:
    """Write the artifacts of ``result`` (a :class:`~upop_fx.Result`) into ``directory``, atomically.
    ``processor``: a tokenizer or processor (anything with ``save_pretrained``) saved into ``pretrained/``."""
    dest = Path(directory)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise InputError(f"{dest} exists and is not empty (use force=True / --force to replace it)")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"the parent directory {parent} does not exist")
    with _staging(parent, dest) as stage:
        ep, _, _, _ = export_program(result.model, example_inputs)
        torch.export.save(ep, stage / "model.pt2")
        if onnx:
            export_onnx(result.model, example_inputs, stage / "model.onnx", optimize=False, exported=ep)
        payload = {**result.report.to_dict(), **(extra or {})}
        (stage / "report.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (stage / "report.md").write_text(report_markdown(result.report))
        plot_widths(result.report, stage / "widths.png", title=plot_title(result))
        module = getattr(result, "module", None)
        if module is not None and hasattr(getattr(module, "config", None), "save_pretrained"):
            save_pretrained(module, stage / PRETRAINED, tokenizer=processor, card=report_markdown(result.report))
    log.info("saved %s", dest)
    return dest


def load(directory: str | os.PathLike[str], *, graph: bool = False) -> torch.nn.Module:
    """The model saved by :func:`save` (or by ``upop-fx compress``): the caller's own class from ``pretrained/``
    when it is there (:func:`~upop_fx.from_pretrained`), else — or with ``graph=True`` — the dense small graph
    from ``model.pt2``."""
    if not graph and (Path(directory) / PRETRAINED).is_dir():
        return from_pretrained(Path(directory) / PRETRAINED)
    path = Path(directory) / "model.pt2"
    if not path.is_file():
        raise InputError(f"no model.pt2 in {directory}: not a directory written by upop_fx.save / upop-fx compress")
    _import_output_types(path)
    try:
        return torch.export.load(path).module()
    except Exception as exc:
        raise InputError(f"cannot load {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def _import_output_types(path: Path) -> None:
    """Output types (Hugging Face ModelOutputs) register themselves with pytree when their module is imported;
    the saved program names them, so import those modules before loading."""
    try:
        with zipfile.ZipFile(path) as zf:
            text = " ".join(zf.read(n).decode("utf-8", "ignore") for n in zf.namelist() if n.endswith(".json"))
    except (OSError, zipfile.BadZipFile):
        return
    for module in sorted(set(re.findall(r"(transformers(?:\.[a-z_][\w]*)+)\.[A-Z]\w*", text))):
        try:
            importlib.import_module(module)
        except ImportError:
            log.debug("could not import %s", module)


@contextlib.contextmanager
def _staging(parent: Path, dest: Path) -> Iterator[Path]:
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
    try:
        yield stage
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=parent))
            os.replace(dest, old / "d")
            os.replace(stage, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def report_markdown(report: Any) -> str:
    """The report as markdown: totals, per tower, and one row per group."""
    lines = [
        f"# upop_fx report — {report.method}, ratio {report.ratio}",
        "",
        f"budget: {report.budget}; granularity: {report.granularity}",
        "",
        "| | before | after | reduction |",
        "|---|---|---|---|",
        f"| parameters | {report.params_before} | {report.params_after} | {report.params_before / max(report.params_after, 1):.3f}x |",
        f"| FLOPs | {report.flops_before} | {report.flops_after} | {report.flops_before / max(report.flops_after, 1):.3f}x |",
        "",
        f"prunable {report.budget} removed: {report.prunable_cost_removed:.4f}",
        "",
        "## Per tower",
        "",
        "| tower | kept fraction |",
        "|---|---|",
    ]
    for name, t in report.towers().items():
        lines.append(f"| {name} | {t['kept_fraction']:.4f} |")
    lines += ["", "## Per group", "", "| group | tower | layer | kind | heads x dim | kept | total |", "|---|---|---|---|---|---|---|"]
    for r in report.groups:
        kind = ("cross-" if r.cross else "") + r.kind
        lines.append(f"| {r.group} | {r.tower or r.where} | {r.layer} | {kind} | {r.shape} | {r.kept} | {r.total} |")
    if report.not_prunable:
        lines += ["", "## Not prunable", ""] + [f"- {d}" for d in report.not_prunable]
    return "\n".join(lines) + "\n"


def plot_title(result: Any) -> str:
    """The model, the method and budget, and the speedup measured (``budget="latency"``) or the FLOPs cut."""
    report = result.report
    try:
        name = get_capture(result.dense).model_name
    except Exception:  # noqa: BLE001 - a result assembled by hand: no capture record to name the model
        name = "model"
    if report.latency:
        gain = f"measured {report.latency['measured_speedup']:.2f}x on {report.latency['runtime']}"
    else:
        gain = f"FLOPs {report.flops_before / max(report.flops_after, 1):.2f}x fewer"
    return f"{name}: {report.method}, budget={report.budget}, {gain}"


def plot_widths(report: Any, path: Path, title: str | None = None) -> None:
    """Kept width per layer and structure, one bar chart per tower; ``title`` above them (see
    :func:`plot_title`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    towers = sorted({r.tower or "<root>" for r in report.groups})
    fig, axes = plt.subplots(len(towers), 1, figsize=(9, 2.8 * len(towers)), squeeze=False)
    for ax, tower in zip(axes[:, 0], towers):
        rows = [r for r in report.groups if (r.tower or "<root>") == tower]
        kinds = sorted({("cross-" if r.cross else "") + r.kind for r in rows})
        layers = sorted({r.layer for r in rows})
        width = 0.8 / max(len(kinds), 1)
        for k, kind in enumerate(kinds):
            xs, ys = [], []
            for r in rows:
                if ("cross-" if r.cross else "") + r.kind == kind:
                    xs.append(layers.index(r.layer) + k * width)
                    ys.append(100.0 * r.kept / r.total)
            ax.bar(xs, ys, width=width, label=kind)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], [str(x) for x in layers])
        ax.set_ylim(0, 105)
        ax.set_ylabel("kept %")
        ax.set_title(f"{tower}: kept width per layer")
        ax.legend(fontsize=8, ncols=len(kinds))
    axes[-1, 0].set_xlabel("layer")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
