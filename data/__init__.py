"""Shards in, uint8 batches out: shard writing, synthetic data, the streaming loader, transforms.

No ray, deepspeed, wandb or torch.distributed imports: rank and world size are passed in.
"""

from data.config import DataConfig
from data.loader import StreamingLoader, make_train_loader, make_val_loader
from data.manifest import MANIFEST_NAME, load_manifest
from data.sources import ShardSet, resolve_source
from data.stream import CorruptShardError
from data.synthetic import write_synthetic
from data.transforms import normalize
from data.writer import write_imagenet_shards

__all__ = [
    "DataConfig", "StreamingLoader", "make_train_loader", "make_val_loader", "MANIFEST_NAME",
    "load_manifest", "ShardSet", "resolve_source", "CorruptShardError", "write_synthetic", "normalize", "write_imagenet_shards",
]
