"""Shards in, uint8 batches out: shard writing, synthetic data, the streaming loader, transforms.

No ray, deepspeed, wandb or torch.distributed imports: rank and world size are passed in.
"""

from data.config import DataConfig
from data.manifest import MANIFEST_NAME, load_manifest
from data.sources import ShardSet, resolve_source
from data.synthetic import write_synthetic
from data.transforms import normalize
from data.imagenet_writer import write_imagenet_shards

# The loader side imports torch (about a second); shard writing never needs it, so these load
# on first use.
_LAZY = {"StreamingLoader": "data.loader", "make_train_loader": "data.loader",
         "make_val_loader": "data.loader", "CorruptShardError": "data.stream"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")


__all__ = [
    "DataConfig", "StreamingLoader", "make_train_loader", "make_val_loader", "MANIFEST_NAME",
    "load_manifest", "ShardSet", "resolve_source", "CorruptShardError", "write_synthetic", "normalize", "write_imagenet_shards",
]
