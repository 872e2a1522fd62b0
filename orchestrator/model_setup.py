"""The model a run trains: from the registry (dense, with its class count and options) or rebuilt
from a compacted architecture spec, and a digest of its weights for resume checks."""

from __future__ import annotations

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


def build_model(cfg: TrainConfig, spec: dict | None) -> nn.Module:
    """The dense model from the registry, or the compacted one rebuilt from its spec."""
    from models import build_from_spec, create_model

    if spec is not None:
        return build_from_spec(spec)
    model = create_model(cfg.model.name, num_classes(cfg))
    if cfg.model.zero_init_residual:
        zero_init_residual(model)
    if cfg.model.pretrained:
        model.load_state_dict(torch.load(cfg.model.pretrained, map_location="cpu", weights_only=True))
    return model


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, fp32 values) in key order."""
    import hashlib

    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
