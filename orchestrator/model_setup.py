"""The model a run trains: from the registry (dense, with its class count and options), from a
user's `package.module:factory` (traced, pruning/user_model.py), or rebuilt at the shape of a saved
architecture spec (pruning/respec.py); and a digest of its weights for resume checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import TrainConfig


def num_classes(cfg: TrainConfig) -> int | None:
    """model.num_classes, else the class count of a local manifest, else the model's default."""
    if cfg.model.num_classes:
        return cfg.model.num_classes
    try:
        from data.manifest import load_manifest

        return len(load_manifest(str(cfg.data.train).split("#")[0])["classes"])
    except Exception:  # remote or brace-expanded sources carry no class list: use the default
        return None


def zero_init_residual(model: nn.Module) -> None:
    """Zero the BN scale after each residual block's last conv, so every block starts as the
    identity (Goyal et al.): a from-scratch ResNet-101 then learns within a few hundred steps."""
    meta, modules = model.softprune_meta, dict(model.named_modules())
    for block in meta.blocks:
        nn.init.zeros_(modules[meta.bn[block.convs[-1]]].weight)


def dense_model(cfg: TrainConfig) -> nn.Module:
    """The configured model, dense, freshly initialised: a registered one, or a user factory's
    model traced at data.image_size (the size it trains at)."""
    from pruning.user_model import build, is_factory

    if is_factory(cfg.model.name):
        return build(cfg.model.name, cfg.model.kwargs, num_classes(cfg), cfg.data.image_size)
    from models import create_model

    return create_model(cfg.model.name, num_classes(cfg))


def build_model(cfg: TrainConfig, spec: dict | None) -> nn.Module:
    """The dense model (with model.zero_init_residual and model.pretrained), or the one a saved
    spec describes (compacted: its weights are loaded next)."""
    if spec is not None:
        from pruning.user_model import is_factory

        if is_factory(spec["model"]):
            return saved_model(cfg.model.kwargs, spec)
        from models import build_from_spec

        return build_from_spec(spec)  # initialised, as DeepSpeed first sees it (the checkpoint loads next)
    model = dense_model(cfg)
    if cfg.model.zero_init_residual:
        zero_init_residual(model)
    if cfg.model.pretrained:
        model.load_state_dict(torch.load(cfg.model.pretrained, map_location="cpu", weights_only=True))
    return model


def run_spec(cfg: TrainConfig, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A spec of this run's model as it is written next to weights (checkpoints, final/, the
    faithful candidate, the self-teacher): a user model's spec also carries model.kwargs, so the
    directory rebuilds without the run's config."""
    from pruning.respec import with_kwargs

    return with_kwargs(spec, cfg.model.kwargs)


def saved_model(kwargs: Mapping[str, Any] | None, spec: Mapping[str, Any]) -> nn.Module:
    """The model of a saved spec (a run's checkpoint, final/, a compacted directory), weights to
    be loaded; `kwargs`: the run's model.kwargs, for a spec written without them."""
    from pruning.respec import build, with_kwargs

    return build(with_kwargs(spec, kwargs))


def check_model(cfg: TrainConfig) -> None:
    """A user factory's model builds, traces and covers the data's classes (before Ray starts;
    one ValueError line naming model.name). Registered models were checked by the config."""
    from pruning.user_model import is_factory

    name = cfg.model.name
    if not is_factory(name):
        return
    try:
        model = dense_model(cfg)
    except ValueError as exc:
        raise ValueError(f"model.name {name!r}: {exc}") from None
    classes, width = num_classes(cfg), model.softprune_meta.num_classes
    if classes is not None and width < classes:
        raise ValueError(f"model.name {name!r}: its classifier has {width} outputs, the data has {classes} "
                         f"classes (give the factory a num_classes keyword, or set model.kwargs)")


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, fp32 values) in key order."""
    import hashlib

    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
