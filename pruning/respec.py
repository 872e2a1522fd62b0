"""The model an architecture spec describes, for registered and user (`package.module:factory`) models.

A registered model is rebuilt by the registry (`compact.empty_build`). A traced user model has no
builder that reads channel counts; its compact shape is rebuilt the way it was made: a fresh dense
model from the factory (`model_kwargs`, `num_classes`, traced at `input_size`), the masks that
keep exactly the spec's `kept` channels of every conv under the spec's `policy`, and `compact`
in the spec's `compact_mode`. Compaction's shape depends on which channels are kept, never on
weight values, so the result has the saved model's shape and state-dict keys; load its weights
next. A spec that the factory no longer reproduces is refused with the first difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .groups import GroupSet, build_groups
from .masks import MaskSet, conv_keep
from .user_model import build as build_user
from .user_model import is_factory

SHAPE_KEYS = ("channels", "scatter", "const_input", "shortcut_a")  # what a rebuild must reproduce
KWARGS_KEY = "model_kwargs"  # a user model's factory arguments, carried in its specs


def masks_from_kept(groups: GroupSet, kept: Mapping[str, Sequence[int]], epoch: int = 0) -> MaskSet:
    """The masks under which every grouped conv listed in `kept` keeps exactly `kept[conv]` (its
    output channels), e.g. a compaction spec's `kept`. A group none of whose convs is listed keeps
    everything; kept channels that no mask of these groups gives (members of one group that
    disagree) raise."""
    keep = {}
    for g in groups:
        listed = [m for m in g.members if m.conv in kept]
        k = torch.zeros(g.size, dtype=torch.bool) if listed else torch.ones(g.size, dtype=torch.bool)
        for m in listed:
            idx = torch.as_tensor(list(kept[m.conv]), dtype=torch.long)
            k[idx if m.slot is None else m.slot[idx]] = True
        keep[g.name] = k
    masks = MaskSet(epoch, keep)
    for conv, k in conv_keep(groups, masks).items():
        if conv in kept and torch.nonzero(k).flatten().tolist() != sorted(int(i) for i in kept[conv]):
            raise ValueError(f"kept channels of '{conv}' are not what the {groups.policy} groups can keep "
                             f"(they are tied to another conv's)")
    return masks


def compact_from_spec(dense: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """`dense` (any weights, a `softprune_meta`) compacted to the shape `spec` records: the same
    policy, mode and kept channels. The weights are `dense`'s cut down: load the real ones next."""
    from .compact import compact

    for key in ("kept", "policy", "compact_mode"):
        if key not in spec:
            raise ValueError(f"architecture spec of {spec.get('model')!r} has no {key!r}: not a compaction's spec")
    groups = build_groups(dense, spec["policy"])
    masks = masks_from_kept(groups, spec["kept"])
    model, got = compact(dense, groups, masks, spec["compact_mode"], input_size=_size(spec, dense))
    _check_same_shape(spec, got)
    return model


def dense_model(spec: Mapping[str, Any]) -> nn.Module:
    """The dense model a spec's `model` names (fresh weights): the registry's, or the factory's,
    traced at the spec's input size."""
    if is_factory(spec["model"]):
        return build_user(spec["model"], spec.get(KWARGS_KEY), spec.get("num_classes"), _size(spec))
    from models import create_model

    return create_model(spec["model"], spec.get("num_classes"))


def build(spec: Mapping[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """The model `spec` describes, dense or compacted, with arbitrary weights (load them next).
    Leaves the global RNG as it was."""
    if not isinstance(spec, Mapping) or "model" not in spec:
        raise ValueError("architecture spec must be a mapping with a 'model' key")
    if not is_factory(spec["model"]):
        from .compact import empty_build

        return empty_build(spec, device)
    with torch.random.fork_rng(devices=[]):  # the factory's initialisation is thrown away
        dense = dense_model(spec)
        _check_classes(spec, dense)
        model = compact_from_spec(dense, spec) if "kept" in spec else _check_dense(spec, dense)
    return model.to(device)


def with_kwargs(spec: Mapping[str, Any], kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """`spec` carrying a user model's factory arguments (what `build` needs besides the spec);
    a registered model's spec, or one that carries them already, is returned as it is."""
    out = dict(spec)
    if is_factory(str(out.get("model", ""))) and KWARGS_KEY not in out:
        out[KWARGS_KEY] = dict(kwargs or {})
    return out


def _size(spec: Mapping[str, Any], dense: nn.Module | None = None):
    size = spec.get("input_size")
    if size is None:
        return dense.softprune_meta.input_size if dense is not None else 224
    return size if isinstance(size, int) else tuple(size)


def _check_classes(spec: Mapping[str, Any], dense: nn.Module) -> None:
    want, got = spec.get("num_classes"), dense.softprune_meta.num_classes
    if want is not None and want != got:
        raise ValueError(f"{spec['model']} builds a classifier of {got} classes, the spec has {want}: "
                         f"the factory changed since the spec was written")


def _check_dense(spec: Mapping[str, Any], dense: nn.Module) -> nn.Module:
    from models import arch_spec

    _check_same_shape(spec, arch_spec(dense))
    return dense


def _check_same_shape(spec: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    for key in SHAPE_KEYS:
        a, b = spec.get(key) or {}, got.get(key) or {}
        if a != b:
            first = _first_difference(a, b)
            raise ValueError(f"{spec['model']} no longer builds the model this spec describes ({key}"
                             f"{first}); the factory or its arguments changed since the spec was written")


def _first_difference(a, b) -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return f" of {k!r}: spec {a.get(k)!r}, rebuilt {b.get(k)!r}"
    return f": spec {a!r}, rebuilt {b!r}"
