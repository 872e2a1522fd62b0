"""Fixtures of the pruning tests."""

from __future__ import annotations

import pytest
import torch

from .helpers import dense_model


@pytest.fixture
def dense():
    """`dense(name)`: a cached dense model in eval mode; callers must not modify it."""
    return dense_model


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tests run many small convolutions, where thread start-up and
    contention on a shared CPU cost more than the arithmetic (ResNet-101 at 40 px: 5x faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
