"""ONNX export: ONNX Runtime parity on the zoo (original and compressed), names and axes, and clean failures.

The exporter takes ~3-10 s per model on 2 cores, so the default run exports two zoo models that cover the
input/output kinds and both model kinds: a compressed BERT (GraphModule; dict of token tensors, ModelOutput) and
the original timm-style ViT (nn.Module; positional pixels, a tensor); nested ModelOutput names are unit-tested.
``pytest -m slow tests/test_export.py`` exports every zoo model, original and ``compress(ratio=0.5)``: all 20
pass (9 min on a busy 2-core machine).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.utils._pytree as pytree

import upop_fx
import upop_fx.runtime.export as export_module
from upop_fx.errors import ConfigError, InputError, UPopError
from upop_fx.runtime.export import PARITY_TOLERANCE, ExportError, ExportInfo, export_onnx

from .models import ZOO, ZooModel

FAST = [("bert", "compressed"), ("timm_vit", "original")]
ALL = [(name, variant) for name in ZOO for variant in ("original", "compressed")]


def _model(zm: ZooModel, variant: str) -> torch.nn.Module:
    if variant == "original":
        return zm.model
    return upop_fx.compress(zm.model, zm.example_inputs, ratio=0.5, method="magnitude", retrain_steps=0).model


def _feed(info: ExportInfo, inputs: dict | tuple) -> dict[str, np.ndarray]:
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    assert len(values) == len(info.input_names)
    return {name: v.numpy() for name, v in zip(info.input_names, values)}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def _check_round_trip(zm: ZooModel, variant: str, tmp_path: Path) -> None:
    model = _model(zm, variant)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    info = export_onnx(model, zm.example_inputs, tmp_path / f"{zm.name}.onnx")
    assert sorted(os.listdir(tmp_path)) == sorted([f"{zm.name}.onnx", f"{zm.name}.opt.onnx"])
    assert info.path == tmp_path / f"{zm.name}.onnx" and info.optimized_path == tmp_path / f"{zm.name}.opt.onnx"
    assert info.max_error <= PARITY_TOLERANCE
    assert info.input_names == (list(zm.example_inputs) if isinstance(zm.example_inputs, dict)
                                else [f"input_{i}" for i in range(len(zm.example_inputs))])
    # the caller's model is untouched
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    # dynamic axes: batch everywhere, seq on token tensors, named
    proto = onnx.load(str(info.path))
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch", (inp.name, dims)
        if inp.name in ("input_ids", "attention_mask"):
            assert dims[1].dim_param == "seq"

    # parity at two batch sizes and two sequence lengths (example: batch 2 / seq 8; other: batch 3 / seq 11)
    for inputs in (zm.example_inputs, zm.other_inputs):
        args, kwargs = zm.split(inputs)
        with torch.no_grad():
            want = [t.numpy() for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        for path in (info.path, info.optimized_path):
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            assert [o.name for o in sess.get_outputs()] == info.output_names
            got = sess.run(None, _feed(info, inputs))
            assert len(got) == len(want)
            for name, a, b in zip(info.output_names, got, want):
                assert a.shape == b.shape, (path.name, name)
                assert _rel(a, b) <= PARITY_TOLERANCE, (path.name, name, _rel(a, b))


@pytest.mark.parametrize("name,variant", FAST, ids=[f"{n}-{v}" for n, v in FAST])
def test_round_trip(name: str, variant: str, tmp_path: Path) -> None:
    _check_round_trip(ZOO[name](), variant, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name,variant", ALL, ids=[f"{n}-{v}" for n, v in ALL])
def test_round_trip_whole_zoo(name: str, variant: str, tmp_path: Path) -> None:
    _check_round_trip(ZOO[name](), variant, tmp_path)


def test_output_names() -> None:
    """Field names for a ModelOutput, dotted when nested (CLIP); output_i for a tensor."""
    from upop_fx.runtime.export import _output_names

    assert _output_names(torch.zeros(2)) == ["output_0"]
    assert _output_names((torch.zeros(2), [torch.zeros(1), torch.zeros(1)])) == ["output_0", "output_1.0", "output_1.1"]
    assert _output_names({"logits": torch.zeros(1), "aux": {"h": torch.zeros(1)}}) == ["logits", "aux.h"]


# ---------------------------------------------------------------------------------------------- small models

class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.drop(self.fc(x)))


@torch.library.custom_op("upop_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class NoOnnx(Tiny):
    """Captured by torch.export, but its custom op has no ONNX translation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.upop_test.twice(self.fc(x))


class DataDependent(Tiny):
    """torch.export cannot capture a branch on a tensor's value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))


def test_tiny_train_mode_model_is_left_alone(tmp_path: Path) -> None:
    model = Tiny().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    info = export_onnx(model, (_x(),), tmp_path / "tiny.onnx", optimize=False, opset=18)
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sorted(os.listdir(tmp_path)) == ["tiny.onnx"] and info.optimized_path is None
    assert [o.version for o in onnx.load(str(info.path)).opset_import if o.domain in ("", "ai.onnx")] == [18]
    # eval-mode export: dropout is gone, batch 7 / seq 3 run
    sess = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 8)
    with torch.no_grad():
        want = model.eval()(x).numpy()
    assert _rel(sess.run(None, {"input_0": x.numpy()})[0], want) <= PARITY_TOLERANCE


def _listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_unwritable_paths(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    before = _listing(tmp_path)
    for bad in (tmp_path / "missing" / "m.onnx", tmp_path / "afile" / "m.onnx", tmp_path):
        with pytest.raises(ExportError, match="cannot write"):
            export_onnx(Tiny(), _x(), bad)
    assert _listing(tmp_path) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ExportError, match="not writable"):
            export_onnx(Tiny(), _x(), ro / "m.onnx")
        assert _listing(ro) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("opset", [7, 17, 99, 18.0, True, "18"])
def test_unsupported_opset(opset: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(Tiny(), _x(), tmp_path / "m.onnx", opset=opset)
    assert _listing(tmp_path) == []


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        export_onnx("not a model", _x(), tmp_path / "m.onnx")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="at least 2"):
        export_onnx(Tiny(), torch.randn(1, 5, 8), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="raises on example_inputs"):
        export_onnx(Tiny(), torch.randn(2, 5, 3), tmp_path / "m.onnx")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("model,match", [(NoOnnx, "ONNX exporter could not translate NoOnnx: .*No ONNX function found"),
                                         (DataDependent, "torch.export could not capture")])
def test_model_the_exporter_cannot_handle(model: type, match: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=match) as info:
        export_onnx(model().eval(), _x(), tmp_path / "m.onnx")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UPopError)
    assert _listing(tmp_path) == []


def test_failed_parity_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files are staged and written before the check fails: none of them may stay, the old file survives."""
    (tmp_path / "m.onnx").write_text("old")
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(Tiny().eval(), _x(), tmp_path / "m.onnx")
    assert _listing(tmp_path) == ["m.onnx"] and (tmp_path / "m.onnx").read_text() == "old"


def test_timing_exports_fixed_and_as_deployed(tmp_path: Path) -> None:
    """The fixed timing file takes only its own shapes; the deployed form has the dynamic batch and sequence
    axes ``export_onnx`` gives, and both agree with PyTorch."""
    from upop_fx.runtime.export import export_for_timing

    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    fixed = export_for_timing(layer, (x,), {}, tmp_path / "fixed.onnx")
    deployed = export_for_timing(layer, (x,), {}, tmp_path / "deployed.onnx", deployed=True)
    dims = {p.name: [d.dim_param or d.dim_value for d in onnx.load(str(p)).graph.input[0].type.tensor_type.shape.dim]
            for p in (fixed, deployed)}
    assert dims["fixed.onnx"] == [2, 5, 16]
    assert isinstance(dims["deployed.onnx"][0], str) and isinstance(dims["deployed.onnx"][1], str)
    other = torch.randn(3, 7, 16)  # another batch and length: only the deployed file takes it
    session = ort.InferenceSession(str(deployed), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, layer(other).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="dimensions"):  # onnxruntime's InvalidArgument
        fixed_session = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
        fixed_session.run(None, {fixed_session.get_inputs()[0].name: other.numpy()})
