"""The action side of masking: zero the selected channels' tensors.

Soft masks zero the conv filter weights (and bias) only, as SFP does: BN still adds its constant,
and the filters may regrow. Hard masks also zero the BN weight and bias, so the channel's output
is exactly 0: the model that compaction reproduces.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .groups import GroupSet, tensor_names
from .masks import MaskSet, conv_keep


def masked_tensors(groups: GroupSet, masks: MaskSet, tensors: Mapping[str, Tensor], hard: bool = False,
                   strict: bool = False) -> dict[str, Tensor]:
    """New values (fresh tensors, same device and dtype) of the tensors in `tensors` that the masks
    touch: conv weights/biases, plus BN weight/bias when `hard`. The same call serves full fp32
    parameters gathered under ZeRO and optimizer moments of the same shapes. Names that masking
    touches but `tensors` lacks are skipped, or rejected with `strict`."""
    masks.check(groups)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for conv, keep in conv_keep(groups, masks).items():
            member = groups.member_of[conv][1]
            for name in tensor_names(member, hard):
                t = tensors.get(name)
                if t is None:
                    if strict:
                        raise ValueError(f"masked_tensors: no tensor named {name!r} given")
                    continue
                if t.shape[0] != len(keep):
                    raise ValueError(f"{name}: {t.shape[0]} channels, mask has {len(keep)}")
                drop = ~keep.to(t.device, non_blocking=True)
                out[name] = t.masked_fill(drop.view(-1, *([1] * (t.dim() - 1))), 0)
    return out


def apply_masks(model: nn.Module, groups: GroupSet, masks: MaskSet, hard: bool = False,
                optimizer: torch.optim.Optimizer | None = None, zero_moments: bool = False) -> None:
    """`masked_tensors` on a plain module, in place. With `optimizer` and `zero_moments`, also zero
    the pruned rows of every optimizer state tensor shaped like its parameter (SGD momentum, Adam
    moments), so the next step does not push zeroed filters straight back."""
    params = dict(model.named_parameters())
    new = masked_tensors(groups, masks, params, hard=hard, strict=True)
    with torch.no_grad():
        for name, value in new.items():
            params[name].copy_(value)
    if optimizer is None or not zero_moments:
        return
    by_key: dict[str, dict[str, Tensor]] = {}
    for name in new:
        for key, value in optimizer.state.get(params[name], {}).items():
            if torch.is_tensor(value) and value.shape == params[name].shape:
                by_key.setdefault(key, {})[name] = value
    with torch.no_grad():
        for moments in by_key.values():
            for name, value in masked_tensors(groups, masks, moments, hard=hard).items():
                moments[name].copy_(value)


def regrowth(groups: GroupSet, masks: MaskSet, tensors: Mapping[str, Tensor]) -> dict[str, float]:
    """Per conv: the mean L2 norm of the filters `masks` pruned, over the mean norm of the filters
    it kept, measured on `tensors` (taken later, e.g. at the next event). 0 means the pruned
    filters stayed at zero; near 1, they grew back as large as the kept ones (soft pruning lets
    them; how far they get says how soft the pruning really is)."""
    norms = {}
    for conv, member in ((c, groups.member_of[c][1]) for c in groups.convs()):
        weight = tensors.get(tensor_names(member, hard=False)[0])
        if weight is not None:
            norms[conv] = weight.detach().float().reshape(weight.shape[0], -1).norm(dim=1)
    return regrowth_from_norms(groups, masks, norms)


def regrowth_from_norms(groups: GroupSet, masks: MaskSet, norms: Mapping[str, Tensor]) -> dict[str, float]:
    """`regrowth` from per-filter L2 norms (conv -> (out_channels,) vector) computed elsewhere,
    e.g. summed from ZeRO fragments and all-reduced; convs missing from `norms` are skipped."""
    out: dict[str, float] = {}
    for conv, keep in conv_keep(groups, masks).items():
        if conv not in norms or bool(keep.all()) or not bool(keep.any()):
            continue
        conv_norms = norms[conv]
        keep = keep.to(conv_norms.device)
        kept = float(conv_norms[keep].mean())
        out[conv] = float(conv_norms[~keep].mean()) / kept if kept > 0 else 0.0
    return out
