"""The channel plan of a masked model: which output channels every conv keeps, which input
channels every reader keeps, how narrowed producers map into their streams. Shared by
`masked_cost` (count without building) and `compact` (build), so the two cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .groups import GroupSet
from .masks import MaskSet, conv_keep


@dataclass
class Plan:
    out_keep: dict[str, Tensor]  # conv or follower -> kept output channels (original indices)
    in_keep: dict[str, Tensor | None]  # conv or linear reader -> kept input channels, None = all
    in_width: dict[str, int]  # reader -> its original input width
    stream_keep: dict[str, Tensor]  # stream -> kept channels
    scatter: dict[str, Tensor] = field(default_factory=dict)  # producer -> positions in its stream
    shortcut_a: dict[str, dict] = field(default_factory=dict)  # block -> {"src": [...], "dst": [...]}


def _idx(keep: Tensor) -> Tensor:
    return torch.nonzero(keep.cpu(), as_tuple=False).flatten()


def readers_of(meta) -> dict[str, str | None]:
    """Reader module -> what it reads: an inner conv, a stream or concat name, or None (the image)."""
    source: dict[str, str | None] = {meta.first_conv: None}
    for conv, readers in meta.consumers.items():
        for r in readers:
            source[r] = conv
    for name, s in [*meta.streams.items(), *meta.concats.items()]:
        for r in s.consumers:
            source[r] = name
    return source


def source_keep(meta, out_keep: dict[str, Tensor], stream_keep: dict[str, Tensor], source: str) -> Tensor:
    """The kept channels of a source: an inner conv's, a stream's, or a concat's parts' in order."""
    if source in meta.concats:
        c = meta.concats[source]
        offsets = torch.tensor([0, *c.widths]).cumsum(0).tolist()
        return torch.cat([source_keep(meta, out_keep, stream_keep, p) + o for p, o in zip(c.parts, offsets)])
    return stream_keep[source] if source in stream_keep else out_keep[source]


def make_plan(model: nn.Module, groups: GroupSet, masks: MaskSet) -> Plan:
    meta = model.softprune_meta
    masks.check(groups)
    modules = dict(model.named_modules())
    keep = conv_keep(groups, masks)
    out_keep = {c: _idx(keep[c]) if c in keep else torch.arange(modules[c].out_channels)
                for c in [*meta.convs, *meta.fixed]}
    stream_keep = {s: torch.arange(sm.width) for s, sm in meta.streams.items()}
    for g in groups:
        for s, slot in g.stream_slot.items():
            stream_keep[s] = _idx(masks.keep[g.name][slot])
    for follower, src in meta.follow.items():
        out_keep[follower] = source_keep(meta, out_keep, stream_keep, src)
    plan = Plan(out_keep, {}, {}, stream_keep)
    for reader, src in readers_of(meta).items():
        width = _in_width(modules[reader])
        kept = None if src is None else source_keep(meta, out_keep, stream_keep, src)
        plan.in_keep[reader] = None if kept is None or len(kept) == width else kept
        plan.in_width[reader] = width
    for conv, stream in meta.stream_of.items():
        if not torch.equal(out_keep[conv], stream_keep[stream]):
            pos = torch.searchsorted(stream_keep[stream], out_keep[conv])
            assert torch.equal(stream_keep[stream][pos.clamp_max(len(stream_keep[stream]) - 1)],
                               out_keep[conv]), f"{conv} keeps channels its stream drops"
            plan.scatter[conv] = pos
    _shortcuts(meta, plan)
    return plan


def _in_width(mod: nn.Module) -> int:
    return mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features


def _shortcuts(meta, plan: Plan) -> None:
    for block in meta.blocks:
        if block.shortcut != "option_a":
            continue
        sm = meta.streams[block.stream_out]
        parent, child = plan.stream_keep[block.stream_in], plan.stream_keep[block.stream_out]
        if len(parent) == meta.streams[block.stream_in].width and len(child) == sm.width:
            continue  # neither stream narrowed: the dense default shortcut
        ppos = {int(c): i for i, c in enumerate(parent)}
        cpos = {int(c): i for i, c in enumerate(child)}
        pairs = [(ppos[p], cpos[c]) for p, c in sm.parent_map if p in ppos and c in cpos]
        plan.shortcut_a[block.name] = {"src": [p for p, _ in pairs], "dst": [c for _, c in pairs]}
