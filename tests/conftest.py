"""Test-wide setup: every cache, temp dir and log stays inside the repo's ignored .cache/."""

from __future__ import annotations

import pytest

from orchestrator.env import set_defaults

set_defaults({"WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"})


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
