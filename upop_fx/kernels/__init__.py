"""Triton kernels, each beside its torch reference (the reference runs where Triton cannot)."""

from __future__ import annotations

from upop_fx.kernels._checks import KernelDtypeError, KernelInputError
from upop_fx.kernels.masked_attention import masked_attention, masked_attention_reference

__all__ = ["KernelDtypeError", "KernelInputError", "masked_attention", "masked_attention_reference"]
