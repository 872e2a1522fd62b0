"""Optimizer state through compaction: every moment follows its parameter.

A compacted model's parameter is its dense parameter cut at the kept channels
(`compaction_index`); SGD's momentum buffer and Adam's first and second moments are tensors of
the parameter's shape whose entries belong to the same weights, so they are cut by the same
selections. A parameter compaction computes otherwise (faithful mode's folded biases) has no
history that fits it and starts from zero moments. Pure: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .compact import Index, select_kept


def slice_moments(moments: Mapping[str, Mapping[str, Tensor]], index: Mapping[str, Index | None],
                  shapes: Mapping[str, torch.Size]) -> dict[str, dict[str, Tensor]]:
    """The moments of the compacted model's parameters (`shapes`: name -> shape).

    `moments`: dense parameter name -> {moment name: tensor}, as a gathered optimizer state holds
    them; `index`: `compaction_index` of the compaction. A parameter gets every moment name the
    dense state has: cut by its selections, or zeros where its index is None or absent or the
    dense state has no such moment for it. Raises ValueError naming the parameter when a cut
    moment does not have the compacted parameter's shape (an index of another compaction)."""
    keys = sorted({key for per in moments.values() for key in per})
    out: dict[str, dict[str, Tensor]] = {}
    for name, shape in shapes.items():
        selection, old = index.get(name), moments.get(name, {})
        out[name] = {}
        for key in keys:
            if selection is None or key not in old:
                out[name][key] = torch.zeros(shape, dtype=torch.float32)
                continue
            value = select_kept(old[key], selection)
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"slice_moments: {name}.{key} cut to {tuple(value.shape)}, the compacted "
                                 f"parameter is {tuple(shape)}")
            out[name][key] = value.clone()
    return out
