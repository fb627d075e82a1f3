"""Shared helpers for the benchmark scripts: machine description, result files, markdown tables."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine", "cpu_name", "write_results", "markdown_table", "RESULTS"]

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name(default: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo, else ``default`` (else what ``platform`` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default if default is not None else platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    name: str, payload: dict[str, Any], columns: list[str], out: Path = RESULTS, markdown: str | None = None
) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under ``out``: ``markdown`` if given, else a table of
    ``payload["rows"]``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown if markdown is not None else markdown_table(payload["rows"], columns) + "\n"
    (out / f"{name}.md").write_text(text)
    return path
