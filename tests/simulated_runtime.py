"""A simulated runtime for the latency budget's logic: no wall-clock time in any assertion.

A model's "latency" is a deterministic function of the model (by default a fixed overhead plus a cost per
parameter), and a simulated clock advances by it each time the model runs. Installed in place of a real runtime
(:data:`upop_fx.runtime.runners.RUNNERS`) and of the timing clock (:data:`upop_fx.runtime.timing.clock`), it
lets the tables, the floor cut, the refusal of an unreachable ratio and the calibration loop run end to end —
the same code as on a real runtime, on a machine under any load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from upop_fx.runtime import runners, timing


def params_ms(gm: torch.nn.Module, overhead: float = 2.0, per_param: float = 1e-5) -> float:
    """``overhead`` ms plus ``per_param`` ms per parameter: what every prunable channel saves is exact and
    additive, so a cut's measured latency is its prediction."""
    return overhead + per_param * sum(p.numel() for p in gm.parameters())


class SimulatedRuntime:
    """Runs a model by advancing a simulated clock by ``ms_of(model)`` milliseconds."""

    def __init__(self, ms_of: Callable[[torch.nn.Module], float] = params_ms) -> None:
        self.ms_of = ms_of
        self.now = 0.0
        self.built: list[tuple[str, float]] = []  #: (name, simulated ms) of every model built, in order

    def clock(self) -> float:
        return self.now

    def build(self, runtime: str, gm: torch.nn.Module, inputs: Any, workdir: Path, name: str,
              export_inputs: Any = None) -> Callable[[], None]:
        ms = self.ms_of(gm)
        self.built.append((name, ms))

        def call() -> None:
            self.now += ms / 1e3

        return call

    def install(self, monkeypatch: Any, runtime: str = "torch-cpu") -> SimulatedRuntime:
        monkeypatch.setitem(runners.RUNNERS, runtime, self.build)
        monkeypatch.setattr(timing, "clock", self.clock)
        return self


class SimulatedClockOnRealRuntime(SimulatedRuntime):
    """The real runtime builds and runs every model (an ONNX Runtime session on the exported file, say), while
    the clock is the simulated one: the export and deployment path is exercised for real, and every timing-based
    decision is still a deterministic function of the model."""

    def install(self, monkeypatch: Any, runtime: str = "torch-cpu") -> SimulatedRuntime:
        self.real_build = runners.RUNNERS[runtime]
        return super().install(monkeypatch, runtime)

    def build(self, runtime: str, gm: torch.nn.Module, inputs: Any, workdir: Path, name: str,
              export_inputs: Any = None) -> Callable[[], None]:
        real_call = self.real_build(runtime, gm, inputs, workdir, name, export_inputs)
        simulated = super().build(runtime, gm, inputs, workdir, name, export_inputs)

        def call() -> None:
            real_call()
            simulated()

        return call
