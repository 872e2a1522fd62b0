"""Test-wide setup: every cache, temp dir and log stays inside the repo's ignored .cache/."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"

_ENV = {
    "TORCH_EXTENSIONS_DIR": CACHE / "torch_extensions",
    "MPLCONFIGDIR": CACHE / "matplotlib",
    "WANDB_DIR": CACHE / "wandb",
    "WANDB_CACHE_DIR": CACHE / "wandb",
    "WANDB_CONFIG_DIR": CACHE / "wandb",
    "WANDB_DATA_DIR": CACHE / "wandb",
    "TMPDIR": CACHE / "tmp",
}
for key, path in _ENV.items():
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(key, str(path))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


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
