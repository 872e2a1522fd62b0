"""Norm control at soft mask events: kept filters back to a target norm, the function unchanged.

Under SFP a zeroed filter regrows from zero, and a conv followed by BatchNorm is scale
invariant, so every step on it is orthogonal to it and only lengthens it. Event after event the
layer's filter norms ratchet up (30 to 76 times their init norm in docs/results.md), and the
effective learning rate, about lr / |w|^2 (pruning/norms.py), collapses: training stalls.

Norm control undoes the ratchet at each soft event. Every kept non-zero filter of a masked conv
is scaled by c = target / |w| (per filter), where the target is the conv's mean filter norm at
the start of training. Because BN follows, the network computes the same function after the
rescale, also in eval mode: the conv bias is scaled by c, the BN's running mean by c and its
running variance by c^2. The optimizer state follows the filter: SGD momentum and Adam's first
moment by c, Adam's second moment by c^2. Scaling the momentum by c (not by 1/c, the gradient's
own scaling) keeps the step the old velocity carries the same size relative to the filter; 1/c
would turn a 50x shrink into a 2500x larger relative step.

Convs that no BN follows are left alone (their function is not scale invariant).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .groups import GroupSet
from .masks import MaskSet, conv_keep

# optimizer state key -> the power of c it is scaled by (a key missing here is left alone)
MOMENT_POWER = {"momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2}


def _row_norms(t: Tensor) -> Tensor:
    return t.detach().float().reshape(t.shape[0], -1).norm(dim=1)


def layer_norms(groups: GroupSet, tensors: Mapping[str, Tensor]) -> dict[str, float]:
    """conv -> the mean L2 norm of its non-zero filters in `tensors` (the targets, when taken
    at the start of training)."""
    return mean_nonzero({conv: _row_norms(tensors[f"{conv}.weight"]) for conv in groups.convs()})


def mean_nonzero(norms: Mapping[str, Tensor]) -> dict[str, float]:
    """conv -> the mean of its non-zero per-filter norms (convs whose filters are all zero are
    left out): `layer_norms` from norms computed elsewhere (summed over ZeRO fragments)."""
    out = {}
    for conv, n in norms.items():
        nonzero = n[n > 0]
        if len(nonzero):
            out[conv] = float(nonzero.mean())
    return out


def renorm_factors(groups: GroupSet, masks: MaskSet, tensors: Mapping[str, Tensor],
                   targets: Mapping[str, float]) -> dict[str, Tensor]:
    """conv -> (out_channels,) factors: target / norm for each kept non-zero filter, 1 for the
    pruned (zero) ones. Only convs with a BN after them and a target."""
    norms = {conv: _row_norms(tensors[f"{conv}.weight"]) for conv in conv_keep(groups, masks)
             if groups.member_of[conv][1].bn is not None and conv in targets}
    return factors_from_norms(groups, masks, norms, targets)


def factors_from_norms(groups: GroupSet, masks: MaskSet, norms: Mapping[str, Tensor],
                       targets: Mapping[str, float]) -> dict[str, Tensor]:
    """`renorm_factors` from per-filter L2 norms (conv -> (out_channels,) vector) computed
    elsewhere, e.g. summed from ZeRO fragments and all-reduced (orchestrator/coordinator.py)."""
    out = {}
    for conv, keep in conv_keep(groups, masks).items():
        if groups.member_of[conv][1].bn is None or conv not in targets:
            continue
        conv_norms = norms[conv]
        scale = keep.to(conv_norms.device).bool() & (conv_norms > 0)
        out[conv] = torch.where(scale, targets[conv] / conv_norms.clamp_min(1e-12), torch.ones_like(conv_norms))
    return out


def scale_rows(t: Tensor, c: Tensor, power: int = 1) -> Tensor:
    """`t` with row i multiplied by c[i] ** power (a new tensor, same dtype and device)."""
    f = c.to(t.device, torch.float32).pow(power).view(-1, *([1] * (t.dim() - 1)))
    return (t.float() * f).to(t.dtype)


def rescaled_tensors(groups: GroupSet, factors: Mapping[str, Tensor],
                     tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """New values of the tensors (of those present in `tensors`) the rescale changes: conv weight
    and bias by c, the BN's running mean by c and running variance by c^2."""
    out = {}
    for conv, c in factors.items():
        bn = groups.member_of[conv][1].bn
        for name, power in ((f"{conv}.weight", 1), (f"{conv}.bias", 1),
                            (f"{bn}.running_mean", 1), (f"{bn}.running_var", 2)):
            if name in tensors:
                out[name] = scale_rows(tensors[name], c, power)
    return out


def renormalise(model: nn.Module, groups: GroupSet, masks: MaskSet, targets: Mapping[str, float],
                optimizer: torch.optim.Optimizer | None = None) -> dict[str, Tensor]:
    """Norm control on a plain module (and its optimizer's state), in place; returns the factors.
    The orchestrator does the same through DeepSpeed's master copy (orchestrator/coordinator.py)."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    factors = renorm_factors(groups, masks, params, targets)
    with torch.no_grad():
        for name, value in rescaled_tensors(groups, factors, {**params, **buffers}).items():
            (params.get(name) if name in params else buffers[name]).copy_(value)
        for conv, c in factors.items():
            for name in (f"{conv}.weight", f"{conv}.bias"):
                state = optimizer.state.get(params[name], {}) if optimizer and name in params else {}
                for key, power in MOMENT_POWER.items():
                    if key in state:
                        state[key].copy_(scale_rows(state[key], c, power))
    return factors


def mean_factor(factors: Mapping[str, Tensor]) -> float | None:
    """The mean factor over the rescaled filters (<1: the filters had grown), for the history."""
    scaled = [c[c != 1] for c in factors.values()]
    scaled = torch.cat(scaled) if scaled else torch.zeros(0)
    return float(scaled.mean()) if len(scaled) else None
