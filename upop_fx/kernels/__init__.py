"""Triton kernels, each beside its torch reference (the reference runs where Triton cannot).

``MASKED_ATTENTION_OP`` is the registered op ``torch.ops.upop_fx.masked_attention.default`` that
:func:`masked_attention` calls (graph passes emit it as a ``call_function`` target).
"""

from __future__ import annotations

from upop_fx.kernels._checks import KernelDtypeError, KernelInputError
from upop_fx.kernels.masked_attention import MASKED_ATTENTION_OP, masked_attention, masked_attention_reference

__all__ = [
    "MASKED_ATTENTION_OP",
    "KernelDtypeError",
    "KernelInputError",
    "masked_attention",
    "masked_attention_reference",
]
