"""Model zoo: CIFAR and ImageNet ResNets, VGG-16 for CIFAR, all buildable from an architecture spec."""

from .layers import Conv2d, Scatter, ShortcutA
from .meta import BlockMeta, ModelMeta, StreamMeta
from .registry import arch_spec, build_from_spec, create_model, list_models

__all__ = [
    "BlockMeta", "Conv2d", "ModelMeta", "Scatter", "ShortcutA", "StreamMeta",
    "arch_spec", "build_from_spec", "create_model", "list_models",
]
