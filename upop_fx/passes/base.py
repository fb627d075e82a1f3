"""Pass infrastructure: every pass states what it requires and ensures and returns an honest result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

__all__ = ["PassResult", "GraphPass"]

T = TypeVar("T")


@dataclass
class PassResult(Generic[T]):
    """What a pass returns: the graph module it produced (or analysed), whether it changed, and its payload."""

    gm: torch.fx.GraphModule
    modified: bool
    value: T


class GraphPass(Generic[T]):
    """Base class: subclasses implement :meth:`run`; ``__call__`` lints the graph before and after."""

    #: human-readable contract, checked by the tests and shown by ``repr``.
    requires: str = ""
    ensures: str = ""

    def run(self, gm: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> PassResult[T]:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> PassResult[T]:
        gm.graph.lint()
        result = self.run(gm, *args, **kwargs)
        result.gm.graph.lint()
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(requires={self.requires!r}, ensures={self.ensures!r})"
