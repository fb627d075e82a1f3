"""Shared helpers for the benchmark scripts: machine description, result files, markdown tables."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from upop_fx.runtime.timing import cpu_name

__all__ = [
    "machine", "cpu_name", "write_results", "markdown_table", "quiet_timing", "match_speedup", "arg_parser", "RESULTS",
    "perplexity", "RssPeak",
]  # fmt: skip

RESULTS = Path(__file__).resolve().parent / "results"
#: a group timed under a higher 1-minute load average is timed again (a ratio measured on a loaded 2-core
#: machine is not a measurement)
MAX_LOAD = 1.5

log = logging.getLogger("benchmarks")


def _busy_seconds() -> float | None:
    """CPU seconds every process on the machine has run (all cores), from /proc/stat; None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def quiet_timing(timer: Callable[[], list[float]], max_load: float = MAX_LOAD, tries: int = 3,
                 pause: float = 30.0, max_others: float = 0.5) -> tuple[list[float], dict[str, Any]]:
    """Run ``timer`` (one interleaved timed group) on a quiet machine, and say how quiet it was.

    The 1-minute load average is recorded before and after the group. The group itself raises it (a timed
    runtime keeps every core busy), so the load *after* cannot tell another job from this one; what can is the
    CPU time the other processes used during the group (``/proc/stat`` minus this process's CPU time), in cores:
    ``others``. Before each try the guard waits (``pause`` seconds at a time, up to ``tries`` times) for the load
    average to fall to ``max_load``; a group whose load before was above ``max_load`` or during which the
    others used more than ``max_others`` cores is timed again, up to ``tries`` times. Returns the last times
    and ``{"load_before", "load_after", "others", "loaded", "tries"}`` (``loaded``: it never ran quiet).
    """
    for attempt in range(1, tries + 1):
        for _ in range(tries):
            if os.getloadavg()[0] <= max_load:
                break
            time.sleep(pause)
        before, busy0, own0, t0 = os.getloadavg()[0], _busy_seconds(), time.process_time(), time.perf_counter()
        ms = timer()
        busy1, own1, wall = _busy_seconds(), time.process_time(), time.perf_counter() - t0
        after = os.getloadavg()[0]
        others = max(0.0, (busy1 - busy0 - (own1 - own0)) / wall) if busy0 is not None and busy1 is not None else None
        quiet = before <= max_load and (others is None or others <= max_others)
        info = {"load_before": before, "load_after": after, "others": others, "loaded": not quiet, "tries": attempt}
        if quiet:
            return ms, info
        log.warning("timed under load: load average %.2f before (max %.2f), other processes %s cores (max %.2f); "
                    "try %d of %d", before, max_load, f"{others:.2f}" if others is not None else "?", max_others,
                    attempt, tries)
    return ms, info


def match_speedup(make: Callable[[float], Any], speedup_of: Callable[[Any], float], target: float, ratio: float,
                  probes: int = 3, tolerance: float = 0.03) -> tuple[Any, float, float, list[tuple[float, float]]]:
    """The ratio at which ``make(ratio)`` (a pruned model) runs ``target`` times faster, by measurement.

    ``speedup_of(model)`` measures a speedup. The time left is taken to fall linearly with the ratio: the
    first step fits a line through (0, 1) and the first probe, the next ones through the last two probes. A probe
    of a ratio already tried (the step clamped at 0.95, say) times that model again instead of rebuilding it, and
    the ratio's speedup is the mean of its timings. Stops within ``tolerance`` of ``target`` or after ``probes``
    probes; returns the ratio whose mean speedup is closest to ``target``: ``(model, ratio, mean speedup,
    [(ratio, speedup) of each probe, in order])``.
    """
    made: dict[float, tuple[Any, list[float]]] = {}  # ratio -> (model, its timings)
    tried: list[tuple[float, float]] = []  # (ratio, its own timing) of each probe, in order
    for _ in range(probes):
        if ratio not in made:
            made[ratio] = (make(ratio), [])
        model, timings = made[ratio]
        timings.append(speedup_of(model))
        speedup = sum(timings) / len(timings)
        tried.append((ratio, timings[-1]))
        log.info("speed match: ratio %.3f -> %.3fx (target %.3fx%s)", ratio, timings[-1], target,
                 f"; mean of {len(timings)}: {speedup:.3f}x" if len(timings) > 1 else "")
        if abs(speedup / target - 1) <= tolerance:
            break
        (r0, s0), (r1, s1) = ((0.0, 1.0), (ratio, speedup)) if len(tried) == 1 else (tried[-2], (ratio, speedup))
        slope = (1 / s1 - 1 / s0) / (r1 - r0) if r1 != r0 else 0.0
        if slope >= 0:  # no progress to extrapolate from: step by the shortfall
            ratio = float(min(0.95, max(0.0, ratio * (1 - 1 / target) / max(1e-3, 1 - 1 / speedup))))
        else:
            ratio = float(min(0.95, max(0.0, r1 + (1 / target - 1 / s1) / slope)))
    means = {r: sum(t) / len(t) for r, (_, t) in made.items()}
    best = min(means, key=lambda r: abs(means[r] / target - 1))
    return made[best][0], best, means[best], tried


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: its question (the docstring's first paragraph) as the description, the rest of
    its docstring (setup, outputs, how to run it) after the options."""
    question, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=question, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


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
        if isinstance(v, bool):  # before int: a bool is an int, and would print as 0 or 1
            return "yes" if v else "no"
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


def seed_summary(rows: list[dict[str, Any]], key: str, metrics: list[str]) -> list[dict[str, Any]]:
    """Per value of ``rows[i][key]`` (in order of appearance): the number of seeds, and for each of ``metrics``
    ``"mean ± std"`` (sample std; 0 for one seed) with the mean and the std alone under ``<metric>_mean`` and
    ``<metric>_std``."""
    out = []
    for label in dict.fromkeys(r[key] for r in rows):
        mine = [r for r in rows if r[key] == label]
        entry: dict[str, Any] = {key: label, "seeds": len(mine)}
        for m in metrics:
            values = np.array([r[m] for r in mine], dtype=np.float64)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            entry[m] = f"{values.mean():.3f} ± {std:.3f}"
            entry[f"{m}_mean"], entry[f"{m}_std"] = float(values.mean()), std
        out.append(entry)
    return out


def add_results_options(p: argparse.ArgumentParser, name: str) -> None:
    """``--name`` (the results file's name, default ``name``) and ``--out`` (its directory)."""
    p.add_argument("--name", default=name, help="results file name (without extension)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")


def results_saver(args: argparse.Namespace, columns: list[str], report: Callable[[dict[str, Any]], str]
                  ) -> Callable[[dict[str, Any]], None]:  # fmt: skip
    """``save(payload)``: :func:`write_results` under ``args.name`` and ``args.out`` (:func:`add_results_options`),
    the markdown being ``report(payload)`` — for a run that saves what it measured as it goes."""

    def save(payload: dict[str, Any]) -> None:
        write_results(args.name, payload, columns, args.out, markdown=report(payload))

    return save


def lm_held_out(tok: Any, blocks: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The decoder benchmarks' held-out text, by name: BBC News held-out articles and Python's documentation
    (``pydoc_data.topics``, out of domain), each its first ``blocks`` batches of 4 × 256 tokens with ``labels``."""
    from upop_fx import datasets

    return {"bbc": list(datasets.lm_batches(datasets.bbc_texts("held_out"), tok, block=256, batch=4, limit=blocks)),
            "pydoc": list(datasets.lm_batches(datasets.pydoc_texts(), tok, block=256, batch=4, limit=blocks))}


def perplexities(model: torch.nn.Module, held: dict[str, list[dict[str, torch.Tensor]]]) -> dict[str, float]:
    """``{"ppl_<name>": perplexity}`` of ``model`` on each held-out text of ``held`` (:func:`lm_held_out`)."""
    return {f"ppl_{k}": perplexity(model, v) for k, v in held.items()}


def perplexity(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """exp of the mean token loss of a causal LM over ``batches`` (its own shifted loss; each batch carries
    ``labels``), weighted by the tokens of each batch."""
    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            n = float(b["input_ids"].numel())
            total += float(model(**b).loss) * n
            count += n
    return math.exp(total / count)


def _rss_mib() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssPeak:
    """The peak resident memory of this process over a block, above its level when the block began, sampled
    every ``interval`` seconds from ``/proc/self/statm`` by a thread (``peak_mib``; None off Linux). Unlike
    ``ru_maxrss``, which only ever rises over a process, it measures one block of a longer run."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_mib = interval, None
        self._stop = threading.Event()

    def _sample(self, base: float) -> None:
        top = base
        while not self._stop.wait(self.interval):
            top = max(top, _rss_mib() or top)
        self.peak_mib = max(top, _rss_mib() or top) - base

    def __enter__(self) -> RssPeak:
        base = _rss_mib()
        self._thread = threading.Thread(target=self._sample, args=(base,), daemon=True) if base is not None else None
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
