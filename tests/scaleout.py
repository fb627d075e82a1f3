"""Jobs the scale-out tests run in other processes (gloo ranks, a run killed mid-way, the CLI under torchrun).

Importable as ``tests.scaleout`` from the repository root; ``python -m tests.scaleout run CKPT OUT`` runs the
slow checkpointed search that ``test_checkpoint`` kills.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

import upop_fx
from upop_fx.runtime import runners, timing

from .simulated_runtime import SimulatedRuntime, params_ms

D, HEADS, FF, LAYERS = 32, 4, 64, 2
SEARCH, RETRAIN, INTERVAL = 8, 4, 2
CALIBRATION = 2  # batches read between the search and the retrain (reconstruction, the retrain's check)


def encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(D, HEADS, FF, batch_first=True)
    return torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()


def build() -> tuple[torch.nn.Module, torch.Tensor]:
    """``module:function`` for the CLI: the encoder and an example batch."""
    return encoder(), torch.randn(4, 10, D, generator=torch.Generator().manual_seed(1))


def global_batches(n: int = SEARCH + CALIBRATION + RETRAIN, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, target)`` pairs: regress a fixed random map of the input, so that the loss is a plain mean."""
    g = torch.Generator().manual_seed(2)
    proj = torch.randn(D, D, generator=g) / D**0.5
    out = []
    for _ in range(n):
        x = torch.randn(batch, 10, D, generator=g)
        out.append((x, torch.tanh(x @ proj)))
    return out


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out, target)


def summary(result: upop_fx.Result) -> dict[str, Any]:
    probe = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = result.model(probe)
    return {"keep": result.keep, "losses": result.losses, "output": output}


def rank_runtime(rank: int) -> SimulatedRuntime:
    """A simulated runtime that times differently on each rank, as two processes timing on one machine do:
    rank 0 charges every parameter alike; the others charge the feed-forward weights 5x and run every cut 30%
    slower than its parameters say (so their own tables would price other channels, and their own calibration
    would re-select)."""
    if rank == 0:  # a small fixed overhead: the prunable layers are most of the time
        return SimulatedRuntime(lambda gm: params_ms(gm, overhead=0.01))

    def ms_of(gm: torch.nn.Module) -> float:
        return 0.01 + 1e-5 * sum(p.numel() * (5 if "linear" in n else 1) for n, p in gm.named_parameters())

    sim = SimulatedRuntime(ms_of)
    build = sim.build

    def slower_cuts(runtime: str, gm: torch.nn.Module, inputs: Any, workdir: Any, name: str, export_inputs: Any = None):  # noqa: ANN202
        call = build(runtime, gm, inputs, workdir, name, export_inputs)
        if not name.startswith("cut"):
            return call

        def slow() -> None:
            call()
            sim.now += 0.3 * ms_of(gm) / 1e3
        return slow

    sim.build = slower_cuts  # type: ignore[method-assign]
    return sim


#: the modes one spawn of :func:`ddp_worker` runs, in this order (the latency mode patches the runtime: last)
MODES = ("shard", "activation", "models_differ", "selection_differs", "latency")


def ddp_worker(rank: int, world: int, store: str, out: str, modes: tuple[str, ...] = MODES) -> None:
    """One gloo rank running a compress per mode, one after another in one process group (each mode's result or
    error saved to ``{out}.{mode}.{rank}``), then :func:`on_main`'s checks (``{out}.on_main.{rank}``). Modes:
    ``"shard"`` (each rank its half of every global batch), ``"activation"`` (the same, ranked by
    ``method="activation"`` on the calibration batches), ``"models_differ"`` (a different model per rank),
    ``"selection_differs"`` (an allocation that depends on the rank), ``"latency"`` (the shard under a latency
    budget, on a runtime that times differently on each rank: :func:`rank_runtime`)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for mode in modes:
            _compress_mode(rank, world, store, f"{out}.{mode}", mode)
        _on_main_checks(rank, f"{out}.on_main")
    finally:
        torch.distributed.destroy_process_group()


def _compress_mode(rank: int, world: int, store: str, out: str, mode: str) -> None:
    sim = None
    model = encoder(seed=rank if mode == "models_differ" else 0)
    data = global_batches()
    half = data[0][0].shape[0] // world
    shard = [(x[rank * half:(rank + 1) * half], t[rank * half:(rank + 1) * half]) for x, t in data]
    kwargs: dict[str, Any] = {}
    if mode == "selection_differs":
        def allocate(importance, entries, structures, fraction):  # noqa: ANN001, ANN202
            pruned = upop_fx.unified(importance, entries, structures, fraction)
            if rank == 1 and fraction > 0:
                pruned = ~pruned
            return pruned
        kwargs["allocate"] = allocate
    if mode == "activation":
        kwargs["method"] = "activation"
    if mode == "latency":
        os.environ["UPOP_FX_CACHE"] = f"{store}.cache{rank}"  # no rank reads tables another one wrote
        sim = rank_runtime(rank)
        runners.RUNNERS["torch-cpu"] = sim.build
        timing.clock = sim.clock
        kwargs.update(budget="latency", runtime="torch-cpu", ratio=0.3)
    try:
        result = upop_fx.compress(
            model, shard[0][0], **{"ratio": 0.5, **kwargs}, data=shard, loss_fn=mse, search_steps=SEARCH,
            retrain_steps=RETRAIN, interval=INTERVAL, lr=1e-3,
        )  # fmt: skip
        timed = {"latency": result.report.latency, "built": sim.built} if sim is not None else {}
        torch.save({"rank": rank, **summary(result), **timed}, f"{out}.{rank}")
    except upop_fx.UPopError as exc:
        torch.save({"rank": rank, "error": type(exc).__name__, "message": str(exc)}, f"{out}.{rank}")


def _on_main_checks(rank: int, out: str) -> None:
    """:func:`upop_fx.training.distributed.on_main` twice: with a function whose result depends on the rank, then
    with one that raises on rank 0."""
    from upop_fx.training import distributed

    ran: list[int] = []

    def measure() -> dict[str, Any]:
        ran.append(rank)
        return {"rank": rank, "ms": 10.0 + rank}

    got = distributed.on_main(measure)

    def fails() -> None:
        raise upop_fx.ConfigError(f"rank {rank} cannot measure")

    try:
        distributed.on_main(fails)
        error = None
    except upop_fx.ConfigError as exc:
        error = str(exc)
    torch.save({"got": got, "ran": ran, "error": error}, f"{out}.{rank}")


class SlowBatches:
    """A re-iterable over ``batches`` that sleeps before each one (so that a test can kill a run mid-way)."""

    def __init__(self, batches: list[Any], delay: float) -> None:
        self.batches, self.delay = batches, delay

    def __iter__(self):  # noqa: ANN204
        for b in self.batches:
            time.sleep(self.delay)
            yield b


def checkpointed_run(checkpoint_dir: str | None, delay: float = 0.0, every: int = 2) -> upop_fx.Result:
    torch.set_num_threads(1)
    data = global_batches()
    return upop_fx.compress(
        encoder(), data[0][0], 0.5, data=SlowBatches(data, delay), loss_fn=mse, search_steps=SEARCH,
        retrain_steps=RETRAIN, interval=INTERVAL, lr=1e-3, checkpoint_dir=checkpoint_dir, checkpoint_every=every,
        calibration_batches=CALIBRATION,
    )  # fmt: skip


def torchrun_compress(out: str) -> None:
    """One rank under torchrun that never initialises a process group itself: compress must create it, so that
    the ranks (each with its own half of every batch) search together and keep the same channels."""
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    data = global_batches()
    half = data[0][0].shape[0] // world
    shard = [(x[rank * half:(rank + 1) * half], t[rank * half:(rank + 1) * half]) for x, t in data]
    result = upop_fx.compress(encoder(), shard[0][0], 0.5, data=shard, loss_fn=mse, search_steps=SEARCH,
                              retrain_steps=RETRAIN, interval=INTERVAL, lr=1e-3, calibration_batches=CALIBRATION)
    torch.save({"rank": rank, "group": torch.distributed.is_initialized(),
                "world": torch.distributed.get_world_size(), **summary(result)}, f"{out}.{rank}")


if __name__ == "__main__":  # python -m tests.scaleout run CKPT OUT [DELAY] | torchrun OUT
    if sys.argv[1] == "torchrun":
        torchrun_compress(sys.argv[2])
        raise SystemExit(0)
    _, command, ckpt, out, *rest = sys.argv
    assert command == "run"
    torch.save(summary(checkpointed_run(ckpt, float(rest[0]) if rest else 0.0)), out)
