"""The compacted copy of a traced model (one the registry cannot rebuild from a spec).

Its own fx graph is reused: every conv, BN and linear is replaced by a narrowed one, an option-A
`ShortcutA` by one with the kept channel map, and a `Scatter` is inserted after each narrowed
stream producer's BN (`sfp`), so the stream it adds into keeps its full width. Module names, and so
state-dict keys, stay the original model's.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn

from models.layers import Conv2d, Scatter, ShortcutA

from .channel_plan import Plan
from .macs import hw
from .trace import graph_module, shortcut_modules


def rebuild(model: nn.Module, spec: dict, device, sd: dict[str, Tensor], values: dict[str, Tensor],
            extras: dict[str, Tensor], plan: Plan, scatter_bias: dict[str, Tensor]) -> fx.GraphModule:
    meta = model.softprune_meta
    gm = graph_module(model)  # its leaves are `model`'s own: every one is replaced below
    modules = dict(model.named_modules())
    shortcut_of = _shortcut_blocks(model, plan)
    conv_of_bn = {bn: conv for conv, bn in meta.bn.items()}
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name in targets:
        mod = modules[name]
        if name in shortcut_of:
            new = _shortcut(meta, plan, shortcut_of[name], mod)
        elif isinstance(mod, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            new = _narrowed(name, mod, spec, plan, conv_of_bn.get(name))
        else:
            new = copy.deepcopy(mod)
        _set(gm, name, new.to_empty(device=device) if _on_meta(new) else new.to(device))
    for conv, pos in plan.scatter.items():
        _insert_scatter(gm, meta.bn[conv], spec["scatter"][conv], pos, scatter_bias.get(conv), extras, device)
    gm.recompile()
    for mod in gm.modules():
        if isinstance(mod, ShortcutA):
            mod.reset_index()
    from .compact import load_values

    return load_values(gm, sd, values, extras)


def _on_meta(mod: nn.Module) -> bool:
    return any(t.is_meta for t in [*mod.parameters(), *mod.buffers()])


def _set(gm: fx.GraphModule, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, mod)


def _narrowed(name: str, mod: nn.Module, spec: dict, plan: Plan, bn_of: str | None) -> nn.Module:
    """A shape-only copy on the meta device (its values are loaded afterwards)."""
    in_keep = plan.in_keep.get(name)
    channels = spec["channels"]
    with torch.device("meta"):
        if isinstance(mod, nn.Conv2d):
            cin = mod.in_channels if in_keep is None else len(in_keep)
            cout, groups = channels.get(name, mod.out_channels), mod.groups
            if groups > 1 and groups == mod.in_channels == mod.out_channels:  # depthwise: cut with its input
                cin = groups = cout
            return Conv2d(cin, cout, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
                          mod.bias is not None, mod.padding_mode,
                          const_input=name in spec.get("const_input", ()))
        if isinstance(mod, nn.Linear):
            cin = mod.in_features if in_keep is None else len(in_keep)
            return nn.Linear(cin, channels.get(name, mod.out_features), mod.bias is not None)
        n = channels.get(bn_of or name, mod.num_features)
        return type(mod)(n, mod.eps, mod.momentum, mod.affine, mod.track_running_stats)


def _shortcut_blocks(model: nn.Module, plan: Plan) -> dict[str, str]:
    """ShortcutA module -> its block, for the option-A shortcuts the plan narrows."""
    if not plan.shortcut_a:
        return {}
    meta = model.softprune_meta
    p = next(model.parameters())
    x = torch.zeros(1, 3, *hw(meta.input_size), dtype=p.dtype, device=p.device)
    found = {}
    for block, module in shortcut_modules(model, x).items():
        if block in plan.shortcut_a:
            if module is None:
                raise ValueError(f"compact: block {block}'s option-A shortcut is not a ShortcutA "
                                 "module (e.g. F.pad); narrowing it is not supported yet")
            found[module] = block
    return found


def _shortcut(meta, plan: Plan, block: str, mod: ShortcutA) -> ShortcutA:
    entry = plan.shortcut_a[block]
    out = next(b.stream_out for b in meta.blocks if b.name == block)
    return ShortcutA(entry["src"], entry["dst"], len(plan.stream_keep[out]), mod.stride)


def _insert_scatter(gm: fx.GraphModule, bn: str, entry: dict, pos: Tensor, bias, extras, device) -> None:
    name = f"{bn}_scatter"
    _set(gm, name, Scatter(entry["index"], entry["width"], bias=entry["bias"]).to(device))
    extras[f"{name}.index"] = pos
    if entry["bias"]:
        extras[f"{name}.bias"] = bias
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == bn)
    with gm.graph.inserting_after(node):
        scatter = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(scatter, delete_user_cb=lambda user: user is not scatter)
