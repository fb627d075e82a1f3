"""Data-parallel search and retrain: two gloo ranks (torch.multiprocessing, a file store) against one process over
the same global batches; the ranks' agreement checks; the CLI under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import upop_fx
from upop_fx.ir.entries import keep_jaccard
from upop_fx.training import distributed

from . import scaleout

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    """One spawn of two gloo ranks for every scenario (:data:`scaleout.MODES`, then ``on_main``): their results."""
    d = tmp_path_factory.mktemp("ranks")
    mp.spawn(scaleout.ddp_worker, args=(2, str(d / "store"), str(d / "result")), nprocs=2, join=True)
    return d / "result"


def _ranks(spawned: Path, mode: str) -> list[dict]:
    return [torch.load(f"{spawned}.{mode}.{r}", weights_only=False) for r in range(2)]


def test_two_ranks_keep_the_same_channels_as_one_process_over_the_global_batch(spawned):
    ranks = _ranks(spawned, "shard")
    assert all("error" not in r for r in ranks), ranks
    r0, r1 = ranks
    assert r0["keep"] == r1["keep"]
    assert r0["losses"] == r1["losses"]  # averaged over ranks: the same numbers on both
    assert torch.equal(r0["output"], r1["output"])
    torch.set_num_threads(1)
    data = scaleout.global_batches()
    single = upop_fx.compress(
        scaleout.encoder(), data[0][0], 0.5, data=data, loss_fn=scaleout.mse, search_steps=scaleout.SEARCH,
        retrain_steps=scaleout.RETRAIN, interval=scaleout.INTERVAL, lr=1e-3,
    )  # fmt: skip
    # averaging the two halves' gradients is the global batch's gradient, up to float rounding
    assert keep_jaccard(r0["keep"], single.keep) >= 0.9
    for a, b in zip(r0["losses"]["search"], single.losses["search"]):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-6)


def test_two_ranks_rank_by_activation_on_all_their_calibration_batches(spawned):
    """``method="activation"`` under two ranks: each reads its own half of the calibration batches, and both rank
    on the activations of all of them — the same channels on both, those of one process over the global batches."""
    ranks = _ranks(spawned, "activation")
    assert all("error" not in r for r in ranks), ranks
    assert ranks[0]["keep"] == ranks[1]["keep"]
    torch.set_num_threads(1)
    data = scaleout.global_batches()
    single = upop_fx.compress(scaleout.encoder(), data[0][0], 0.5, "activation", data=data, loss_fn=scaleout.mse,
                              retrain_steps=scaleout.RETRAIN, lr=1e-3)
    assert keep_jaccard(ranks[0]["keep"], single.keep) == 1.0


def test_under_a_latency_budget_rank_0_times_and_every_rank_cuts_alike(spawned):
    """Two ranks whose runtimes time differently (rank 1 would price the feed-forward weights 5x and measure every
    cut 30% slow, so its own tables and its own calibration would choose another cut): rank 0 alone measures the
    tables and times the cuts, rank 1 builds nothing, and both keep the same channels with the same latency row."""
    ranks = _ranks(spawned, "latency")
    assert all("error" not in r for r in ranks), ranks
    r0, r1 = ranks
    assert r0["built"] and r1["built"] == []  # rank 1 never ran its runtime
    assert r0["keep"] == r1["keep"] and torch.equal(r0["output"], r1["output"])
    assert r0["latency"] == r1["latency"]
    assert r0["latency"]["measured_speedup"] >= 1 / 0.7  # rank 0's runtime: the asked 0.3 met


def test_on_main_runs_on_rank_0_and_gives_every_rank_its_result_or_its_error(spawned):
    r0, r1 = _ranks(spawned, "on_main")
    assert r0["got"] == r1["got"] == {"rank": 0, "ms": 10.0}
    assert r0["ran"] == [0] and r1["ran"] == []
    assert r0["error"] == r1["error"] == "rank 0 cannot measure"  # raised on every rank, not a hang on rank 1


def test_ranks_with_different_models_are_refused(spawned):
    ranks = _ranks(spawned, "models_differ")
    for r in ranks:
        assert r.get("error") == "DistributedMismatchError", r
        assert "dense model's weights" in r["message"]


def test_ranks_that_select_differently_are_refused(spawned):
    ranks = _ranks(spawned, "selection_differs")
    for r in ranks:
        assert r.get("error") == "DistributedMismatchError", r
        assert "entries selected" in r["message"]


def test_outside_a_process_group_nothing_is_distributed():
    model = torch.nn.Linear(3, 3)
    assert distributed.wrap(model) is model
    assert distributed.world_size() == 1 and distributed.is_main()
    distributed.check_same(1.0, "anything")  # a no-op
    assert distributed.checksum([torch.ones(3)]) == distributed.checksum([torch.ones(3)])
    assert distributed.checksum([torch.ones(3)]) != distributed.checksum([torch.ones(3, dtype=torch.bfloat16)])


def test_cli_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "upop_fx.cli", "compress", "tests.scaleout:build", "--ratio", "0.5", "--out", str(tmp_path / "small"),
        "--search-steps", "4", "--retrain-steps", "2", "--no-onnx", "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--checkpoint-every", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone writes
    report = (tmp_path / "small" / "report.json").read_text()
    assert '"ranks": 2' in report
    assert (tmp_path / "ckpt" / "search.pt").is_file()
    small = upop_fx.load(tmp_path / "small")
    assert small(torch.randn(3, 7, scaleout.D)).shape == (3, 7, scaleout.D)


def test_compress_under_torchrun_without_a_process_group_searches_once(tmp_path):
    """torchrun sets WORLD_SIZE but the script never calls init_process_group: compress creates the group from
    the environment, so the two ranks (each on its own half of every batch) keep the same channels — the ones
    one process keeps over the global batches — instead of running two independent searches."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.scaleout", "torchrun", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2)]
    assert all(r["group"] and r["world"] == 2 for r in ranks)
    assert ranks[0]["keep"] == ranks[1]["keep"]
