"""The user's recipe end to end: a fine-tuned classifier asked for 2× on ONNX Runtime, saved as its own class and
as ONNX, both loaded in a fresh process and equal to what was saved. (The runtime is simulated, so that no
assertion depends on this machine's timing; the real one is timed by ``make demo`` and the benchmarks.)"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import upop_fx

from .simulated_runtime import SimulatedRuntime

_LOAD = """
import sys, numpy as np, onnxruntime as ort, torch, upop_fx
directory, onnx_path, inputs_path, out_path = sys.argv[1:]
inputs = torch.load(inputs_path)
model = upop_fx.from_pretrained(directory)
session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
with torch.no_grad():
    module_logits = model(**inputs).logits
onnx_logits = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
torch.save({"class": type(model).__name__, "module": module_logits, "onnx": torch.from_numpy(onnx_logits)}, out_path)
"""


def _layer_ms(gm: torch.nn.Module) -> float:
    return 0.05 + 1e-4 * sum(p.numel() for n, p in gm.named_parameters() if ".layer." in n)


def test_a_classifier_twice_as_fast_saved_and_loaded_in_a_fresh_process(tmp_path, monkeypatch):
    from transformers import BertConfig, BertForSequenceClassification

    monkeypatch.setenv("UPOP_FX_CACHE", str(tmp_path / "cache"))
    # the simulated ONNX Runtime: a model's latency is its encoder layers' weights (what pruning can cut)
    SimulatedRuntime(_layer_ms).install(monkeypatch, "onnxruntime-cpu")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=128, vocab_size=100, num_labels=5)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 100, (4, 16), generator=g)} for _ in range(6)]
    for b in batches:
        b["attention_mask"] = torch.ones_like(b["input_ids"])

    result = upop_fx.compress(model, batches[0], ratio=0.5, budget="latency", data=batches, search_steps=4,
                              retrain_steps=2)
    assert result.report.latency["measured_speedup"] >= 2.0 * 0.95  # asked 2x (the simulated runtime's figure)
    upop_fx.save_pretrained(result.module, tmp_path / "small")
    upop_fx.export_onnx(result.model, batches[0], tmp_path / "small.onnx")

    other = {"input_ids": torch.randint(1, 100, (3, 11), generator=g)}  # another batch size and length
    other["attention_mask"] = torch.ones_like(other["input_ids"])
    torch.save(other, tmp_path / "inputs.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "small"), str(tmp_path / "small.onnx"),
                    str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], check=True, env=env, timeout=300)
    loaded = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        want = result.module(**other).logits
    assert loaded["class"] == "BertForSequenceClassification"
    assert torch.equal(loaded["module"], want)
    torch.testing.assert_close(loaded["onnx"], want, rtol=1e-4, atol=1e-5)
