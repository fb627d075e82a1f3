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
#: modules of few but long tests (subprocesses, exports, end-to-end runs), handed out first after the zoo: by
#: test count (xdist's order) they came last and left one worker running them alone
LONG_FIRST = ("test_cli.py", "test_module_back.py", "test_bench_tasks.py", "test_distributed.py", "test_latency.py",
              "test_checkpoint.py", "test_docs.py", "test_bench_common.py", "test_gpu_check.py", "test_decode.py",
              "test_recipe.py")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist runs the suite in one process
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``--dist loadscope`` (``make test``): each test module runs in one worker (its module fixtures are
    built once), the modules of :data:`SHARED_ZOO` in the same one; the zoo and :data:`LONG_FIRST` go out first."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    def module(scope: str) -> str:
        return Path(scope.split("::")[0]).name

    class SharedZoo(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "zoo" if module(scope) in SHARED_ZOO else scope

        def _assign_work_unit(self, node: Any) -> None:
            if not self.ordered:  # xdist's queue, by test count, with the long modules moved to its front
                first = ["zoo", *LONG_FIRST]
                def rank(unit: tuple[str, Any]) -> int:
                    return first.index(module(unit[0])) if module(unit[0]) in first else len(first)

                queue = sorted(self.workqueue.items(), key=rank)  # stable: the rest keep xdist's order
                self.workqueue.clear()
                self.workqueue.update(queue)
                self.ordered = True
            super()._assign_work_unit(node)

    return SharedZoo(config, log)


@pytest.fixture
def encoder():
    """A 2-layer ``nn.TransformerEncoder`` (packed in_proj, implicit scale) and an input."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return model, torch.randn(2, 10, 32)
