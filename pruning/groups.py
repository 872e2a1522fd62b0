"""Channel groups: which (conv, output channel) slots are kept or removed together.

Derived from the dataflow that each model family declares (`model.softprune_meta`) or that
pruning/trace.py reads off the model's fx graph, never from parameter indices. A group has `size`
slots; each member conv maps its output channels onto slots (`Member.slot`, None when channel i
is slot i). Policies:

- `sfp`: every conv except projection-downsample convs is its own group (CIFAR option-A models
  have none, so every conv). Stream producers stay full width at compaction (scatter).
- `coupled`: inner convs are their own groups; all producers of a residual stream share one group
  whose slots are the stream's channels. Option-A shortcuts copy a parent stream's channel into a
  child stream's channel, so linked streams form one group and linked channels one slot.
- `pfec`: only inner convs (outputs not tied to a shortcut).

Under every policy a group also carries the *followers* of the channels it narrows (depthwise
convs, squeeze-excite excitations, BatchNorms on streams or concats; see models/meta.py): they are
masked and cut with the group but never scored. A follower of a concat belongs to one group per
part, each holding the follower's `rows` of that part. A group that would narrow a frozen source
(one a grouped conv reads) is dropped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .config import POLICIES


@dataclass(frozen=True)
class Member:
    """One conv (and the BN after it) whose output channels belong to a group. A follower is
    masked with the group but not scored; one that is a BatchNorm alone has `conv == bn`."""

    conv: str
    bn: str | None
    channels: int
    has_bias: bool
    slot: Tensor | None = None  # the slot of each output channel (of each of `rows`)
    rows: Tensor | None = None  # follower of a concat: the channels this group holds (None: all)
    follower: bool = False


@dataclass(frozen=True)
class Group:
    """Slots kept or removed together. `rate` (from a preset) is this group's own goal rate."""

    name: str
    size: int
    members: tuple[Member, ...]
    streams: tuple[str, ...] = ()  # residual streams this group narrows (coupled policy)
    stream_slot: dict[str, Tensor] = field(default_factory=dict)  # stream -> slot per channel
    rate: float | None = None
    slot_count: Tensor | None = None  # members per slot, for averaging scores (None: 1 each)


class GroupSet:
    """The groups of one model under one policy, in forward order."""

    def __init__(self, model_name: str, policy: str, groups: Sequence[Group]) -> None:
        self.model_name = model_name
        self.policy = policy
        self.groups: list[Group] = list(groups)
        self.by_name = {g.name: g for g in self.groups}
        self.member_of: dict[str, tuple[Group, Member]] = {}
        for g in self.groups:
            for m in g.members:
                self.member_of.setdefault(m.conv, (g, m))
        assert len(self.by_name) == len(self.groups), "group names must be unique"

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, name: str) -> Group:
        return self.by_name[name]

    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def sizes(self) -> list[int]:
        return [g.size for g in self.groups]

    def convs(self) -> list[str]:
        """Every conv some group scores (followers excluded), in forward order."""
        return [c for c, (_, m) in self.member_of.items() if not m.follower]

    def param_names(self, hard: bool = True) -> list[str]:
        """Every parameter masking touches: conv weights (and biases); with `hard`, the BN weight
        and bias too. The orchestrator gathers exactly these under ZeRO."""
        names = []
        for conv in self.member_of:
            names += tensor_names(self.member_of[conv][1], hard)
        return names


def tensor_names(member: Member, hard: bool) -> list[str]:
    if member.conv == member.bn:  # a BatchNorm follower: only hard masks touch it
        return [f"{member.bn}.weight", f"{member.bn}.bias"] if hard else []
    names = [f"{member.conv}.weight"] + ([f"{member.conv}.bias"] if member.has_bias else [])
    if hard and member.bn is not None:
        names += [f"{member.bn}.weight", f"{member.bn}.bias"]
    return names


def build_groups(model: nn.Module, policy: str = "sfp", include: Sequence[str] = (),
                 exclude: Sequence[str] = (), preset: str | None = None,
                 example_inputs=None) -> GroupSet:
    """Derive the channel groups of `model` under `policy`, filtered by fnmatch patterns on conv
    names (a group is dropped if any of its convs matches `exclude`; with `include`, kept only if
    one matches) or restricted to a PFEC `preset` (which also fixes each group's rate).

    The dataflow is the model's declared `softprune_meta`, else traced from `example_inputs`
    (see pruning/trace.py); with both, the declared meta is checked against the trace."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    meta = model_meta(model, example_inputs)
    modules = dict(model.named_modules())
    groups = _policy_groups(meta, modules, policy)
    if preset is not None:
        if policy != "pfec":
            raise ValueError(f"preset {preset!r} is a PFEC configuration: use policy='pfec', not {policy!r}")
        groups = _apply_preset(meta, groups, policy, preset)
    groups = [g for g in groups if _selected(g, include, exclude) and not _narrows(meta, g)]
    return GroupSet(meta.name, policy, _with_followers(meta, modules, groups))


def model_meta(model: nn.Module, example_inputs=None):
    """The declared `softprune_meta` (checked against a trace when `example_inputs` is given),
    else the traced one."""
    from .trace import compare_meta, trace_meta

    meta = getattr(model, "softprune_meta", None)
    if example_inputs is None:
        if meta is None:
            raise ValueError(f"{type(model).__name__} has no softprune_meta: pass example_inputs "
                             "(e.g. torch.zeros(1, 3, 32, 32)) so that its dataflow can be traced")
        return meta
    traced = trace_meta(model, example_inputs)
    if meta is None:
        return traced
    diff = compare_meta(meta, traced)
    if diff is not None:
        raise ValueError(f"{type(model).__name__}.softprune_meta disagrees with the traced model: {diff}")
    return meta


def _member(meta, modules, conv: str, slot: Tensor | None = None) -> Member:
    mod = modules[conv]
    if getattr(mod, "groups", 1) != 1:
        raise ValueError(f"{conv}: grouped convolutions are not supported")
    return Member(conv, meta.bn[conv], mod.out_channels, mod.bias is not None, slot)


def _frozen(meta) -> set[str]:
    """The frozen sources, concats expanded into their parts."""
    out, todo = set(), list(meta.frozen)
    while todo:
        src = todo.pop()
        out.add(src)
        todo += meta.concats[src].parts if src in meta.concats else []
    return out


def _narrows(meta, g: Group) -> bool:
    frozen = _frozen(meta) if meta.frozen else set()
    return any(m.conv in frozen for m in g.members) or any(s in frozen for s in g.streams)


def _with_followers(meta, modules, groups: list[Group]) -> list[Group]:
    """Each group with the followers of the channels it narrows appended to its members."""
    if not meta.follow:
        return groups
    owner: dict[str, tuple[str, Tensor | None, int]] = {}  # source -> (group, slot, width)
    for g in groups:
        for s, slot in g.stream_slot.items():
            owner[s] = (g.name, slot, len(slot))
        for m in g.members:
            if m.conv not in meta.stream_of:
                owner[m.conv] = (g.name, m.slot, m.channels)
    extra: dict[str, list[Member]] = {}
    for follower, source in meta.follow.items():
        mod = modules[follower]
        width = _out_width(mod)
        for group, slot, rows in _pieces(meta, owner, source, 0):
            whole = rows is not None and len(rows) == width
            extra.setdefault(group, []).append(Member(
                follower, meta.bn.get(follower, follower if _is_bn(mod) else None), width,
                getattr(mod, "bias", None) is not None and not _is_bn(mod), slot,
                None if whole else rows, follower=True))
    return [replace(g, members=g.members + tuple(extra.get(g.name, ()))) for g in groups]


def _pieces(meta, owner, source: str, offset: int) -> list[tuple[str, Tensor | None, Tensor]]:
    """(group, slot per row, rows) for the channels of `source` placed at `offset`."""
    if source in meta.concats:
        out, at = [], offset
        for part, width in zip(meta.concats[source].parts, meta.concats[source].widths):
            out += _pieces(meta, owner, part, at)
            at += width
        return out
    if source not in owner:
        return []
    group, slot, width = owner[source]
    return [(group, slot, torch.arange(offset, offset + width))]


def _is_bn(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d))


def _out_width(mod: nn.Module) -> int:
    if _is_bn(mod):
        return mod.num_features
    return mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features


def _conv_group(meta, modules, conv: str) -> Group:
    m = _member(meta, modules, conv)
    return Group(conv, m.channels, (m,))


def _policy_groups(meta, modules, policy: str) -> list[Group]:
    downsample = {b.downsample for b in meta.blocks if b.downsample}
    if policy == "sfp":
        return [_conv_group(meta, modules, c) for c in meta.convs if c not in downsample]
    inner = [_conv_group(meta, modules, c) for c in meta.convs if c not in meta.stream_of]
    if policy == "pfec":
        return inner
    return _order(meta, inner + _stream_groups(meta, modules))


def _order(meta, groups: list[Group]) -> list[Group]:
    """Forward order: by the first conv of each group."""
    pos = {c: i for i, c in enumerate(meta.convs)}
    return sorted(groups, key=lambda g: min(pos[m.conv] for m in g.members))


def _stream_components(meta) -> list[list[str]]:
    """Streams linked by option-A parents, each component in declaration order."""
    root = {s: s for s in meta.streams}

    def find(s: str) -> str:
        while root[s] != s:
            s = root[s]
        return s

    for s, sm in meta.streams.items():
        if sm.parent is not None:
            root[find(s)] = find(sm.parent)
    comps: dict[str, list[str]] = {}
    for s in meta.streams:
        comps.setdefault(find(s), []).append(s)
    return list(comps.values())


def _stream_groups(meta, modules) -> list[Group]:
    groups = []
    for streams in _stream_components(meta):
        slots = _stream_slots(meta, streams)
        size = 1 + max(int(t.max()) for t in slots.values())
        members = tuple(_member(meta, modules, c, slots[meta.stream_of[c]])
                        for s in streams for c in meta.streams[s].producers)
        count = torch.zeros(size, dtype=torch.float32)
        for m in members:
            count.index_add_(0, m.slot, torch.ones(m.channels))
        assert bool((count > 0).all()), "every stream slot has a producer"
        groups.append(Group("stream:" + "+".join(streams), size, members, tuple(streams), slots,
                            slot_count=count))
    return groups


def _stream_slots(meta, streams: list[str]) -> dict[str, Tensor]:
    """Union channels linked by parent maps; children first, so the widest (last) stream's
    channel c is slot c in the CIFAR ResNets."""
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for s in streams:
        sm = meta.streams[s]
        for p, c in sm.parent_map if sm.parent in streams else ():
            a, b = find((sm.parent, p)), find((s, c))
            if a != b:
                parent[a] = b
    ids: dict[tuple[str, int], int] = {}
    slots = {}
    for s in reversed(streams):
        width = meta.streams[s].width
        slots[s] = torch.tensor([ids.setdefault(find((s, c)), len(ids)) for c in range(width)],
                                dtype=torch.long)
    return slots


def _selected(group: Group, include: Sequence[str], exclude: Sequence[str]) -> bool:
    convs = [m.conv for m in group.members]
    if any(fnmatch.fnmatchcase(c, p) for c in convs for p in exclude):
        return False
    return not include or any(fnmatch.fnmatchcase(c, p) for c in convs for p in include)


def _apply_preset(meta, groups: list[Group], policy: str, preset: str) -> list[Group]:
    from .presets import preset_rates

    rates = preset_rates(preset, meta)
    by_conv = {g.members[0].conv: g for g in groups if len(g.members) == 1}
    missing = [c for c in rates if c not in by_conv]
    if missing:
        raise ValueError(f"preset {preset!r} prunes {missing[0]}, which policy {policy!r} does not mask")
    # The public PFEC code keeps int(N * (1 - P)) filters; express that count as the group's rate
    # so that select's floor(N * rate) removes exactly as many.
    return [Group(g.name, g.size, g.members, rate=(g.size - int(g.size * (1 - rates[c]))) / g.size)
            for c, g in by_conv.items() if c in rates]
