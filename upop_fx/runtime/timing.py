"""Timing: callables run interleaved, warmed up, the median of many runs — so that they all see the same load.

Example:
    >>> import torch
    >>> from upop_fx.runtime.timing import time_interleaved
    >>> a, b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 16)
    >>> x = torch.randn(8, 64)
    >>> ms_a, ms_b = time_interleaved(lambda: a(x), lambda: b(x), runs=5, warmup=1)
    >>> ms_a > 0 and ms_b > 0
    True
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["time_interleaved", "saved_interleaved", "clock", "load_average", "cpu_name"]

#: the clock every timed call reads (seconds, monotonic); tests put a simulated clock here
clock = time.perf_counter


def cpu_name(default: str | None = None) -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``), else ``default``, else what ``platform`` says (on
    Linux only the architecture: ``x86_64`` for every x86 CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default if default is not None else platform.processor() or platform.machine()


def load_average() -> float | None:
    """The machine's 1-minute load average (recorded beside every timing), or None where the OS has none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def time_interleaved(*fns: Callable[[], Any], runs: int = 20, warmup: int = 3, alternate: bool = False) -> list[float]:
    """Median milliseconds of each callable, the callables run in turn.

    Each of ``warmup`` warm-up rounds calls every callable once, in order; each of ``runs`` timed rounds then
    does the same, timing every call with :data:`clock` (:func:`time.perf_counter`). With ``alternate`` the timed rounds run in
    reverse order every other round (a, b, c, c, b, a, a, b, c, ...), so that no callable always runs right
    after the same other one. Every callable is called ``warmup + runs`` times.

    Args:
        fns: the callables, taking no argument (their results are discarded).
        runs: timed rounds (the median is over these), at least 1.
        warmup: untimed rounds first, at least 0.
        alternate: reverse the order of the calls in every odd-numbered timed round.

    Returns:
        One median time in milliseconds per callable, in the order of ``fns``.

    Raises:
        ConfigError: no callable, something that is not callable (``runs`` and ``warmup`` are keyword-only),
            or ``runs`` / ``warmup`` out of range.

    Example:
        >>> calls = []
        >>> medians = time_interleaved(lambda: calls.append("a"), lambda: calls.append("b"), runs=2, warmup=1,
        ...                            alternate=True)
        >>> len(medians), "".join(calls)
        (2, 'ababba')
    """
    return [statistics.median(t) for t in _rounds(fns, runs, warmup, alternate)]


def saved_interleaved(base: Callable[[], Any], *fns: Callable[[], Any], runs: int = 20, warmup: int = 3,
                      alternate: bool = True) -> tuple[float, list[float]]:
    """The median milliseconds of ``base`` and, for each of ``fns``, the median over the timed rounds of the
    fraction of ``base``'s time it saves *in that round*: ``(base_r − fn_r) / base_r``. A slowdown that lasts a
    few rounds (another job on a shared machine) slows both calls of those rounds alike and cancels out, where a
    ratio of medians taken over the whole run would keep part of it. Runs as :func:`time_interleaved`.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 16)
        >>> x = torch.randn(64, 256)
        >>> base_ms, (saved,) = saved_interleaved(lambda: a(x), lambda: b(x), runs=5, warmup=1)
        >>> base_ms > 0 and saved < 1
        True
    """
    times = _rounds((base, *fns), runs, warmup, alternate)
    fractions = [statistics.median((b - t) / b for b, t in zip(times[0], ts)) for ts in times[1:]]
    return statistics.median(times[0]), fractions


def _rounds(fns: tuple[Callable[[], Any], ...], runs: int, warmup: int, alternate: bool) -> list[list[float]]:
    """Every timed call of every callable, in milliseconds (``times[i][r]``: callable ``i``, round ``r``)."""
    if not fns:
        raise ConfigError("time_interleaved needs at least one callable")
    for f in fns:
        if not callable(f):
            raise ConfigError(f"time_interleaved takes callables (runs= and warmup= by keyword), got {f!r}")
    for name, value, least in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an int >= {least}, got {value!r}")
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    forward = list(range(len(fns)))
    for r in range(runs):
        for i in (forward[::-1] if alternate and r % 2 else forward):
            t0 = clock()
            fns[i]()
            times[i].append((clock() - t0) * 1e3)
    return times
