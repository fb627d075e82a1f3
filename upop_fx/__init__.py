"""upop_fx: structured pruning of Transformer models (UPop) as a compiler pipeline over FX graphs."""

from .api import METHODS, Result, compress, retrain
from .artifacts import load, save
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
from .export import ExportError, export_onnx
from .groups import DimGroup, GroupAnalysis
from .report import Report
from .search.upop import UPop

__all__ = [
    "compress",
    "save",
    "load",
    "export_onnx",
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
    "ExportError",
]
__version__ = "0.1.0"
