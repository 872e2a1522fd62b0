"""Filter importance: one score per group slot, larger = more important.

A criterion maps a conv weight (out, in, kh, kw) to one score per output channel, with one
vectorised call per conv (no loop over filters). A group's slot score is the mean over the member
channels mapped to that slot, so streams with many producers are not favoured over single convs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .groups import Group, GroupSet

CRITERIA = ("l1", "l2", "fpgm")


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


def _group_score(group: Group, tensors: Mapping[str, Tensor], fn) -> Tensor:
    if len(group.members) == 1 and group.members[0].slot is None:
        return fn(_weight(tensors, group.members[0].conv))
    total = None
    for m in group.members:
        s = fn(_weight(tensors, m.conv))
        if total is None:
            total = s.new_zeros(group.size)
        total.index_add_(0, m.slot.to(s.device), s)
    return total / group.slot_count.to(total.device)


def _weight(tensors: Mapping[str, Tensor], conv: str) -> Tensor:
    name = f"{conv}.weight"
    if name not in tensors:
        raise ValueError(f"score: no tensor named {name!r} given")
    return tensors[name].detach().float()


def score(groups: GroupSet, tensors: Mapping[str, Tensor], criterion: str = "l2") -> dict[str, Tensor]:
    """Score every slot of every group from the conv weights in `tensors` (name -> tensor, e.g.
    `dict(model.named_parameters())` or full fp32 weights gathered under ZeRO). Returns CPU fp32
    vectors keyed by group name; computed where the weights live, one copy back at the end."""
    if criterion not in _FUNCS:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    fn = _FUNCS[criterion]
    with torch.no_grad():
        out = {g.name: _group_score(g, tensors, fn) for g in groups}
    return {k: v.cpu() for k, v in out.items()}  # sync point when the weights are on a GPU
