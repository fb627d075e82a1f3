"""The one exception hierarchy of upop_fx: every error a user can trigger is a :class:`UPopError`.

Example:
    >>> import upop_fx
    >>> try:
    ...     upop_fx.compress(None, None, ratio=2.0)
    ... except upop_fx.ConfigError as e:
    ...     print(e)
    ratio must be a number in [0, 1), got 2.0
"""

from __future__ import annotations

__all__ = [
    "UPopError",
    "ConfigError",
    "UnreachableRatioError",
    "InputError",
    "CaptureError",
    "NoPrunableGroupError",
    "PreconditionError",
    "PostconditionError",
    "SurgeryError",
    "SurgeryCheckError",
    "ExportError",
    "KernelInputError",
    "KernelDtypeError",
    "CheckpointError",
    "DistributedMismatchError",
]


class UPopError(Exception):
    """Base class of every error raised by upop_fx."""


class ConfigError(UPopError, ValueError):
    """An argument is out of range or unknown (a ratio outside [0, 1), an unknown method, ...)."""


class UnreachableRatioError(ConfigError):
    """A latency budget asks to remove more of the measured latency than every prunable structure together
    accounts for (``ratio`` asked, ``most`` the largest fraction pruning could save on that runtime and shape)."""

    def __init__(self, message: str, ratio: float, most: float) -> None:
        super().__init__(message)
        self.ratio, self.most = ratio, most


class InputError(UPopError, ValueError):
    """The example inputs or the training data are malformed, do not fit the model, or run out."""


class CaptureError(UPopError):
    """``torch.export`` could not capture the model; the message names the model's source line it failed on, a
    hint for the common cause, and export's reason (export's error itself is the ``__cause__``)."""


class NoPrunableGroupError(UPopError):
    """The analysis found no group of channels that can be removed exactly."""


class PreconditionError(UPopError):
    """A pass was given a graph that lacks what it requires (names the pass and what is missing)."""


class PostconditionError(UPopError):
    """A pass produced a graph that breaks what it ensures: never returned silently."""


class SurgeryError(UPopError):
    """The requested keep-sets cannot be cut into a dense graph (names the group or node)."""


class SurgeryCheckError(SurgeryError, PostconditionError):
    """The surgically reduced graph does not reproduce the zeroed reference: never returned silently."""


class ExportError(UPopError):
    """The model could not be exported to ONNX, or the ONNX file does not reproduce the PyTorch outputs."""


class KernelInputError(UPopError, ValueError):
    """An input a kernel cannot take: a wrong shape, length, device, dtype or head dim."""


class KernelDtypeError(KernelInputError, TypeError):
    """An input of the wrong type or dtype (also a ``TypeError``)."""


class CheckpointError(InputError):
    """A checkpoint directory that cannot be resumed here: written for another model or other settings, or
    unreadable."""


class DistributedMismatchError(UPopError):
    """Ranks of a data-parallel run that must agree (the dense model, the selected entries) do not."""
