"""Filter norms and the effective learning rate they imply, per conv layer.

A conv followed by BatchNorm is scale invariant: multiplying a filter by c leaves the network's
output unchanged and divides that filter's gradient by c. An SGD step of size lr therefore turns
the filter's direction by about lr * |g| / |w|, i.e. lr / |w|^2 in units of the normalised
gradient (van Laarhoven 2017, "L2 regularization versus batch and weight normalization"). Filters
whose norm grows large learn slowly; a filter regrowing from zero learns very fast. This module
measures both, for the kept filters (the pruned ones are zero right after an event and would
only say "infinite").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .groups import GroupSet
from .masks import MaskSet, conv_keep


def filter_norm_stats(weights: Mapping[str, Tensor], lr: float, groups: GroupSet | None = None,
                      masks: MaskSet | None = None) -> dict[str, dict[str, float]]:
    """conv name -> {"norm": mean L2 norm of its kept filters, "eff_lr": lr * mean(1 / norm^2)}.

    `weights` maps conv names to their (out, in, kh, kw) weights. With `groups` and `masks` only
    the kept filters of masked convs count; every other conv counts all its non-zero filters."""
    keep = conv_keep(groups, masks) if groups is not None and masks is not None else {}
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for conv, w in weights.items():
            norms = w.detach().float().flatten(1).norm(dim=1).cpu()
            kept = keep.get(conv)
            selected = norms[kept.bool().cpu()] if kept is not None else norms
            selected = selected[selected > 0]
            if len(selected) == 0:
                continue
            out[conv] = {"norm": float(selected.mean()), "eff_lr": float(lr * (1.0 / selected.pow(2)).mean())}
    return out


def summarize(stats: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Model-wide means of the per-layer figures (each layer weighs the same)."""
    if not stats:
        return {}
    n = len(stats)
    return {"norm": sum(s["norm"] for s in stats.values()) / n,
            "eff_lr": sum(s["eff_lr"] for s in stats.values()) / n}
