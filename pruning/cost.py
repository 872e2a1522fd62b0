"""Parameters and MACs of the compacted model, predicted from the masks without building it.

Counts the same things as `count_flops` on the compacted model (conv and linear MACs at batch 1,
all parameters), from each layer's kept input/output channels and its output size. Output sizes
come from one forward pass of an empty-weight copy of the model on PyTorch's `meta` device (no
arithmetic, no memory), cached per architecture and input size: this works for a module whose
parameters are partitioned (ZeRO-3) as long as its layers' shapes are intact.
"""

from __future__ import annotations

import functools
import json

import torch
from torch import nn
from torch.func import functional_call

from models import arch_spec, build_from_spec

from .macs import Counts, hw
from .groups import GroupSet
from .masks import MaskSet
from .channel_plan import make_plan


@functools.lru_cache(maxsize=32)
def _layer_shapes(spec_json: str, size: tuple[int, int]) -> dict[str, tuple]:
    """name -> (kind, output spatial elements, weight shape, bias?) of every conv and linear."""
    with torch.device("meta"):
        model = build_from_spec(json.loads(spec_json)).eval()
    return _shapes(model, size, {})


def _shapes(model: nn.Module, size: tuple[int, int], state: dict) -> dict[str, tuple]:
    """One meta-device forward of `model` (with `state` swapped in) recording layer shapes."""
    shapes: dict[str, tuple] = {}

    def hook(name):
        def record(mod, args, out):
            spatial = out.shape[2:].numel() if isinstance(mod, nn.Conv2d) else out.shape[:-1].numel()
            shapes[name] = (type(mod).__name__, int(spatial), tuple(mod.weight.shape), mod.bias is not None)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            functional_call(model, state, (torch.zeros(1, 3, *size, device="meta"),))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _traced_shapes(model: nn.Module, size: tuple[int, int]) -> dict[str, tuple]:
    """A traced model is not in the registry: run the model itself, its tensors swapped for
    empty ones on the meta device (running statistics stay untouched)."""
    state = {n: torch.empty_like(t, device="meta") for n, t in
             [*model.named_parameters(), *model.named_buffers()]}
    return _shapes(model, size, state)


def masked_cost(model: nn.Module, groups: GroupSet, masks: MaskSet, input_size=None,
                mode: str = "hard") -> Counts:
    """Counts of `compact(model, groups, masks, mode)` at `input_size` (default: the model's).
    `mode="faithful"` adds the one-channel constant convolutions that padded convs gain."""
    if mode not in ("hard", "faithful"):
        raise ValueError(f"mode must be 'hard' or 'faithful', got {mode!r}")
    meta = model.softprune_meta
    size = hw(input_size or meta.input_size)
    if meta.family == "traced":
        shapes = _traced_shapes(model, size)
    else:
        shapes = _layer_shapes(json.dumps(arch_spec(model), sort_keys=True), size)
    plan = make_plan(model, groups, masks)
    modules = dict(model.named_modules())
    conv_macs = linear_macs = 0
    removed_params = 0
    for name, (kind, spatial, wshape, has_bias) in shapes.items():
        cout = len(plan.out_keep[name]) if name in plan.out_keep else wshape[0]
        in_keep = plan.in_keep.get(name)
        cin = wshape[1] if in_keep is None else len(in_keep)
        per_out = cin * (wshape[2] * wshape[3] if kind == "Conv2d" else 1)
        macs = spatial * cout * per_out
        if kind == "Conv2d":
            conv_macs += macs
            if mode == "faithful" and in_keep is not None and any(modules[name].padding):
                conv_macs += spatial * cout * wshape[2] * wshape[3]  # const_kernel response
        else:
            linear_macs += macs
        new = cout * per_out + (cout if has_bias else 0)
        old = wshape[0] * (wshape[1] * (wshape[2] * wshape[3] if kind == "Conv2d" else 1)) + (
            wshape[0] if has_bias else 0)
        removed_params += old - new
    for conv, bn in meta.bn.items():
        removed_params += 2 * (modules[conv].out_channels - len(plan.out_keep[conv]))
    for follower in meta.follow:  # a BatchNorm on a stream or concat
        if follower not in meta.bn and isinstance(modules[follower], (nn.BatchNorm1d, nn.BatchNorm2d)):
            removed_params += 2 * (modules[follower].num_features - len(plan.out_keep[follower]))
    # ds_numel: a ZeRO-3 partitioned parameter reports its full size there, not in numel().
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) - removed_params
    return Counts(params, conv_macs + linear_macs, conv_macs, linear_macs)
