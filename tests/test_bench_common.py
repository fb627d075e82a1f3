"""The benchmarks' shared load guard: a timed group is kept only when the machine ran quiet around it."""

from __future__ import annotations

import benchmarks.common as common


def _machine(monkeypatch, loads, others_per_group):
    """A fake machine: the load averages read in turn, and the CPU seconds the other processes use per group."""
    loads = iter(loads)
    busy = iter(x for o in others_per_group for x in (0.0, o))  # /proc/stat read before and after each group
    monkeypatch.setattr(common.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(common, "_busy_seconds", lambda: next(busy))
    monkeypatch.setattr(common.time, "process_time", lambda: 0.0)
    clock = iter(range(0, 100, 1))
    monkeypatch.setattr(common.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(common.time, "sleep", lambda s: None)


def test_a_group_with_other_jobs_running_is_timed_again(monkeypatch):
    # try 1: quiet before, but others used 0.9 cores; try 2: quiet
    _machine(monkeypatch, [1.0, 1.0, 1.8, 1.0, 1.0, 1.9], [0.9, 0.1])
    timed = []
    ms, load = common.quiet_timing(lambda: timed.append(1) or [float(len(timed))], max_load=1.5, tries=3)
    assert ms == [2.0] and len(timed) == 2
    assert load["loaded"] is False and load["tries"] == 2 and load["load_after"] == 1.9  # our own load is allowed
    assert abs(load["others"] - 0.1) < 1e-9


def test_a_group_that_never_runs_quiet_is_marked(monkeypatch):
    _machine(monkeypatch, [3.0] * 20, [0.0, 0.0])
    ms, load = common.quiet_timing(lambda: [1.0], max_load=1.5, tries=2)
    assert load["loaded"] is True and load["tries"] == 2 and load["load_before"] == 3.0
