"""upop_fx: structured pruning of Transformer models (UPop) as a compiler pipeline over FX graphs.

Example:
    >>> import torch, upop_fx
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> result = upop_fx.compress(layer, torch.randn(2, 5, 16), ratio=0.5, method="magnitude", retrain_steps=0)
    >>> result.report.params_after < result.report.params_before
    True
"""

from . import pipeline
from .api import UPop, compress, retrain
from .artifacts import load, save
from .capture.program import Captured, capture
from .errors import (
    CaptureError,
    CheckpointError,
    ConfigError,
    DistributedMismatchError,
    ExportError,
    InputError,
    KernelDtypeError,
    KernelInputError,
    NoPrunableGroupError,
    PostconditionError,
    PreconditionError,
    SurgeryCheckError,
    SurgeryError,
    UnreachableRatioError,
    UPopError,
)
from .ir.groups import DimGroup, GroupAnalysis
from .module.depth import Depth, drop_layers
from .module.pretrained import from_pretrained, save_pretrained
from .options import ALLOCATIONS, BUDGETS, GRANULARITIES, METHODS, PRECISIONS, RUNTIMES, SCORES, Options
from .pipeline import Result
from .report import Report
from .runtime.export import export_onnx
from .search.strategy import Allocate, Prepared, Selection, Strategy, per_cost, unified, uniform

__all__ = [
    "compress",
    "save",
    "load",
    "save_pretrained",
    "from_pretrained",
    "drop_layers",
    "Depth",
    "export_onnx",
    "retrain",
    "UPop",
    "Options",
    "Result",
    "METHODS",
    "SCORES",
    "GRANULARITIES",
    "BUDGETS",
    "ALLOCATIONS",
    "PRECISIONS",
    "RUNTIMES",
    "pipeline",
    "Strategy",
    "Prepared",
    "Selection",
    "Allocate",
    "unified",
    "uniform",
    "per_cost",
    "capture",
    "Captured",
    "DimGroup",
    "GroupAnalysis",
    "Report",
    "UPopError",
    "ConfigError",
    "UnreachableRatioError",
    "InputError",
    "CaptureError",
    "CheckpointError",
    "DistributedMismatchError",
    "NoPrunableGroupError",
    "PreconditionError",
    "PostconditionError",
    "SurgeryError",
    "SurgeryCheckError",
    "ExportError",
    "KernelInputError",
    "KernelDtypeError",
]
__version__ = "0.1.0"
