r"""Fused attention with UPop's learnable channel masks (Triton forward + backward, torch reference).

UPop multiplies the packed qkv tensor by its masks, so q, k **and** v are each masked. With
``m = qk_mask`` and ``n = v_mask`` (shape ``(D,)``, shared by all heads, or ``(H, D)``)::

    S = ((q * m) @ (k * m)^T) * s          # (B, H, Tq, Tk),  s = scale or 1/sqrt(D)
    S[i, j] = -inf  where j > i (causal) or key j is padding
    P = softmax(S, dim=-1)                 # a row with no key left gives P = 0, so out = 0
    out = P @ (v * n)                      # (B, H, Tq, D)

Backward (``dO`` given; the ``*m`` tensors are the masked inputs qm = q*m, km = k*m, vm = v*n)::

    dVm = P^T dO          dP = dO vm^T          dS = P * (dP - rowsum(dO * out))
    dQm = s dS km         dKm = s dS^T qm
    dq = dQm * m          dk = dKm * m          dv = dVm * n
    d(qk_mask) = sum_{b,i} q * dQm + sum_{b,j} k * dKm      (summed over heads too for a (D,) mask)
    d(v_mask)  = sum_{b,j} v * dVm

The kernels follow FlashAttention-2 (Triton's tutorials/06-fused-attention.py): the forward streams key
blocks with an online softmax and saves the row logsumexp; the backward recomputes P, one kernel per key
block for dk/dv and one per query block for dq. The masks are applied in the loads; each backward program
writes its partial mask-gradient sums (one D-vector) to a small buffer that torch then sums.

Conventions: ``key_padding_mask`` is a bool (B, Tk) tensor, **True = attend to (keep) this key**. ``causal``
masks j > i aligned to the top-left corner, as ``torch.nn.functional.scaled_dot_product_attention``'s
``is_causal`` (for Tq != Tk, query i still sees keys 0..i). Head dims 16..128 that are not a power of two
are padded to the next power of two inside the kernel with masked loads (no copy). Dots take the input
dtype (fp16/bf16 tensor cores) and accumulate in fp32; fp32 inputs use exact ("ieee") fp32 dots, not TF32.

Registered ops (so a graph that calls the kernel still exports with ``torch.export`` and compiles with
``torch.compile``), defined once per process, on first import:

* ``torch.ops.upop_fx.masked_attention`` (:data:`MASKED_ATTENTION_OP`; ``q, k, v, qk_mask, v_mask,
  float scale, bool causal=False, Tensor? key_padding_mask=None -> out``): the op graphs call. It is
  composite (``CompositeImplicitAutograd``), as ``aten.scaled_dot_product_attention`` is: ``torch.export``
  keeps it as one node, and autograd, fake tensors and AOTAutograd see the two ops below.
* ``torch.ops.upop_fx.masked_attention_fwd`` (same arguments ``-> (out, lse)``): ``lse`` is the float32
  (B*H, Tq) ``log2(sum_j exp(S[i, j]))`` of each row (+inf for a row with no key). It has a fake (meta) implementation
  and the autograd formula (``register_autograd``), which saves ``out`` and ``lse`` and calls
* ``torch.ops.upop_fx.masked_attention_bwd`` (``grad_out, q, k, v, qk_mask, v_mask, out, lse, scale,
  causal, key_padding_mask -> (dq, dk, dv, d_qk_mask, d_v_mask)``); the mask gradients have the masks'
  shapes and dtypes. It has a fake implementation and no autograd formula (no double backward).

Both run the Triton kernels on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
import, if the dtypes and head dim fit the kernels; otherwise (or without Triton) the torch reference, whose
backward is the formulas above (P recomputed), equal to autograd through :func:`masked_attention_reference`.
The ops are mutation-free. They look up this module's kernels when called, so ``importlib.reload`` of
this module (which reuses its namespace) switches the kernels they run without defining the ops again.

Example::

    >>> import torch
    >>> from upop_fx.kernels import masked_attention
    >>> q, k, v = (torch.randn(2, 4, 10, 16) for _ in range(3))
    >>> out = masked_attention(q, k, v, torch.ones(16), torch.ones(16), causal=True)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> bool(torch.allclose(out, ref, atol=1e-5))
    True
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from upop_fx.kernels._checks import (
    KERNEL_DTYPES,
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    check_attention_inputs,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: masked_attention runs the torch reference
    triton = tl = None

__all__ = ["MASKED_ATTENTION_OP", "masked_attention", "masked_attention_reference"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, at import (as Triton does)
LOG2E = 1.4426950408889634


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# ------------------------------ jit helpers --------------------------------------------------------------
@_jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32. Interpreter only: there, tl.dot is wrong
    for bf16 operands and the fp32 -> bf16 cast truncates, while GPUs round to nearest."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@_jit
def _dot(a, b, acc, ELT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with a, b rounded to ELT (tensor-core inputs), products summed in fp32. UPCAST (bf16 in the
    interpreter): round to bf16 by hand and multiply in fp32, which is what bf16 tensor cores compute."""
    if UPCAST:
        a = _round_bf16(a)
        b = _round_bf16(b)
    else:
        a = a.to(ELT)
        b = b.to(ELT)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@_jit
def _load_tile(base, offs_t, offs_d, stride_t, stride_d, T, D):
    """(len(offs_t), BLOCK_D) tile in fp32; rows >= T and channels >= D read as 0."""
    ptrs = base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d
    x = tl.load(ptrs, mask=(offs_t[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    return x.to(tl.float32)


@_jit
def _store_tile(base, x, offs_t, offs_d, stride_t, stride_d, T, D, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        x = _round_bf16(x)
    ptrs = base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(offs_t[:, None] < T) & (offs_d[None, :] < D))


@_jit
def _allowed(qi, kj, TK, KPM_row, stride_pn, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """Which (query, key) pairs attend; qi, kj are 2-D index tensors that broadcast against each other."""
    ok = (kj < TK) & (qi >= 0)
    if CAUSAL:
        ok = ok & (kj <= qi)
    if HAS_KPM:
        ok = ok & (tl.load(KPM_row + kj * stride_pn, mask=kj < TK, other=0) != 0)
    return ok


@_jit
def _attn_fwd(Q, K, V, MQK, MV, KPM, Out, LSE,
              sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
              smh, spb, spn, H, TQ, TK, D, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
              ELT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_qk = tl.load(MQK + h * smh + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    m_v = tl.load(MV + h * smh + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    qm = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqt, sqd, TQ, D) * m_qk[None, :]
    K += b * skb + h * skh
    V += b * svb + h * svh
    KPM += b * spb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M) if CAUSAL else TK
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        km = _load_tile(K, offs_n, offs_d, skt, skd, TK, D) * m_qk[None, :]
        vm = _load_tile(V, offs_n, offs_d, svt, svd, TK, D) * m_v[None, :]
        s = _dot(qm, tl.trans(km), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), ELT, UPCAST, PRECISION)
        ok = _allowed(offs_m[:, None], offs_n[None, :], TK, KPM, spn, CAUSAL, HAS_KPM)
        s = tl.where(ok, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: avoid inf - inf
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p, vm, acc * alpha[:, None], ELT, UPCAST, PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # no key to attend to: out = 0, and lse = +inf makes the backward's P = 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    _store_tile(Out + b * sob + h * soh, out, offs_m, offs_d, sot, sod, TQ, D, UPCAST)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh * TQ + offs_m, lse, mask=offs_m < TQ)


@_jit
def _attn_bwd_delta(Out, DO, DELTA, sob, soh, sot, sod, sdb, sdh, sdt, sdd, H, TQ, D,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[i] = rowsum(dO * out), the softmax backward's correction term."""
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(Out + b * sob + h * soh, offs_m, offs_d, sot, sod, TQ, D)
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, offs_d, sdt, sdd, TQ, D)
    tl.store(DELTA + bh * TQ + offs_m, tl.sum(o * do, 1), mask=offs_m < TQ)


@_jit
def _attn_bwd_dkdv(Q, K, V, MQK, MV, KPM, DO, LSE, DELTA, DK, DV, DMK, DMV,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                   sgb, sgh, sgt, sgd, smh, spb, spn, H, TQ, TK, D, qk_scale, sm_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                   ELT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program per key block: stream the query blocks, accumulate dKm, dVm; epilogue: dk, dv, masks."""
    pid_n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_qk = tl.load(MQK + h * smh + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    m_v = tl.load(MV + h * smh + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    k = _load_tile(K + b * skb + h * skh, offs_n, offs_d, skt, skd, TK, D)
    v = _load_tile(V + b * svb + h * svh, offs_n, offs_d, svt, svd, TK, D)
    km = k * m_qk[None, :]
    vm = v * m_v[None, :]
    Q += b * sqb + h * sqh
    DO += b * sdb + h * sdh
    KPM += b * spb

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # gradient w.r.t. km, without the scale s
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # gradient w.r.t. vm
    lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M if CAUSAL else 0
    for start_m in range(lo, TQ, BLOCK_M):
        offs_m = start_m + offs_m0
        qm = _load_tile(Q, offs_m, offs_d, sqt, sqd, TQ, D) * m_qk[None, :]
        do = _load_tile(DO, offs_m, offs_d, sdt, sdd, TQ, D)
        lse = tl.load(LSE + bh * TQ + offs_m, mask=offs_m < TQ, other=float("inf"))
        delta = tl.load(DELTA + bh * TQ + offs_m, mask=offs_m < TQ, other=0.0)
        zeros = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        sT = _dot(km, tl.trans(qm), zeros, ELT, UPCAST, PRECISION)  # (N, M)
        ok = _allowed(offs_m[None, :], offs_n[:, None], TK, KPM, spn, CAUSAL, HAS_KPM)
        pT = tl.where(ok, tl.exp2(sT * qk_scale - lse[None, :]), 0.0)
        dv = _dot(pT, do, dv, ELT, UPCAST, PRECISION)
        dpT = _dot(vm, tl.trans(do), zeros, ELT, UPCAST, PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT, qm, dk, ELT, UPCAST, PRECISION)
    dk *= sm_scale
    _store_tile(DK + b * sgb + h * sgh, dk * m_qk[None, :], offs_n, offs_d, sgt, sgd, TK, D, UPCAST)
    _store_tile(DV + b * sgb + h * sgh, dv * m_v[None, :], offs_n, offs_d, sgt, sgd, TK, D, UPCAST)
    part = (bh * tl.num_programs(0) + pid_n) * BLOCK_D + offs_d
    tl.store(DMK + part, tl.sum(k * dk, 0))
    tl.store(DMV + part, tl.sum(v * dv, 0))


@_jit
def _attn_bwd_dq(Q, K, V, MQK, MV, KPM, DO, LSE, DELTA, DQ, DMQ,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                 sgb, sgh, sgt, sgd, smh, spb, spn, H, TQ, TK, D, qk_scale, sm_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                 ELT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program per query block: stream the key blocks, accumulate dQm; epilogue: dq, qk-mask part."""
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_qk = tl.load(MQK + h * smh + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    m_v = tl.load(MV + h * smh + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqt, sqd, TQ, D)
    qm = q * m_qk[None, :]
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, offs_d, sdt, sdd, TQ, D)
    lse = tl.load(LSE + bh * TQ + offs_m, mask=offs_m < TQ, other=float("inf"))
    delta = tl.load(DELTA + bh * TQ + offs_m, mask=offs_m < TQ, other=0.0)
    K += b * skb + h * skh
    V += b * svb + h * svh
    KPM += b * spb

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # gradient w.r.t. qm, without the scale s
    hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M) if CAUSAL else TK
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        km = _load_tile(K, offs_n, offs_d, skt, skd, TK, D) * m_qk[None, :]
        vm = _load_tile(V, offs_n, offs_d, svt, svd, TK, D) * m_v[None, :]
        zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        s = _dot(qm, tl.trans(km), zeros, ELT, UPCAST, PRECISION)
        ok = _allowed(offs_m[:, None], offs_n[None, :], TK, KPM, spn, CAUSAL, HAS_KPM)
        p = tl.where(ok, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(vm), zeros, ELT, UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds, km, dq, ELT, UPCAST, PRECISION)
    dq *= sm_scale
    _store_tile(DQ + b * sgb + h * sgh, dq * m_qk[None, :], offs_m, offs_d, sgt, sgd, TQ, D, UPCAST)
    tl.store(DMQ + (bh * tl.num_programs(0) + pid_m) * BLOCK_D + offs_d, tl.sum(q * dq, 0))


# ------------------------------ configs ------------------------------------------------------------------
# Forward: autotuned on CUDA (BLOCK_M, BLOCK_N, num_warps, num_stages); a single small config in the
# interpreter, so the tests run several blocks and the ragged edges. Backward: a fixed config per head dim
# (its per-program mask-gradient buffers are sized by the block counts, so it is not autotuned).
_FWD_CUDA = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4)]
_FWD_INTERP = [(16, 16, 1, 1)]


def _bwd_config(block_d: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_M1/BLOCK_N1: dkdv kernel (queries per step, keys per program); BLOCK_M2/BLOCK_N2: dq kernel."""
    if INTERPRET:
        return dict(BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=16, num_warps=1, num_stages=1)
    big = block_d > 64 or dtype == torch.float32
    return dict(BLOCK_M1=32, BLOCK_N1=64 if big else 128, BLOCK_M2=64 if big else 128, BLOCK_N2=32,
                num_warps=8 if big else 4, num_stages=2 if big else 3)


if triton is not None:
    _attn_fwd = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                 for bm, bn, w, s in (_FWD_INTERP if INTERPRET else _FWD_CUDA)],
        key=["TQ", "TK", "BLOCK_D", "CAUSAL", "HAS_KPM", "ELT"],
    )(_attn_fwd)

_TL_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ------------------------------ kernel launchers and registered ops --------------------------------------
def _s4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _consts(q: torch.Tensor) -> dict:
    return dict(ELT=getattr(tl, _TL_DTYPE[q.dtype]), UPCAST=INTERPRET and q.dtype == torch.bfloat16,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _on(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on x's GPU (Triton launches on the current device), not on cuda:0."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _use_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_mask: torch.Tensor,
                v_mask: torch.Tensor) -> bool:
    """Whether the Triton kernels run on these inputs (else the torch reference does)."""
    if triton is None or not (q.is_cuda or (INTERPRET and q.device.type == "cpu")):
        return False
    return (q.dtype == k.dtype == v.dtype and all(x.dtype in KERNEL_DTYPES for x in (q, qk_mask, v_mask))
            and MIN_HEAD_DIM <= q.shape[-1] <= MAX_HEAD_DIM)


def _kernel_masks(qk_mask: torch.Tensor, v_mask: torch.Tensor, H: int,
                  D: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Contiguous masks of one shape and their head stride (0: a (D,) mask serves every head)."""
    m_qk, m_v = qk_mask.contiguous(), v_mask.contiguous()
    if m_v.dim() != m_qk.dim():
        return m_qk.expand(H, D).contiguous(), m_v.expand(H, D).contiguous(), D
    return m_qk, m_v, D if m_qk.dim() == 2 else 0


def _kernel_padding(kpm: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The padding mask as uint8 (q as a never-read placeholder without one) and its (B, Tk) strides."""
    if kpm is None:
        return q, 0, 0
    return kpm.view(torch.uint8), kpm.stride(0), kpm.stride(1)


def _kernel_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_mask: torch.Tensor,
                    v_mask: torch.Tensor, scale: float, causal: bool,
                    kpm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) from the Triton forward: out contiguous like q, lse float32 (B*H, Tq) in base 2."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    m_qk, m_v, smh = _kernel_masks(qk_mask, v_mask, H, D)
    kpm_u8, spb, spn = _kernel_padding(kpm, q)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B * H, Tq, device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(D))
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
    with _on(q):
        _attn_fwd[grid](q, k, v, m_qk, m_v, kpm_u8, o, lse, *_s4(q), *_s4(k), *_s4(v), *_s4(o),
                        smh, spb, spn, H, Tq, Tk, D, scale * LOG2E,
                        BLOCK_D=block_d, CAUSAL=causal, HAS_KPM=kpm is not None, **_consts(q))
    return o, lse


def _kernel_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     qk_mask: torch.Tensor, v_mask: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                     scale: float, causal: bool, kpm: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, d_qk_mask, d_v_mask) from the Triton backward, given the forward's out and lse."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    m_qk, m_v, smh = _kernel_masks(qk_mask, v_mask, H, D)
    kpm_arg, spb, spn = _kernel_padding(kpm, q)
    block_d = max(16, triton.next_power_of_2(D))
    cfg = _bwd_config(block_d, q.dtype)
    warps = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    consts = dict(BLOCK_D=block_d, CAUSAL=causal, HAS_KPM=kpm is not None, **_consts(q), **warps)
    delta = torch.empty_like(lse)
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))  # contiguous
    n_kb, n_qb = triton.cdiv(Tk, cfg["BLOCK_N1"]), triton.cdiv(Tq, cfg["BLOCK_M2"])
    dmk, dmv = (torch.empty(B, H, n_kb, block_d, device=q.device, dtype=torch.float32) for _ in range(2))
    dmq = torch.empty(B, H, n_qb, block_d, device=q.device, dtype=torch.float32)
    ins = (*_s4(q), *_s4(k), *_s4(v), *_s4(do))
    rest = (smh, spb, spn, H, Tq, Tk, D, scale * LOG2E, scale)
    bm = 16 if INTERPRET else 64
    with _on(q):
        _attn_bwd_delta[(triton.cdiv(Tq, bm), B * H)](o, do, delta, *_s4(o), *_s4(do), H, Tq, D,
                                                       BLOCK_M=bm, BLOCK_D=block_d)
        _attn_bwd_dkdv[(n_kb, B * H)](q, k, v, m_qk, m_v, kpm_arg, do, lse, delta, dk, dv, dmk, dmv,
                                      *ins, *_s4(dk), *rest,
                                      BLOCK_M=cfg["BLOCK_M1"], BLOCK_N=cfg["BLOCK_N1"], **consts)
        _attn_bwd_dq[(n_qb, B * H)](q, k, v, m_qk, m_v, kpm_arg, do, lse, delta, dq, dmq,
                                    *ins, *_s4(dq), *rest,
                                    BLOCK_M=cfg["BLOCK_M2"], BLOCK_N=cfg["BLOCK_N2"], **consts)
    d_qk = (dmq.sum((0, 2)) + dmk.sum((0, 2)))[:, :D]  # (H, D): summed over batch and blocks
    d_v = dmv.sum((0, 2))[:, :D]
    d_qk, d_v = (d.sum(0) if m.dim() == 1 else d for d, m in ((d_qk, qk_mask), (d_v, v_mask)))  # (D,) masks
    return dq, dk, dv, d_qk.to(qk_mask.dtype).contiguous(), d_v.to(v_mask.dtype).contiguous()


def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_mask: torch.Tensor,
                  v_mask: torch.Tensor, scale: float, causal: bool,
                  key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked_attention_fwd`` on real tensors (any device): the kernel where it runs, else the reference."""
    if _use_kernel(q, k, v, qk_mask, v_mask):
        return _kernel_forward(q, k, v, qk_mask, v_mask, scale, causal, key_padding_mask)
    out, lse = _reference_forward(q, k, v, qk_mask, v_mask, scale, causal, key_padding_mask, with_lse=True)
    return out.contiguous(), lse


def _forward_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_mask: torch.Tensor,
                  v_mask: torch.Tensor, scale: float, causal: bool,
                  key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked_attention_fwd`` on fake/meta tensors: out contiguous, shaped like q; lse float32 (B*H, Tq)."""
    B, H, Tq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B * H, Tq), dtype=torch.float32)


def _backward_impl(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   qk_mask: torch.Tensor, v_mask: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   scale: float, causal: bool,
                   key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``masked_attention_bwd`` on real tensors: the Triton backward, or the reference's (explicit)."""
    if _use_kernel(q, k, v, qk_mask, v_mask):
        return _kernel_backward(grad_out, q, k, v, qk_mask, v_mask, out, lse, scale, causal, key_padding_mask)

    grads = _reference_backward(grad_out, q, k, v, qk_mask, v_mask, scale, causal, key_padding_mask)
    return tuple(g.contiguous() for g in grads)


def _backward_fake(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   qk_mask: torch.Tensor, v_mask: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   scale: float, causal: bool,
                   key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``masked_attention_bwd`` on fake/meta tensors: contiguous gradients shaped like q, k, v and the masks."""
    return tuple(x.new_empty(x.shape) for x in (q, k, v, qk_mask, v_mask))


def _setup_context(ctx, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Autograd of ``masked_attention_fwd``: save the inputs, out and lse (lse is not differentiable)."""
    q, k, v, qk_mask, v_mask, scale, causal, key_padding_mask = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, qk_mask, v_mask, key_padding_mask, out, lse)
    ctx.scale, ctx.causal = scale, causal


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Autograd of ``masked_attention_fwd``: ``masked_attention_bwd`` on the saved tensors."""
    q, k, v, qk_mask, v_mask, key_padding_mask, out, lse = ctx.saved_tensors
    grads = _FWD_BWD_OPS[1](grad_out, q, k, v, qk_mask, v_mask, out, lse, ctx.scale, ctx.causal,
                            key_padding_mask)
    return (*grads, None, None, None)


def _composite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_mask: torch.Tensor,
               v_mask: torch.Tensor, scale: float, causal: bool = False,
               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``upop_fx::masked_attention``: the output of ``masked_attention_fwd``."""
    return _FWD_BWD_OPS[0](q, k, v, qk_mask, v_mask, scale, causal, key_padding_mask)[0]


_ARGS = "Tensor q, Tensor k, Tensor v, Tensor qk_mask, Tensor v_mask, float scale"
_SCHEMAS = {
    "masked_attention": f"({_ARGS}, bool causal=False, Tensor? key_padding_mask=None) -> Tensor",
    "masked_attention_fwd": f"({_ARGS}, bool causal, Tensor? key_padding_mask) -> (Tensor, Tensor)",
    "masked_attention_bwd": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor qk_mask, Tensor v_mask, "
                            "Tensor out, Tensor lse, float scale, bool causal, Tensor? key_padding_mask) "
                            "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}


def _define_ops() -> None:
    """Define the three ``upop_fx`` ops; once per process, as the dispatcher keeps them past a reload."""
    fwd = torch.library.custom_op("upop_fx::masked_attention_fwd", _forward_impl, mutates_args=(),
                                  schema=_SCHEMAS["masked_attention_fwd"])
    fwd.register_fake(_forward_fake)
    fwd.register_autograd(_backward, setup_context=_setup_context)
    bwd = torch.library.custom_op("upop_fx::masked_attention_bwd", _backward_impl, mutates_args=(),
                                  schema=_SCHEMAS["masked_attention_bwd"])
    bwd.register_fake(_backward_fake)
    torch.library.define("upop_fx::masked_attention", _SCHEMAS["masked_attention"],
                         tags=(torch.Tag.pt2_compliant_tag,))
    torch.library.impl("upop_fx::masked_attention", "CompositeImplicitAutograd", _composite)


if not hasattr(torch.ops.upop_fx, "masked_attention"):  # defined last by _define_ops
    _define_ops()
MASKED_ATTENTION_OP = torch.ops.upop_fx.masked_attention.default
_FWD_BWD_OPS = (torch.ops.upop_fx.masked_attention_fwd.default,
                torch.ops.upop_fx.masked_attention_bwd.default)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_mask: torch.Tensor,
                     v_mask: torch.Tensor, scale: float | None = None, causal: bool = False,
                     key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(((q*qk_mask) @ (k*qk_mask)^T) * scale) @ (v*v_mask), differentiable in q, k, v and both masks.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D); masks: (D,) or (H, D); dtype fp32/fp16/bf16, 16 <= D <= 128.
    ``scale=None`` is 1/sqrt(D). ``key_padding_mask``: bool (B, Tk), True = attend. See the module docstring.
    Checks the inputs, then calls the registered op :data:`MASKED_ATTENTION_OP`.
    Raises :class:`KernelInputError` (a ``ValueError``; :class:`KernelDtypeError` is also a ``TypeError``).
    """
    check_attention_inputs(q, k, v, qk_mask, v_mask, scale, causal, key_padding_mask, for_kernel=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return MASKED_ATTENTION_OP(q, k, v, qk_mask, v_mask, scale, causal, key_padding_mask)


# ------------------------------ torch reference ----------------------------------------------------------
# reads 3·B·H·T·D (+ 2·H·D masks), writes B·H·T·D; materialises the B·H·Tq·Tk scores (the kernel never does);
# FLOPs: forward 4·B·H·Tq·Tk·D (2 matmuls), backward 8·B·H·Tq·Tk·D (4; the kernel's recomputed S makes it 10).
def masked_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_mask: torch.Tensor,
                               v_mask: torch.Tensor, scale: float | None = None, causal: bool = False,
                               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain matmul + softmax version of :func:`masked_attention` (any floating dtype, any device)."""
    check_attention_inputs(q, k, v, qk_mask, v_mask, scale, causal, key_padding_mask, for_kernel=False)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _reference_forward(q, k, v, qk_mask, v_mask, scale, causal, key_padding_mask, with_lse=False)[0]


def _reference_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_mask: torch.Tensor,
                      v_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """qm, km, vm and the masks as (1 or H, 1, D) tensors of q's dtype (they broadcast over (B, H, T, D))."""
    D = q.shape[-1]
    m_qk = qk_mask.to(q.dtype).reshape(-1, 1, D)
    m_v = v_mask.to(q.dtype).reshape(-1, 1, D)
    return q * m_qk, k * m_qk, v * m_v, m_qk, m_v


def _reference_scores(qm: torch.Tensor, km: torch.Tensor, scale: float, causal: bool,
                      key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked scores S in at least float32 (0 on rows with no key) and the rows with a key, (B, H, Tq, 1)."""
    B, _, Tq, _ = qm.shape
    Tk = km.shape[2]
    s = (qm @ km.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=qm.device)
    if causal:
        allowed = allowed.tril()  # top-left aligned, as SDPA's is_causal
    allowed = allowed.expand(B, 1, Tq, Tk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    any_key = allowed.any(-1, keepdim=True)  # rows with no key: P = 0 (no NaN in the forward or backward)
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~any_key, 0.0)
    return s.to(torch.promote_types(s.dtype, torch.float32)), any_key


def _reference_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_mask: torch.Tensor,
                       v_mask: torch.Tensor, scale: float, causal: bool,
                       key_padding_mask: torch.Tensor | None, *,
                       with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, lse or None) of the reference on checked inputs; lse as the kernel's (float32, base 2)."""
    B, H, Tq, _ = q.shape
    qm, km, vm, _, _ = _reference_masked(q, k, v, qk_mask, v_mask)
    s, any_key = _reference_scores(qm, km, scale, causal, key_padding_mask)
    p = torch.softmax(s, dim=-1) * any_key
    out = p.to(q.dtype) @ vm
    if not with_lse:
        return out, None
    lse = torch.logsumexp(s, dim=-1).masked_fill(~any_key[..., 0], float("inf")) * LOG2E
    return out, lse.to(torch.float32).reshape(B * H, Tq)


def _reference_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        qk_mask: torch.Tensor, v_mask: torch.Tensor, scale: float, causal: bool,
                        key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, d_qk_mask, d_v_mask) of the reference: the module docstring's formulas, P recomputed."""
    qm, km, vm, m_qk, m_v = _reference_masked(q, k, v, qk_mask, v_mask)
    s, any_key = _reference_scores(qm, km, scale, causal, key_padding_mask)
    p = torch.softmax(s, dim=-1) * any_key
    d_vm = p.to(q.dtype).transpose(-2, -1) @ do
    dp = (do @ vm.transpose(-2, -1)).to(p.dtype)
    ds = ((p * (dp - (p * dp).sum(-1, keepdim=True))).to(q.dtype)) * scale
    d_qm, d_km = ds @ km, ds.transpose(-2, -1) @ qm
    d_qk = (q * d_qm).sum((0, 2)) + (k * d_km).sum((0, 2))  # (H, D)
    d_v = (v * d_vm).sum((0, 2))
    d_qk, d_v = (d.sum(0) if m.dim() == 1 else d for d, m in ((d_qk, qk_mask), (d_v, v_mask)))  # (D,) masks
    return d_qm * m_qk, d_km * m_qk, d_vm * m_v, d_qk.to(qk_mask.dtype), d_v.to(v_mask.dtype)
