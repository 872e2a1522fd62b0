"""Model registry: one name per architecture, so every test can be parametrised over the zoo."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from . import resnet, resnet_cifar, vgg
from .spec import SPEC_KEYS, spec_of

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet_cifar.resnet20,
    "resnet32": resnet_cifar.resnet32,
    "resnet56": resnet_cifar.resnet56,
    "resnet110": resnet_cifar.resnet110,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "vgg16_cifar": vgg.vgg16_cifar,
}


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _BUILDERS[name]


def create_model(name: str, num_classes: int | None = None, spec: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a registered model (dense unless `spec` narrows it). `num_classes` defaults to the
    family's dataset (10 for CIFAR models, 1000 for ImageNet ones)."""
    build = _builder(name)
    kwargs: dict[str, Any] = {"spec": dict(spec) if spec else None}
    if num_classes is not None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        kwargs["num_classes"] = num_classes
    return build(**kwargs)


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model, dense or narrowed, from `arch_spec(model)` (or a compaction's arch.json)."""
    if not isinstance(spec, Mapping) or "model" not in spec:
        raise ValueError("architecture spec must be a mapping with a 'model' key")
    shape = {k: spec[k] for k in SPEC_KEYS if k in spec}
    return create_model(spec["model"], spec.get("num_classes"), shape)


def arch_spec(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable spec of `model`'s current shape; `build_from_spec` inverts it."""
    if not hasattr(model, "softprune_meta"):
        raise ValueError(f"{type(model).__name__} is not a softprune model (no softprune_meta)")
    spec = spec_of(model)
    spec["input_size"] = model.softprune_meta.input_size
    return spec
