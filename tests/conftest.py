"""Shared fixtures and settings for the test suite (CPU only, offline)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

# Kernel tests run Triton in its CPU interpreter. Triton reads this once, when it is first imported — and
# torch may import it early — so it is set here, before torch, for the whole test process.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
# One intra-op thread per test process: CI runs 2 xdist workers on 2 cores, and on a loaded machine two
# spinning OpenMP threads per process make small ops a hundred times slower.
torch.set_num_threads(1)


#: test modules that share the zoo's compressed models (``tests.models.half``): one xdist scope, so one worker
#: compresses each model once for both
SHARED_ZOO = {"test_compress_zoo.py", "test_groups.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``--dist loadscope`` (``make test``): each test module runs in one worker (its module fixtures are
    built once), and the modules of :data:`SHARED_ZOO` in the same one."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedZoo(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "zoo" if Path(scope.split("::")[0]).name in SHARED_ZOO else scope

    return SharedZoo(config, log)


@pytest.fixture
def encoder():
    """A 2-layer ``nn.TransformerEncoder`` (packed in_proj, implicit scale) and an input."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return model, torch.randn(2, 10, 32)
