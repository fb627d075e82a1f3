"""Jobs the scale-out tests run in other processes (gloo ranks, a run killed mid-way, the CLI under torchrun).

Importable as ``tests.scaleout`` from the repository root; ``python -m tests.scaleout run CKPT OUT`` runs the
slow checkpointed search that ``test_checkpoint`` kills.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

import upop_fx

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


def ddp_worker(rank: int, world: int, store: str, out: str, mode: str) -> None:
    """One gloo rank. ``mode``: ``"shard"`` (each rank its half of every global batch), ``"activation"`` (the same,
    ranked by ``method="activation"`` on the calibration batches), ``"models_differ"`` (a different model per
    rank), ``"selection_differs"`` (an allocation that depends on the rank)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
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
        try:
            result = upop_fx.compress(
                model, shard[0][0], 0.5, data=shard, loss_fn=mse, search_steps=SEARCH, retrain_steps=RETRAIN,
                interval=INTERVAL, lr=1e-3, **kwargs,
            )  # fmt: skip
            torch.save({"rank": rank, **summary(result)}, f"{out}.{rank}")
        except upop_fx.UPopError as exc:
            torch.save({"rank": rank, "error": type(exc).__name__, "message": str(exc)}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


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
    import os

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
