"""upop_fx: structured pruning of Transformer models (UPop) as a compiler pipeline over FX graphs."""

from .api import METHODS, Result, compress, retrain
from .capture import Captured, capture
from .errors import (
    CaptureError,
    ConfigError,
    InputError,
    NoPrunableGroupError,
    SurgeryCheckError,
    SurgeryError,
    UnsupportedGraphError,
    UPopError,
)
from .groups import DimGroup, GroupAnalysis
from .report import Report
from .search.upop import UPop

__all__ = [
    "compress",
    "retrain",
    "UPop",
    "Result",
    "METHODS",
    "capture",
    "Captured",
    "DimGroup",
    "GroupAnalysis",
    "Report",
    "UPopError",
    "ConfigError",
    "InputError",
    "CaptureError",
    "NoPrunableGroupError",
    "UnsupportedGraphError",
    "SurgeryError",
    "SurgeryCheckError",
]
__version__ = "0.1.0"
