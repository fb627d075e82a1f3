"""Shared fixtures and settings for the test suite (CPU only, offline)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
# one thread per xdist worker: the CI machine has 2 cores and runs 2 workers
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def encoder():
    """A 2-layer ``nn.TransformerEncoder`` (packed in_proj, implicit scale) and an input."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return model, torch.randn(2, 10, 32)
