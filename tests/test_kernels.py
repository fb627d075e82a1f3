"""upop_fx.kernels.masked_attention: the Triton kernels (in Triton's CPU interpreter) against float64 torch.

Triton picks interpreted or compiled kernels when a kernel is *defined*, so TRITON_INTERPRET=1 is set before
the kernel module is imported (and the module is reloaded if something imported it earlier without it).
Shapes are tiny (the interpreter is ~180x slower than eager) but span several 16-wide blocks and ragged
edges. Inputs are fresh random tensors on every run; nothing here is timed.
"""

from __future__ import annotations

import doctest
import importlib
import os
import re

import pytest
import torch

# Left set for the whole process: Triton also reads it lazily (its own imports check it), so it cannot be
# restored after the import. A GPU test session that also wants compiled kernels runs this file separately.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
ma = importlib.import_module("upop_fx.kernels.masked_attention")
if not ma.INTERPRET:  # imported earlier in this process, with compiled (GPU-only) kernels
    ma = importlib.reload(ma)

from upop_fx.kernels import KernelDtypeError, KernelInputError  # noqa: E402

# Relative error in norm, ||out - ref|| / ||ref||, against float64 on the same (already rounded) inputs.
# fp32: observed <= 3.2e-7 (exact "ieee" fp32 dots), so 1e-5 is far inside the required 1e-3.
# fp16/bf16: the kernel rounds q*m, k*m, v*n, P and dS to the input dtype before each tensor-core dot and
# rounds its outputs, as FlashAttention does (eager bf16 SDPA is no better: ~3.5e-3 here). Observed maxima
# over 40 runs: fp16 6e-4, bf16 5.5e-3, about one unit roundoff u (fp16 4.9e-4, bf16 3.9e-3); the
# tolerances are 5 u. (bf16 in the interpreter is rounded to nearest by hand, as a GPU does; see _round_bf16.)
TOL = {torch.float32: 1e-5, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}
NAMES = ("out", "dq", "dk", "dv", "d_qk_mask", "d_v_mask")


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor torch.empty/empty_like hands out is filled with NaN, so an element a kernel forgets to
    write (an output, a logsumexp, a partial mask-gradient sum) shows up as NaN in the results."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else 1)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def _mask(shape: tuple[int, ...]) -> torch.Tensor:
    m = torch.rand(shape)
    m.view(-1)[:2] = torch.tensor([0.0, 1.0])  # a pruned and a kept channel, as during the UPop search
    return m


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


CASES = {  # name: (B, H, Tq, Tk, D, causal, padding, mask shape: "shared" (D,) / "head" (H, D) / "mixed")
    "plain-T37": (2, 2, 37, 37, 32, False, False, "shared"),
    "causal-T37-per-head": (2, 2, 37, 37, 32, True, False, "head"),
    "cross-Tq20-Tk45-pad-D24": (2, 2, 20, 45, 24, False, True, "mixed"),
    "cross-Tq45-Tk20-causal-pad-D64": (2, 2, 45, 20, 64, True, True, "head"),
    "D128-T19": (1, 2, 19, 19, 128, False, False, "shared"),
    "plain-T37-B1": (1, 2, 37, 37, 32, False, False, "head"),  # for fp16/bf16 (bf16 is slowest to interpret)
}


def _run_case(case: str, dtype: torch.dtype, transposed: bool = False) -> None:
    B, H, Tq, Tk, D, causal, padding, mask_kind = CASES[case]
    if transposed:  # (B, T, H, D) storage viewed as (B, H, T, D): non-contiguous, as after a head split
        q, k, v = (torch.randn(B, t, H, D).to(dtype).transpose(1, 2) for t in (Tq, Tk, Tk))
    else:
        q, k, v = (torch.randn(B, H, t, D).to(dtype) for t in (Tq, Tk, Tk))
    m_qk = _mask((D,) if mask_kind == "shared" else (H, D))
    m_v = _mask((D,) if mask_kind != "head" else (H, D))
    kpm = None
    if padding:
        kpm = torch.rand(B, Tk) > 0.3
        kpm[0, :3] = True
        kpm[-1] = False  # a batch row with no key at all: defined to give out = 0 and zero gradients
    inputs = [x.requires_grad_() for x in (q, k, v, m_qk, m_v)]
    out = ma.masked_attention(*inputs, causal=causal, key_padding_mask=kpm)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    ref = ma.masked_attention_reference(*ref_in, causal=causal, key_padding_mask=kpm)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    assert out.dtype == dtype and grads[3].dtype == m_qk.dtype
    for name, got, want in zip(NAMES, (out, *grads), (ref, *ref_grads), strict=True):
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or overflow)"
        err = _rel(got, want)
        assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("case", [c for c in CASES if c != "plain-T37-B1"])
def test_fp32_forward_and_all_gradients(case: str, poisoned: None) -> None:
    _run_case(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["plain-T37-B1", "cross-Tq45-Tk20-causal-pad-D64"])
def test_half_precision(case: str, dtype: torch.dtype, poisoned: None) -> None:
    _run_case(case, dtype)


def test_non_contiguous_inputs(poisoned: None) -> None:
    _run_case("cross-Tq20-Tk45-pad-D24", torch.float32, transposed=True)


def test_scale_and_causal_alignment_match_sdpa() -> None:
    q, k, v = torch.randn(1, 2, 21, 16), torch.randn(1, 2, 13, 16), torch.randn(1, 2, 13, 16)
    out = ma.masked_attention(q, k, v, torch.ones(16), torch.ones(2, 16), scale=0.3, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert _rel(out, ref.double()) <= 1e-5


def test_masks_without_grad_and_docstring_example() -> None:
    q, k, v = (torch.randn(1, 1, 18, 16, requires_grad=True) for _ in range(3))
    out = ma.masked_attention(q, k, v, torch.rand(16), torch.rand(16))
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    failed, attempted = doctest.testmod(ma, verbose=False)[:2]
    assert attempted > 0 and failed == 0


def test_cpu_without_interpreter_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ma, "INTERPRET", False)
    for launcher in ("_kernel_forward", "_kernel_backward"):
        monkeypatch.setattr(ma, launcher, lambda *a: pytest.fail("kernel ran on CPU"))
    q, k, v = (torch.randn(2, 2, 5, 16) for _ in range(3))
    m_qk, m_v = torch.rand(16), torch.rand(2, 16)
    inputs = [x.requires_grad_() for x in (q, k, v, m_qk, m_v)]
    out = ma.masked_attention(*inputs)
    ref = ma.masked_attention_reference(*inputs)
    assert torch.equal(out, ref)
    grad_out = torch.randn_like(out)
    got, want = torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def _good(**over: object) -> dict:
    args: dict = dict(q=torch.randn(2, 3, 8, 16), k=torch.randn(2, 3, 6, 16), v=torch.randn(2, 3, 6, 16),
                      qk_mask=torch.ones(16), v_mask=torch.ones(3, 16))
    args.update(over)
    return args


BAD = {  # name: (overrides, expected error, a phrase the message must contain)
    "q-not-4d": (dict(q=torch.randn(3, 8, 16)), KernelInputError, "4-D"),
    "k-v-shapes-differ": (dict(v=torch.randn(2, 3, 7, 16)), KernelInputError, "same shape"),
    "heads-differ": (dict(k=torch.randn(2, 2, 6, 16), v=torch.randn(2, 2, 6, 16)), KernelInputError, "(B, H, Tk, D)"),
    "head-dim-differs": (dict(k=torch.randn(2, 3, 6, 32), v=torch.randn(2, 3, 6, 32)), KernelInputError, "same B, H and D"),
    "mask-wrong-length": (dict(qk_mask=torch.ones(15)), KernelInputError, "qk_mask must have shape"),
    "mask-wrong-heads": (dict(v_mask=torch.ones(2, 16)), KernelInputError, "v_mask must have shape"),
    "mask-3d": (dict(v_mask=torch.ones(1, 3, 16)), KernelInputError, "v_mask must have shape"),
    "padding-wrong-shape": (dict(key_padding_mask=torch.ones(2, 8, dtype=torch.bool)), KernelInputError, "(B, Tk)"),
    "padding-not-bool": (dict(key_padding_mask=torch.ones(2, 6)), KernelDtypeError, "bool"),
    "float64": (dict(q=torch.randn(2, 3, 8, 16, dtype=torch.float64), k=torch.randn(2, 3, 6, 16, dtype=torch.float64),
                     v=torch.randn(2, 3, 6, 16, dtype=torch.float64)), KernelDtypeError, "not supported"),
    "mixed-dtypes": (dict(k=torch.randn(2, 3, 6, 16, dtype=torch.float16)), KernelDtypeError, "one dtype"),
    "integer-mask": (dict(qk_mask=torch.ones(16, dtype=torch.int64)), KernelDtypeError, "floating-point"),
    "head-dim-8": (dict(q=torch.randn(2, 3, 8, 8), k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8),
                        qk_mask=torch.ones(8), v_mask=torch.ones(8)), KernelInputError, "head dim 8"),
    "head-dim-256": (dict(q=torch.randn(1, 1, 4, 256), k=torch.randn(1, 1, 4, 256), v=torch.randn(1, 1, 4, 256),
                          qk_mask=torch.ones(256), v_mask=torch.ones(256)), KernelInputError, "head dim 256"),
    "empty": (dict(q=torch.randn(2, 3, 0, 16)), KernelInputError, "empty"),
    "devices-differ": (dict(v_mask=torch.ones(3, 16, device="meta")), KernelInputError, "one device"),
    "not-a-tensor": (dict(q=[[1.0]]), KernelDtypeError, "torch.Tensor"),
    "scale-not-number": (dict(scale="0.1"), KernelDtypeError, "scale"),
    "causal-not-bool": (dict(causal=1), KernelDtypeError, "causal"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_before_any_launch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    over, error, phrase = BAD[name]
    monkeypatch.setattr(ma, "MASKED_ATTENTION_OP", lambda *a: pytest.fail("op called"))
    monkeypatch.setattr(ma, "_kernel_forward", lambda *a: pytest.fail("kernel launched"))
    with pytest.raises(error, match=re.escape(phrase)):
        ma.masked_attention(**_good(**over))
    assert issubclass(KernelDtypeError, TypeError) and issubclass(KernelInputError, ValueError)
