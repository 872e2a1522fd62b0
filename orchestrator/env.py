"""The process environment softprune relies on, in one place: where caches, temp dirs and wandb's
caches go (inside the checkout's ignored .cache/ unless the user chose otherwise), the settings that
keep Ray and wandb quiet, and what a Ray Train worker inherits from the driver (object-storage
credentials included). A run's own wandb files go under its storage (tracking.tracking_dir);
WANDB_DIR is only wandb's fallback.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

CACHE = Path(__file__).resolve().parents[1] / ".cache"

CACHE_DIRS = {  # variable -> folder under .cache/
    "TORCH_EXTENSIONS_DIR": "torch_extensions", "MPLCONFIGDIR": "matplotlib", "TMPDIR": "tmp",
    "WANDB_DIR": "wandb", "WANDB_CACHE_DIR": "wandb", "WANDB_CONFIG_DIR": "wandb", "WANDB_DATA_DIR": "wandb",
}
QUIET = {
    "WANDB_X_DISABLE_STATS": "true",  # no system monitor writing into ~/.cache
    "WANDB_SILENT": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # worker prints would appear twice
}
# The standard AWS settings object storage is reached with (orchestrator/storage.py): workers
# write checkpoints, outputs and wandb files to the run's storage with the driver's.
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE", "AWS_EC2_METADATA_DISABLED")
# What every Ray Train worker gets from the driver (DS_ACCELERATOR only if the user set it: each
# worker picks its own, since the driver may have no GPU while the workers have).
WORKER_KEYS = (*CACHE_DIRS, *QUIET, "WANDB_MODE", "WANDB_API_KEY", "DS_ACCELERATOR", "PYTHONPATH",
               "SOFTPRUNE_FAULTS", "SOFTPRUNE_VERBOSE", *AWS_KEYS)


def set_defaults(extra: dict[str, str] | None = None, cache: Path = CACHE) -> None:
    """Fill in every variable the user has not set; create the folders."""
    for key, sub in CACHE_DIRS.items():
        if key not in os.environ:
            (cache / sub).mkdir(parents=True, exist_ok=True)
            os.environ[key] = str(cache / sub)
    for key, value in {**QUIET, **(extra or {})}.items():
        os.environ.setdefault(key, value)
    if not sys.stdout.isatty():
        # Ray wraps every worker line it relays in ANSI colour codes; in a log file (nohup,
        # `ray job logs`, CI) they are noise around the one line per epoch
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    tempfile.tempdir = None  # re-read TMPDIR


def worker_env() -> dict[str, str]:
    """The environment a Ray Train worker is started with."""
    env = {k: os.environ[k] for k in WORKER_KEYS if k in os.environ}
    env.update({k: v for k, v in QUIET.items() if k not in env})
    return env


def make_dirs() -> None:
    """On a worker: the driver's folders may not exist on this node."""
    for key in CACHE_DIRS:
        if os.environ.get(key):
            os.makedirs(os.environ[key], exist_ok=True)


def verbose(flag: bool = False) -> bool:
    """Ray's own chatter on the console: `tracking.verbose=true` or SOFTPRUNE_VERBOSE=1."""
    return flag or os.environ.get("SOFTPRUNE_VERBOSE", "") not in ("", "0")
