"""The one exception hierarchy of upop_fx: every error a user can trigger is a :class:`UPopError`."""

from __future__ import annotations

__all__ = [
    "UPopError",
    "ConfigError",
    "InputError",
    "CaptureError",
    "NoPrunableGroupError",
    "UnsupportedGraphError",
    "SurgeryError",
    "SurgeryCheckError",
]


class UPopError(Exception):
    """Base class of every error raised by upop_fx."""


class ConfigError(UPopError, ValueError):
    """An argument is out of range or unknown (a ratio outside [0, 1), an unknown method, ...)."""


class InputError(UPopError, ValueError):
    """The example inputs are malformed or do not fit the model."""


class CaptureError(UPopError):
    """``torch.export`` could not capture the model; the message carries export's reason."""


class NoPrunableGroupError(UPopError):
    """The analysis found no group of channels that can be removed exactly."""


class UnsupportedGraphError(UPopError):
    """A graph construct the analysis or surgery cannot handle (names the node and the reason)."""


class SurgeryError(UPopError):
    """The requested keep-sets cannot be cut into a dense graph (names the group or node)."""


class SurgeryCheckError(SurgeryError):
    """The surgically reduced graph does not reproduce the zeroed reference: never returned silently."""
