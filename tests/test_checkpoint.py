"""Checkpoint and resume: a run killed with SIGKILL mid-search and resumed equals the uninterrupted run; a
one-shot data stream resumes at its position; checkpoints of another model or other settings are refused;
the CLI's --checkpoint-dir resumes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import upop_fx
import upop_fx.cli
from upop_fx.training.checkpoint import FINGERPRINT_FILE

from . import scaleout

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def uninterrupted():
    return scaleout.summary(scaleout.checkpointed_run(None))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The checkpoint directory of one finished run (tests that change it work on a copy: :func:`_copy`)."""
    d = tmp_path_factory.mktemp("finished")
    scaleout.checkpointed_run(str(d))
    return d


def _copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _same(a: dict, b: dict) -> None:
    assert a["keep"] == b["keep"]
    assert a["losses"]["search"] == pytest.approx(b["losses"]["search"], rel=1e-6, abs=1e-9)
    assert a["losses"]["retrain"] == pytest.approx(b["losses"]["retrain"], rel=1e-6, abs=1e-9)
    torch.testing.assert_close(a["output"], b["output"], rtol=1e-6, atol=1e-7)


def _step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=False)["step"])
    except (OSError, EOFError, RuntimeError, KeyError):
        return -1


def test_search_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, caplog):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tests.scaleout", "run", str(ckpt), str(out), "0.4"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while _step(ckpt / "search.pt") < 4:
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint at step 4 within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    killed_at = _step(ckpt / "search.pt")
    assert 4 <= killed_at < scaleout.SEARCH
    assert not (ckpt / "retrain.pt").exists()
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    with caplog.at_level(logging.INFO, logger="upop_fx"):
        resumed = scaleout.summary(scaleout.checkpointed_run(str(ckpt)))
    assert f"(step {killed_at})" in caplog.text
    _same(resumed, uninterrupted)


class _Interrupt(Exception):
    pass


def _stream(fail_at: int | None):
    for i, batch in enumerate(scaleout.global_batches()):
        if i == fail_at:
            raise _Interrupt
        yield batch


def _run_stream(ckpt: Path, fail_at: int | None) -> upop_fx.Result:
    data = scaleout.global_batches()
    return upop_fx.compress(
        scaleout.encoder(), data[0][0], 0.5, data=_stream(fail_at), loss_fn=scaleout.mse,
        search_steps=scaleout.SEARCH, retrain_steps=scaleout.RETRAIN, interval=scaleout.INTERVAL, lr=1e-3,
        checkpoint_dir=ckpt, checkpoint_every=2, calibration_batches=scaleout.CALIBRATION,
    )  # fmt: skip


@pytest.mark.parametrize("fail_at", [5, scaleout.SEARCH + scaleout.CALIBRATION + 2])  # in the search; the retrain
def test_one_shot_stream_resumes_at_its_position(tmp_path, fail_at):
    """A one-shot stream is read once across both phases (the retrain continues where the search stopped): the
    resumed run must skip exactly the batches the checkpoint consumed, the search's included."""
    reference = scaleout.summary(_run_stream(tmp_path / "reference", None))
    with pytest.raises(_Interrupt):
        _run_stream(tmp_path / "ckpt", fail_at)
    _same(scaleout.summary(_run_stream(tmp_path / "ckpt", None)), reference)


def test_checkpoint_of_another_model_is_refused(finished):
    tmp_path = finished  # only read: the refusal comes before anything is written
    data = scaleout.global_batches()
    with pytest.raises(upop_fx.CheckpointError, match="weights differs"):
        upop_fx.compress(scaleout.encoder(seed=1), data[0][0], 0.5, data=data, loss_fn=scaleout.mse,
                         search_steps=scaleout.SEARCH, retrain_steps=scaleout.RETRAIN, interval=scaleout.INTERVAL,
                         lr=1e-3, checkpoint_dir=tmp_path, checkpoint_every=2, calibration_batches=scaleout.CALIBRATION)


def test_checkpoint_of_other_settings_is_refused(finished):
    tmp_path = finished  # only read: the refusal comes before anything is written
    data = scaleout.global_batches()
    with pytest.raises(upop_fx.CheckpointError, match=r"settings\.options\.ratio differs \(0\.5 there, 0\.4 here\)"):
        upop_fx.compress(scaleout.encoder(), data[0][0], 0.4, data=data, loss_fn=scaleout.mse,
                         search_steps=scaleout.SEARCH, retrain_steps=scaleout.RETRAIN, interval=scaleout.INTERVAL,
                         lr=1e-3, checkpoint_dir=tmp_path, checkpoint_every=2, calibration_batches=scaleout.CALIBRATION)


def test_a_checkpoint_directory_moved_elsewhere_resumes_as_the_same_run(finished, tmp_path, uninterrupted):
    """Where the checkpoints lie is not part of the run: a finished run's directory, copied to another path (a
    scratch disk to home), resumes there to the uninterrupted result."""
    _same(scaleout.summary(scaleout.checkpointed_run(str(_copy(finished, tmp_path)))), uninterrupted)


def test_a_damaged_checkpoint_is_refused(finished, tmp_path):
    ckpt = _copy(finished, tmp_path)
    (ckpt / "search.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(upop_fx.CheckpointError, match="not a readable checkpoint"):
        scaleout.checkpointed_run(str(ckpt))


def test_a_directory_of_foreign_files_is_refused(tmp_path):
    (tmp_path / "search.pt").write_bytes(b"x")
    with pytest.raises(upop_fx.CheckpointError, match=f"no {FINGERPRINT_FILE}"):
        scaleout.checkpointed_run(str(tmp_path))


def test_checkpoint_options_are_checked_before_capture(tmp_path):
    with pytest.raises(upop_fx.ConfigError, match="checkpoint_every"):
        upop_fx.compress(None, None, 0.5, checkpoint_dir=tmp_path, checkpoint_every=0)


def test_cli_checkpoint_resumes(tmp_path, caplog):
    args = ["compress", "tests.scaleout:build", "--ratio", "0.5", "--search-steps", "4", "--retrain-steps", "2",
            "--no-onnx", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2", "-v"]
    assert upop_fx.cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    with caplog.at_level(logging.INFO, logger="upop_fx"):
        assert upop_fx.cli.main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "resuming search" in caplog.text and "resuming retrain" in caplog.text
    x = torch.randn(3, 7, scaleout.D)
    a, b = upop_fx.load(tmp_path / "a"), upop_fx.load(tmp_path / "b")
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
