"""Compaction: a physically smaller model rebuilt through the model registry, plus its spec.

`hard` reproduces the hard-masked model (pruned channels output exactly 0, so removing them is
exact). `faithful` reproduces the soft-masked model, where a pruned channel still emits its BN
constant (and, in a narrowed residual stream, the constant that flows along it): each constant is
folded into what consumes it. Stream producers under `sfp` carry it in their Scatter's bias; a
1x1 unpadded conv sees a uniform shift, folded into its BN's running_mean; a linear layer into its
bias; a padded kxk conv, where zero padding makes the contribution position-dependent near the
borders, into `Conv2d.const_kernel` (exact at every border and input size). The constants are
read from one forward pass of the soft-masked model on a small zero image: a pruned channel is
constant in space and independent of the input, so any position and any input give its value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from models import ShortcutA, arch_spec, build_from_spec

from .apply import masked_tensors
from .macs import hw
from .groups import GroupSet
from .masks import MaskSet
from .channel_plan import Plan, make_plan

MODES = ("hard", "faithful")
_RECORD_MAX = 64  # constants do not depend on the input size: record them on a small image


def compact(model: nn.Module, groups: GroupSet, masks: MaskSet, mode: str = "hard",
            input_size: int | tuple[int, int] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the compacted model and its spec (`build_from_spec(spec)` rebuilds its shape). The
    spec also records `kept`: for every conv of `model`, by module name, the output channels (of
    `model`) that survive; plus `input_size`, `compact_mode` and `policy`. `model` is not changed
    and need not be masked already: kept channels are copied as they are."""
    if mode not in MODES:
        raise ValueError(f"compact mode must be one of {MODES}, got {mode!r}")
    dense = arch_spec(model)
    if dense.get("scatter") or dense.get("const_input"):
        raise ValueError("compact: the model is already compacted (it has scatters or constant "
                         "kernels); compact the original model instead")
    meta = model.softprune_meta
    size = input_size or meta.input_size
    plan = make_plan(model, groups, masks)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    values = _sliced(meta, sd, plan)
    extras: dict[str, Tensor] = {}
    const_input: list[str] = []
    biases: dict[str, Tensor] = {}
    if mode == "faithful":
        rec = _record_constants(model, groups, masks, plan, size)
        const_input = _fold(meta, dict(model.named_modules()), sd, plan, rec, values, extras)
        biases = _scatter_biases(meta, plan, rec)
    spec = _shape_spec(dense, meta, plan, const_input, scatter_bias=mode == "faithful")
    device = next(model.parameters()).device
    if meta.family == "traced":  # not a registry model: rebuilt from its own fx graph
        from .fx_rebuild import rebuild

        new = rebuild(model, spec, device, sd, values, extras, plan, biases)
        out_spec = {k: v for k, v in spec.items() if v or k in ("model", "num_classes", "channels")}
    else:
        new = _materialise(spec, device, sd, values, extras, plan, biases)
        out_spec = arch_spec(new)
    new.train(model.training)
    out_spec.update(input_size=size, compact_mode=mode, policy=groups.policy,
                    kept={c: plan.out_keep[c].tolist() for c in meta.convs})
    return new, out_spec


Index = tuple[tuple[int, Tensor], ...]  # (dim, kept original indices) selections, applied in order


def tensor_index(meta, plan: Plan) -> dict[str, Index]:
    """The selections that cut each tensor compaction narrows out of its dense value: conv weights
    (dim 0 kept output channels, dim 1 kept input channels), conv biases and BN vectors and
    statistics (dim 0), linear weights (dim 1 kept input features). Names absent are taken whole.
    Conv bias names are listed whether or not the conv has a bias."""
    index: dict[str, Index] = {}
    for conv in [*meta.convs, *meta.follow]:  # a follower: a depthwise conv, an excitation, a BN
        keep, in_keep = plan.out_keep[conv], plan.in_keep.get(conv)
        for name in (conv, meta.bn.get(conv, conv)):
            for field in ("weight", "bias", "running_mean", "running_var"):
                index[f"{name}.{field}"] = ((0, keep),)
        if in_keep is not None:
            index[f"{conv}.weight"] = ((0, keep), (1, in_keep))
    for reader, in_keep in plan.in_keep.items():
        if f"{reader}.weight" not in index and in_keep is not None:  # a linear layer or a fixed conv
            index[f"{reader}.weight"] = ((1, in_keep),)
    return index


def select_kept(t: Tensor, index: Index) -> Tensor:
    """`t` cut by `index` (the selections of `tensor_index`)."""
    for dim, keep in index:
        t = t.index_select(dim, keep.to(t.device))
    return t


def compaction_index(model: nn.Module, groups: GroupSet, masks: MaskSet,
                     mode: str = "hard") -> dict[str, Index | None]:
    """For every parameter of the model `compact(model, groups, masks, mode)` builds (its names are
    the dense model's): the selections that cut it out of the dense parameter (() = taken whole),
    or None where compaction computes it otherwise (faithful mode folds removed inputs' constants
    into a linear reader's bias, see `_fold`). What follows the weights through compaction, such
    as optimizer moments, is cut by the same selections."""
    meta, modules = model.softprune_meta, dict(model.named_modules())
    plan = make_plan(model, groups, masks)
    index = tensor_index(meta, plan)
    folded = {f"{r}.bias" for r, k in plan.in_keep.items() if mode == "faithful" and k is not None
              and (isinstance(modules[r], nn.Linear) or (r not in meta.bn and not any(modules[r].padding)))}
    return {name: None if name in folded else index.get(name, ()) for name, _ in model.named_parameters()}


def _sliced(meta, sd: dict[str, Tensor], plan: Plan) -> dict[str, Tensor]:
    return {name: select_kept(sd[name], index) for name, index in tensor_index(meta, plan).items() if name in sd}


def _shape_spec(dense: dict, meta, plan: Plan, const_input: list[str], scatter_bias: bool) -> dict:
    spec = {k: dense[k] for k in ("model", "num_classes")}
    spec["channels"] = {c: len(k) for c, k in plan.out_keep.items()}
    spec["scatter"] = {}
    for conv, pos in plan.scatter.items():
        width = len(plan.stream_keep[meta.stream_of[conv]])
        spec["scatter"][conv] = {"index": pos.tolist(), "width": width,
                                 "bias": scatter_bias and len(pos) < width}
    spec["const_input"] = const_input
    spec["shortcut_a"] = plan.shortcut_a
    return spec


def _complement(keep: Tensor, width: int) -> Tensor:
    mask = torch.ones(width, dtype=torch.bool)
    mask[keep] = False
    return torch.nonzero(mask).flatten()


def _record_constants(model, groups, masks, plan: Plan, size) -> dict[str, Tensor]:
    """Per reader with removed inputs: its input at one position (each removed channel is a
    constant there); per scattering producer's BN: its output at one position."""
    meta = model.softprune_meta
    h, w = hw(size)
    readers = {r for r, k in plan.in_keep.items() if k is not None}
    bns = {meta.bn[c] for c in plan.scatter}
    rec: dict[str, Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if name in readers:
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, n=name: rec.__setitem__(n, _at_origin(args[0]))))
        if name in bns:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, n=name: rec.__setitem__(n, _at_origin(out))))
    params = dict(model.named_parameters())
    state = {**params, **dict(model.named_buffers()), **masked_tensors(groups, masks, params)}
    was_training = model.training
    model.eval()
    try:
        p = next(iter(params.values()))
        x = torch.zeros(1, 3, min(h, _RECORD_MAX), min(w, _RECORD_MAX), dtype=p.dtype, device=p.device)
        with torch.no_grad():
            functional_call(model, state, (x,))
    finally:
        model.train(was_training)
        for hd in handles:
            hd.remove()
    return {k: v.detach().cpu() for k, v in rec.items()}


def _at_origin(x: Tensor) -> Tensor:
    # A copy, not a view: the model may change the tensor in place later (`out += identity`).
    return (x[0, :, 0, 0] if x.dim() == 4 else x[0]).clone()


def _fold(meta, modules, sd, plan: Plan, rec, values, extras) -> list[str]:
    """Fold removed constant inputs into each reader; returns the convs that need a const_kernel."""
    const_input = []
    for reader, in_keep in plan.in_keep.items():
        if in_keep is None:
            continue
        gone = _complement(in_keep, plan.in_width[reader])
        v = rec[reader].index_select(0, gone).to(sd[f"{reader}.weight"].dtype)
        mod = modules[reader]
        if isinstance(mod, nn.Linear):
            if mod.bias is None:
                raise ValueError(f"faithful compaction: {reader} has no bias to absorb constants")
            values[f"{reader}.bias"] = sd[f"{reader}.bias"] + sd[f"{reader}.weight"].index_select(1, gone) @ v
            continue
        wp = sd[f"{reader}.weight"].index_select(0, plan.out_keep[reader]).index_select(1, gone)
        if any(mod.padding):
            extras[f"{reader}.const_kernel"] = (wp * v.view(1, -1, 1, 1)).sum(1, keepdim=True)
            const_input.append(reader)
        elif reader in meta.bn:  # a uniform shift of the conv output: BN(y + d) = BN with running_mean - d
            key = f"{meta.bn[reader]}.running_mean"
            values[key] = values[key] - wp.sum((2, 3)) @ v
        elif mod.bias is not None:  # e.g. an SE squeeze: the shift goes into its bias
            values[f"{reader}.bias"] = sd[f"{reader}.bias"] + wp.sum((2, 3)) @ v
        else:
            raise ValueError(f"faithful compaction: {reader} has neither a BatchNorm nor a bias to absorb constants")
    return const_input


def _scatter_biases(meta, plan: Plan, rec) -> dict[str, Tensor]:
    """Producer conv -> the bias of its scatter: the pruned channels' BN constants."""
    out = {}
    for conv, pos in plan.scatter.items():
        stream = plan.stream_keep[meta.stream_of[conv]]
        if len(pos) == len(stream):
            continue
        gone = _complement(pos, len(stream))  # positions in the (kept) stream
        bias = torch.zeros(len(stream), dtype=rec[meta.bn[conv]].dtype)
        bias[gone] = rec[meta.bn[conv]].index_select(0, stream[gone])
        out[conv] = bias
    return out


def empty_build(spec: dict, device: torch.device | str = "cpu") -> nn.Module:
    """`build_from_spec` without the cost of initialising weights that will be overwritten
    (ResNet-101's init is ~1 s): built on the meta device, then given uninitialised storage.
    Every persistent tensor must be loaded afterwards; non-persistent index buffers are rebuilt."""
    with torch.device("meta"):
        model = build_from_spec(spec)
    model = model.to_empty(device=device)
    for mod in model.modules():
        if isinstance(mod, ShortcutA):
            mod.reset_index()
    return model


def _materialise(spec, device, sd, values, extras, plan: Plan, scatter_bias) -> nn.Module:
    new = empty_build(spec, device)
    owner = {id(m): c for c, m in new.softprune_scatters().items()}
    for name, mod in new.named_modules():
        conv = owner.get(id(mod))
        if conv is not None:
            extras[f"{name}.index"] = plan.scatter[conv]
            if conv in scatter_bias:
                extras[f"{name}.bias"] = scatter_bias[conv]
    return load_values(new, sd, values, extras)


def load_values(new: nn.Module, sd, values, extras) -> nn.Module:
    """Load every state-dict entry of `new` from the compaction's values (extras first, then
    the sliced values, then the original state dict), strictly."""
    state = {}
    for key in new.state_dict():
        value = extras.get(key, values.get(key, sd.get(key)))
        assert value is not None, f"compact: no value for {key}"
        state[key] = value
    new.load_state_dict(state, strict=True)
    return new
