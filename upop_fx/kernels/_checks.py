"""Input checks shared by the kernels and their torch references, and the errors they raise.

Every check runs on shapes, dtypes and devices only (never on values), so it costs no device
synchronisation and runs before any kernel launches.
"""

from __future__ import annotations

import torch

from ..errors import KernelDtypeError, KernelInputError

__all__ = ["KernelDtypeError", "KernelInputError", "check_attention_inputs"]

# The dtypes and head dims the Triton kernels support (the torch reference takes any floating dtype).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


def _need_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise KernelDtypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qk_mask: torch.Tensor,
    v_mask: torch.Tensor,
    scale: float | None,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    *,
    for_kernel: bool,
) -> None:
    """Raise a :class:`KernelInputError` if the arguments of ``masked_attention`` do not fit together.

    ``for_kernel=True`` also checks what only the Triton kernels need (dtype, head dim).
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("qk_mask", qk_mask), ("v_mask", v_mask)):
        _need_tensor(name, x)
    if key_padding_mask is not None:
        _need_tensor("key_padding_mask", key_padding_mask)
    if not isinstance(causal, bool):
        raise KernelDtypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise KernelDtypeError(f"scale must be a float or None, got {type(scale).__name__}")

    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise KernelInputError(f"{name} must be 4-D (B, H, T, D), got shape {tuple(x.shape)}")
    B, H, Tq, D = q.shape
    if k.shape != v.shape:
        raise KernelInputError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise KernelInputError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}: "
            "expected (B, H, Tk, D) with the same B, H and D as q"
        )
    Tk = k.shape[2]
    if any(n == 0 for n in (B, H, Tq, Tk, D)):  # not min(): it would guard symbolic sizes against each other
        raise KernelInputError(f"empty inputs are not supported: q {tuple(q.shape)}, k {tuple(k.shape)}")
    for name, m in (("qk_mask", qk_mask), ("v_mask", v_mask)):
        if m.shape not in ((D,), (H, D)):
            raise KernelInputError(
                f"{name} must have shape (D,) = ({D},) or (H, D) = ({H}, {D}), got {tuple(m.shape)}"
            )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise KernelDtypeError(f"key_padding_mask must be a bool tensor, got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (B, Tk):
            raise KernelInputError(
                f"key_padding_mask must have shape (B, Tk) = ({B}, {Tk}), got {tuple(key_padding_mask.shape)}"
            )

    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise KernelDtypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, x in (("q", q), ("qk_mask", qk_mask), ("v_mask", v_mask)):
        if not x.dtype.is_floating_point:
            raise KernelDtypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    named = [("q", q), ("k", k), ("v", v), ("qk_mask", qk_mask), ("v_mask", v_mask)]
    if key_padding_mask is not None:
        named.append(("key_padding_mask", key_padding_mask))
    devices = {name: x.device for name, x in named}
    if len(set(devices.values())) > 1:
        raise KernelInputError(f"all tensors must be on one device, got {devices}")

    if for_kernel:
        for name, x in (("q", q), ("qk_mask", qk_mask), ("v_mask", v_mask)):
            if x.dtype not in KERNEL_DTYPES:
                raise KernelDtypeError(f"{name}: dtype {x.dtype} is not supported (float32, float16, bfloat16)")
        if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
            raise KernelInputError(f"head dim {D} is not supported: need {MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM}")
