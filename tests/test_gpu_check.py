"""The prepared GPU check on a machine without CUDA: benchmarks/gpu_check.sh skips its CUDA steps (and says
why), and benchmarks/gpu_search.py's code path runs end to end on the CPU with ``--cpu-smoke``.

Both run as subprocesses (one OpenMP thread each), as they would be run by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA these would run the real GPU check")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # set by conftest for this process; the scripts decide for themselves
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_skips_cuda_steps_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for step in ("machine", "kernel_tests", "kernel_cuda", "kernel_bench", "memory", "gpu_search"):
        assert f"| {step} |" in summary, step
    assert "| machine | ran |" in summary
    skipped = [line for line in summary.splitlines() if "| skipped |" in line]
    assert len(skipped) == 5 and all("no CUDA device" in line for line in skipped), summary
    assert "failed" not in summary
    info = json.loads((out / "machine.json").read_text())
    assert info["cuda_available"] is False and info["torch"] == torch.__version__
    assert "load_average" in info and "triton" in info and "transformers" in info
    steps = json.loads((out / "steps.json").read_text())["steps"]
    assert [s["status"] for s in steps] == ["ran", "skipped", "skipped", "skipped", "skipped", "skipped"]
    assert (out / "machine.log").is_file()


def test_gpu_search_cpu_smoke(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_search", "--cpu-smoke", "--out", str(path)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads(path.read_text())
    assert payload["complete"] and payload["config"]["device"] == "cpu" and payload["config"]["hidden"] == 64
    assert payload["machine"]["torch"] == torch.__version__ and "load_average" in payload["machine"]
    rows = {r["row"]: r for r in payload["rows"]}
    assert {"fused-fp32", "unfused-fp32", "fused-bf16"} <= rows.keys()
    for r in rows.values():
        assert r["status"] == "ok", r.get("error")
        assert r["wall_s"] > 0 and r["finite_losses"] and r["params_after"] < r["params_before"]
        assert len(r["losses"]["search"]) == 4 and len(r["losses"]["retrain"]) == 2
        assert r["load_before"] is not None and r["load_after"] is not None
    assert rows["fused-fp32"]["fused_sites"] == 0 and "cpu" in rows["fused-fp32"]["fusion_note"]
    # off CUDA the fusion is a no-op: fused and unfused rows run the same graph
    assert payload["identical_fused_vs_unfused_fp32"] is True and payload["jaccard_fused_vs_unfused_fp32"] == 1.0
    assert 0.0 < payload["jaccard_bf16_vs_fp32"] <= 1.0 and isinstance(payload["identical_bf16_vs_fp32"], bool)
    pairs = {(c["a"], c["b"]) for c in payload["comparisons"]}
    assert ("fused-fp32", "unfused-fp32") in pairs and ("fused-bf16", "fused-fp32") in pairs
    assert all(0.0 <= c["jaccard"] <= 1.0 for c in payload["comparisons"])
    assert [r["precision"] for r in payload["latency"]] == ["fp32", "bf16"]
    assert all(r["runtime"] == "torch-cpu" and r["ms_pruned"] > 0 for r in payload["latency"])
    assert any("no-op" in note for note in payload["notes"])
    md = path.with_suffix(".md").read_text()
    assert "Jaccard" in md and "fused-fp32" in md and "no-op" in md
