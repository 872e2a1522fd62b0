"""Filter importance: one score per group slot, larger = more important.

A criterion maps a conv weight (out, in, kh, kw) to one score per output channel, with one
vectorised call per conv (no loop over filters). Each member conv's scores are first divided by
that member's mean score (`_relative`), then a group's slot score is the mean over the member
channels mapped to that slot, so streams with many producers are not favoured over single convs
and no member outweighs the others by its size or scale. Scores are therefore relative (about 1
on average per member): only their order within a group, and their ratio to the group's mean
(global scope), carry meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import CRITERIA
from .groups import Group, GroupSet


def _l1(w: Tensor) -> Tensor:
    return torch.linalg.vector_norm(w.flatten(1), ord=1, dim=1)


def _l2(w: Tensor) -> Tensor:
    return torch.linalg.vector_norm(w.flatten(1), ord=2, dim=1)


def _fpgm(w: Tensor) -> Tensor:
    """Sum of distances to the layer's other filters (He et al. 2019): filters near the geometric
    median are the most replaceable, so they get the smallest score. O(out^2 * in*k*k)."""
    flat = w.flatten(1)
    return torch.cdist(flat.unsqueeze(0), flat.unsqueeze(0)).squeeze(0).sum(1)


_FUNCS: dict[str, Callable[[Tensor], Tensor]] = {"l1": _l1, "l2": _l2, "fpgm": _fpgm}


def filter_scores(weight: Tensor, criterion: str = "l2") -> Tensor:
    """Per-output-channel score of one conv weight (fp32, on the weight's device)."""
    if criterion not in _FUNCS:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return _FUNCS[criterion](weight.detach().float())


def _relative(s: Tensor) -> Tensor:
    """One member conv's scores divided by their mean: the one place where scores of different
    convs are made comparable, before a group combines them (every criterion, every policy).

    A coupled group mixes convs of different fan-in, width and scale: the stem and the
    16/32/64-channel stages of an option-A-linked CIFAR stream, a bottleneck's conv3 and its
    downsample. Raw L1 grows with fan-in, FPGM (a sum over the layer's other filters) with width,
    and every criterion with the conv's weight scale, which training sets freely because a BN
    follows every conv (the network does not change when one conv's weights are rescaled, so
    neither may the ranking). Combined raw, the widest or largest-scale members decided alone and
    emptied the narrow stages (ResNet-56/110, rate 0.3: 1 of layer1's 16 channels kept).
    L1, L2 and FPGM are positively homogeneous in the weights, so dividing by the member's own
    mean makes its scores exactly scale-free, about 1 for a typical filter, whatever its fan-in or
    width. The mean rather than the max (one outlier filter would squash the rest), the median
    (0 once soft-masked zero filters are the majority) or a z-score (negative scores; spreads
    differ between criteria). Within one conv it is a positive rescaling, so single-conv groups
    rank as before, in `select`'s global scope too (which divides by the group's mean anyway).
    A member whose filters are all zero scores 0 everywhere."""
    return s / s.mean().clamp_min(1e-12)


@dataclass(frozen=True)
class FilterScores:
    """Raw per-filter scores of every scored conv under one criterion, computed without the full
    weights at hand: e.g. L1/L2 filter norms summed from ZeRO fragments and all-reduced
    (orchestrator/coordinator.py). `score` takes them in place of weights and combines them
    exactly as it combines the scores it computes itself."""

    criterion: str
    per_conv: Mapping[str, Tensor]  # conv name -> (out_channels,) raw scores


def _combine(group: Group, per_conv: Mapping[str, Tensor]) -> Tensor:
    """One group's slot scores from its members' raw filter scores (see the module docstring)."""
    scored = [m for m in group.members if not m.follower]
    if len(scored) == 1 and scored[0].slot is None:
        return _relative(_member(per_conv, scored[0].conv))
    total = None
    for m in scored:
        s = _relative(_member(per_conv, m.conv))
        if total is None:
            total = s.new_zeros(group.size)
        total.index_add_(0, m.slot.to(s.device), s)
    return total / group.slot_count.to(total.device)


def _member(per_conv: Mapping[str, Tensor], conv: str) -> Tensor:
    if conv not in per_conv:
        raise ValueError(f"score: no filter scores for conv {conv!r} given")
    return per_conv[conv].detach().float()


def _weight(tensors: Mapping[str, Tensor], conv: str) -> Tensor:
    name = f"{conv}.weight"
    if name not in tensors:
        raise ValueError(f"score: no tensor named {name!r} given")
    return tensors[name].detach().float()


def score_from_filter_scores(groups: GroupSet, per_conv: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Slot scores of every group from raw per-filter scores (conv -> (out_channels,) vector), as
    `score` computes them from weights: each member's divided by its mean, then combined."""
    with torch.no_grad():
        out = {g.name: _combine(g, per_conv) for g in groups}
    return {k: v.cpu() for k, v in out.items()}  # sync point when the scores are on a GPU


def score(groups: GroupSet, tensors: Mapping[str, Tensor] | FilterScores,
          criterion: str = "l2") -> dict[str, Tensor]:
    """Score every slot of every group from the conv weights in `tensors` (name -> tensor, e.g.
    `dict(model.named_parameters())` or full fp32 weights gathered under ZeRO), or from
    precomputed `FilterScores` of the same criterion. Returns CPU fp32 vectors keyed by group
    name, relative scores (each member conv's divided by its mean, see `_relative`); computed
    where the weights live, one copy back at the end."""
    if criterion not in _FUNCS:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if isinstance(tensors, FilterScores):
        if tensors.criterion != criterion:
            raise ValueError(f"score: the filter scores given are {tensors.criterion!r} scores, "
                             f"not {criterion!r} (the coordinator's criterion must be the chooser's)")
        return score_from_filter_scores(groups, tensors.per_conv)
    fn = _FUNCS[criterion]
    with torch.no_grad():
        per_conv = {conv: fn(_weight(tensors, conv)) for conv in groups.convs()}
    return score_from_filter_scores(groups, per_conv)
