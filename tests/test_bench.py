"""The interleaved timer (call counts and order, not wall time) and the ONNX Runtime session helper."""

from __future__ import annotations

import doctest
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import upop_fx
import upop_fx.runtime.sessions as ort_module
import upop_fx.runtime.speed as bench_module
import upop_fx.runtime.timing as timing_module
from upop_fx.errors import ConfigError
from upop_fx.runtime.sessions import OPTIMIZATION_LEVELS, ort_session
from upop_fx.runtime.speed import time_interleaved


def _recorders(names: str) -> tuple[list[str], list[Callable[[], None]]]:
    calls: list[str] = []
    return calls, [lambda n=n: calls.append(n) for n in names]


@pytest.mark.parametrize("runs,warmup", [(1, 0), (4, 2), (5, 3)])
def test_every_callable_runs_warmup_plus_runs_times_round_robin(runs: int, warmup: int) -> None:
    calls, fns = _recorders("abc")
    medians = time_interleaved(*fns, runs=runs, warmup=warmup)
    assert calls == list("abc") * (warmup + runs)
    assert len(medians) == 3 and all(isinstance(m, float) and m >= 0 for m in medians)


def test_alternate_reverses_every_other_timed_round() -> None:
    calls, fns = _recorders("abc")
    time_interleaved(*fns, runs=4, warmup=1, alternate=True)
    assert "".join(calls) == "abc" + "abc" + "cba" + "abc" + "cba"
    assert {n: calls.count(n) for n in "abc"} == {"a": 5, "b": 5, "c": 5}


def test_one_median_per_callable_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: each call of callable i takes i+1 ms, except one outlier; the median ignores it."""
    now = [0.0]
    monkeypatch.setattr(timing_module, "clock", lambda: now[0])
    slow = iter([50.0])

    def step(ms: float, outlier: bool = False) -> Callable[[], None]:
        def call() -> None:
            now[0] += (next(slow, ms) if outlier else ms) / 1e3
        return call

    medians = time_interleaved(step(1.0, outlier=True), step(2.0), step(3.0), runs=5, warmup=0)
    assert medians == pytest.approx([1.0, 2.0, 3.0])
    assert time_interleaved(step(4.0), runs=3, warmup=1) == pytest.approx([4.0])


def test_savings_are_taken_per_round_so_a_slow_spell_cancels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: the cut always takes 60% of the base's time, and 3 of 5 rounds run 2x slower (another job):
    the saving of every round is 40%, and so is its median; the base's median is that of its slow rounds."""
    now = [0.0]
    monkeypatch.setattr(timing_module, "clock", lambda: now[0])
    factor = [1, 2, 2, 1, 2]  # per round: both calls of a round run alike
    calls = []

    def step(ms: float) -> Callable[[], None]:
        def call() -> None:
            now[0] += ms * factor[len(calls) // 2] / 1e3
            calls.append(ms)
        return call

    base_ms, (saved,) = timing_module.saved_interleaved(step(10.0), step(6.0), runs=5, warmup=0)
    assert saved == pytest.approx(0.4)
    assert base_ms == pytest.approx(20.0)


def test_two_callables_unpack_like_before() -> None:
    ms_a, ms_b = time_interleaved(lambda: None, lambda: None, runs=3, warmup=0)
    assert ms_a >= 0 and ms_b >= 0


@pytest.mark.parametrize("args,kwargs,match", [
    ((), {}, "at least one callable"),
    ((lambda: None, 20), {}, "takes callables"),
    ((lambda: None,), {"runs": 0}, "runs must be"),
    ((lambda: None,), {"runs": True}, "runs must be"),
    ((lambda: None,), {"warmup": -1}, "warmup must be"),
])
def test_bad_arguments(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        time_interleaved(*args, **kwargs)


@pytest.mark.parametrize("module", [bench_module, timing_module, ort_module], ids=["bench", "timing", "ort"])
def test_doctests(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------- sessions

@pytest.fixture(scope="module")
def linear_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Linear, Path]:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).eval()
    info = upop_fx.export_onnx(model, torch.randn(2, 6), tmp_path_factory.mktemp("onnx") / "linear.onnx",
                               optimize=False)
    return model, info.path


@pytest.mark.parametrize("level", list(OPTIMIZATION_LEVELS))
def test_session_runs_an_exported_linear(linear_onnx: tuple[torch.nn.Linear, Path], level: str) -> None:
    model, path = linear_onnx
    session = ort_session(path, level=level, threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert [i.name for i in session.get_inputs()] == ["input_0"]
    x = torch.randn(5, 6)
    (got,) = session.run(None, {"input_0": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_session_saves_the_optimised_graph(linear_onnx: tuple[torch.nn.Linear, Path], tmp_path: Path) -> None:
    _, path = linear_onnx
    out = tmp_path / "linear.opt.onnx"
    ort_session(path, level="extended", optimized_path=out)
    assert out.is_file() and not (tmp_path / "linear.opt.onnx.data").exists()
    (got,) = ort_session(out).run(None, {"input_0": np.ones((3, 6), np.float32)})
    assert got.shape == (3, 4)


def test_session_profile(linear_onnx: tuple[torch.nn.Linear, Path], tmp_path: Path) -> None:
    _, path = linear_onnx
    session = ort_session(path, profile_prefix=str(tmp_path / "prof"))
    session.run(None, {"input_0": np.ones((2, 6), np.float32)})
    profile = Path(session.end_profiling())
    assert profile.is_file() and profile.name.startswith("prof")


@pytest.mark.parametrize("kwargs,match", [({"level": "fast"}, "optimisation level"),
                                          ({"threads": 0}, "threads"), ({"threads": 1.5}, "threads")])
def test_session_bad_arguments(linear_onnx: tuple[torch.nn.Linear, Path], kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ort_session(linear_onnx[1], **kwargs)


def test_time_pair_pytorch_and_onnxruntime(linear_onnx: tuple[torch.nn.Linear, Path]) -> None:
    model, path = linear_onnx
    rows = bench_module.time_pair(model, model, torch.randn(2, 6), path, runs=2)
    assert [r["runtime"] for r in rows] == ["pytorch", "onnxruntime-cpu"]
    assert all(r["ms_dense"] > 0 and r["ms_pruned"] > 0 and r["speedup"] > 0 for r in rows)
