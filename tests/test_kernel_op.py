"""The registered ops behind upop_fx.kernels.masked_attention: opcheck, gradients, export, compile.

Two paths are checked: the torch reference (float64 inputs, which the kernels do not take; float32 with
INTERPRET patched off; no Triton, in a subprocess) and the Triton kernels in Triton's CPU interpreter
(float32; skipped without Triton). The kernel module is loaded
as in test_kernels.py: TRITON_INTERPRET=1 before import, reloaded if something imported it without. Shapes
are tiny; inputs are fresh random tensors on every run.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # left set for the whole process (see test_kernels.py)
ma = importlib.import_module("upop_fx.kernels.masked_attention")
if ma.triton is not None and not ma.INTERPRET:  # imported earlier with compiled (GPU-only) kernels
    ma = importlib.reload(ma)

import upop_fx.kernels  # noqa: E402

OP = torch.ops.upop_fx.masked_attention.default
FWD = torch.ops.upop_fx.masked_attention_fwd.default
BWD = torch.ops.upop_fx.masked_attention_bwd.default
NAMES = ("out", "dq", "dk", "dv", "d_qk_mask", "d_v_mask")
needs_triton = pytest.mark.skipif(ma.triton is None, reason="Triton is not installed")

CASES = {  # name: (B, H, Tq, Tk, D, causal, padding, qk_mask shape kind, v_mask shape kind)
    "shared-causal": (2, 2, 9, 9, 16, True, False, "shared", "shared"),
    "head-padding": (2, 2, 7, 11, 16, False, True, "head", "head"),
    "mixed-causal-padding": (2, 2, 11, 6, 24, True, True, "shared", "head"),
}


def _inputs(case: str, dtype: torch.dtype,
            mask_dtype: torch.dtype | None = None) -> tuple[list, bool, torch.Tensor | None]:
    """[q, k, v, qk_mask, v_mask] (leaves that require grad), causal, key_padding_mask."""
    B, H, Tq, Tk, D, causal, padding, qk_kind, v_kind = CASES[case]
    q, k, v = (torch.randn(B, H, t, D, dtype=dtype) for t in (Tq, Tk, Tk))
    shapes = [(D,) if kind == "shared" else (H, D) for kind in (qk_kind, v_kind)]
    masks = [torch.rand(shape, dtype=mask_dtype or dtype) for shape in shapes]
    masks[0].view(-1)[0] = 0.0  # a pruned channel
    kpm = None
    if padding:
        kpm = torch.rand(B, Tk) > 0.3
        kpm[0, 0] = True
        kpm[-1] = False  # a batch row with no key: out = 0, zero gradients
    return [x.requires_grad_() for x in (q, k, v, *masks)], causal, kpm


def _reference_grads(inputs: list, scale: float | None, causal: bool, kpm: torch.Tensor | None,
                     grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Output and gradients of masked_attention_reference in float64 (torch autograd)."""
    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    ref = ma.masked_attention_reference(*ref_in, scale=scale, causal=causal, key_padding_mask=kpm)
    return [ref, *torch.autograd.grad(ref, ref_in, grad_out.double())]


def test_public_names_and_single_registration() -> None:
    assert upop_fx.kernels.MASKED_ATTENTION_OP is OP and ma.MASKED_ATTENTION_OP is OP
    assert isinstance(OP, torch._ops.OpOverload) and OP.name() == "upop_fx::masked_attention"
    assert torch.Tag.pt2_compliant_tag in OP.tags
    again = importlib.reload(ma)  # re-executes the module: the ops must not be defined twice
    assert again.MASKED_ATTENTION_OP is OP and again.INTERPRET == ma.INTERPRET
    assert "MASKED_ATTENTION_OP" in again.__all__ and "MASKED_ATTENTION_OP" in upop_fx.kernels.__all__


def _opcheck(op_name: str, inputs: list, scale: float, causal: bool, kpm: torch.Tensor | None) -> None:
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) on one of the ops."""
    args = (*inputs, scale, causal, kpm)
    if op_name == "masked_attention_bwd":
        out, lse = FWD(*args)
        plain = [x.detach() for x in (torch.randn_like(out), *inputs, out, lse)]
        args = (*plain, scale, causal, kpm)
    torch.library.opcheck(getattr(torch.ops.upop_fx, op_name).default, args)


OP_NAMES = ["masked_attention", "masked_attention_fwd", "masked_attention_bwd"]


@pytest.mark.parametrize("op_name", OP_NAMES)
@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_reference_path(case: str, op_name: str) -> None:
    inputs, causal, kpm = _inputs(case, torch.float64)
    assert not ma._use_kernel(*inputs)
    _opcheck(op_name, inputs, 0.3, causal, kpm)


@needs_triton
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_opcheck_interpreter_path(op_name: str) -> None:
    inputs, causal, kpm = _inputs("mixed-causal-padding", torch.float32)
    assert ma._use_kernel(*inputs)
    _opcheck(op_name, inputs, 0.25, causal, kpm)


_WITHOUT_TRITON = """
import importlib, sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch
ma = importlib.import_module("upop_fx.kernels.masked_attention")
assert ma.triton is None
q, k, v = (torch.randn(2, 2, 7, 16, requires_grad=True) for _ in range(3))
m = [torch.rand(16, requires_grad=True), torch.rand(2, 16, requires_grad=True)]
out = ma.masked_attention(q, k, v, *m, causal=True)
ref = ma.masked_attention_reference(q, k, v, *m, causal=True)
assert torch.equal(out, ref)
for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v, *m)), torch.autograd.grad(ref.sum(), (q, k, v, *m))):
    torch.testing.assert_close(a, b)
assert importlib.reload(ma).MASKED_ATTENTION_OP is torch.ops.upop_fx.masked_attention.default
"""


def test_import_without_triton_runs_the_reference() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("case", list(CASES))
def test_reference_path_gradients_match_reference_autograd(case: str) -> None:
    inputs, causal, kpm = _inputs(case, torch.float64, mask_dtype=torch.float32)
    out = OP(*inputs, 0.3, causal, kpm)
    grad_out = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, inputs, grad_out)]
    want = _reference_grads(inputs, 0.3, causal, kpm, grad_out)
    for name, g, w, x in zip(NAMES, got, want, [out, *inputs], strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype, name  # mask gradients: the masks' shape and dtype
        torch.testing.assert_close(g.double(), w, rtol=1e-5 if x.dtype == torch.float32 else 1e-10, atol=1e-7,
                                   msg=name)


def test_reference_path_gradcheck() -> None:
    q, k, v = (torch.randn(1, 2, t, 4, dtype=torch.float64, requires_grad=True) for t in (5, 6, 6))
    masks = (torch.rand(4, dtype=torch.float64, requires_grad=True),
             torch.rand(2, 4, dtype=torch.float64, requires_grad=True))
    kpm = torch.tensor([[True, True, False, True, False, True]])
    assert torch.autograd.gradcheck(lambda *x: OP(*x, 0.7, True, kpm), (q, k, v, *masks))


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_path_gradients_match_float64_reference(case: str) -> None:
    inputs, causal, kpm = _inputs(case, torch.float32)
    assert ma._use_kernel(*inputs)
    out = ma.masked_attention(*inputs, causal=causal, key_padding_mask=kpm)
    grad_out = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, inputs, grad_out)]
    want = _reference_grads(inputs, None, causal, kpm, grad_out)
    for name, g, w, x in zip(NAMES, got, want, [out, *inputs], strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5, msg=name)


class _Attention(torch.nn.Module):
    """A packed-qkv self-attention with UPop's learnable masks ((H, D) for q/k, (D,) for v), causal."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.qk_mask = torch.nn.Parameter(torch.rand(heads, self.head_dim))
        self.v_mask = torch.nn.Parameter(torch.rand(self.head_dim))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = upop_fx.kernels.masked_attention(q, k, v, self.qk_mask, self.v_mask, causal=True,
                                               key_padding_mask=key_padding_mask)
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))


def _model_inputs(B: int = 2, T: int = 9) -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    model = _Attention()
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, -3:] = False
    return model, (torch.randn(B, T, 32, requires_grad=True), kpm)


def _run(model: torch.nn.Module, args: tuple) -> list[torch.Tensor]:
    """Output, then the gradients of the input and every parameter."""
    out = model(*args)
    grads = torch.autograd.grad(out.square().sum(), (args[0], *model.parameters()))
    return [out.detach(), *grads]


@pytest.fixture(params=["reference", pytest.param("interpreter", marks=needs_triton)])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which implementation the op runs on the float32 CPU inputs: the torch reference or the kernels."""
    if request.param == "reference":
        monkeypatch.setattr(ma, "INTERPRET", False)
        for launcher in ("_kernel_forward", "_kernel_backward"):
            monkeypatch.setattr(ma, launcher, lambda *a: pytest.fail("kernel launched on the reference path"))
    return request.param


def test_export_keeps_the_op_and_matches_eager(path: str) -> None:
    model, args = _model_inputs()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, args, strict=False, dynamic_shapes=({0: batch}, {0: batch}))
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is OP]
    assert len(calls) == 1
    shape = calls[0].meta["val"].shape
    assert isinstance(shape[0], torch.SymInt) and shape[1:] == (2, 9, 16)
    torch.testing.assert_close(ep.module()(*args), model(*args), rtol=1e-6, atol=1e-6)
    _, args3 = _model_inputs(B=3)  # another batch size through the same program
    torch.testing.assert_close(ep.module()(*args3), model(*args3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_matches_eager_output_and_gradients(path: str, backend: str) -> None:
    torch._dynamo.reset()
    model, args = _model_inputs()
    want = _run(model, args)
    got = _run(torch.compile(model, backend=backend, fullgraph=True), args)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"output/gradient {i}")


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")  # torch's recording backend
def test_compiled_graphs_hold_the_ops(path: str) -> None:
    """Dynamo's graph calls the public op; AOTAutograd's forward graph runs the fwd op and its backward graph
    only the bwd op (out and lse are saved, not recomputed)."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    model, args = _model_inputs()
    backend = AotEagerAndRecordGraphs()
    _run(torch.compile(model, backend=backend, fullgraph=True), args)

    def targets(gm: torch.fx.GraphModule) -> list:
        return [n.target for n in gm.graph.nodes if n.op == "call_function"]

    (dynamo,), (fw,), (bw,) = backend.graphs, backend.fw_graphs, backend.bw_graphs
    assert targets(dynamo).count(OP) == 1
    assert targets(fw).count(FWD) == 1 and OP not in targets(fw) and BWD not in targets(fw)
    assert targets(bw).count(BWD) == 1 and FWD not in targets(bw)
