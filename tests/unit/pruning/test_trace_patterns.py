"""Tracing the patterns the zoo lacks (pruning/trace.py): depthwise and grouped convs, channel
concatenation, squeeze-excite gating and BatchNorm on a stream or concat. Each is grouped under
every policy, compacted exactly (hard and faithful), counted exactly, and scored only through the
convs that own the channels; what is still unsupported fails with one line naming the fx node."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning import (
    attach_meta,
    build_groups,
    compact,
    masked_tensors,
    score,
    trace_meta,
)
from pruning.config import POLICIES

from .helpers import assert_compacts_exactly, random_masks, randomise_bn


def _image(size: int = 16) -> torch.Tensor:
    return torch.zeros(1, 3, size, size)


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class ConvSE(nn.Module):
    """torchvision's SqueezeExcitation (convs, hardsigmoid as in MobileNetV3)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(c // 4, 2), 1)
        self.fc2 = nn.Conv2d(max(c // 4, 2), c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class LinearSE(nn.Module):
    """The SENet form: linears on pooled features, the gate viewed and expanded over x."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, max(c // 4, 2))
        self.fc2 = nn.Linear(max(c // 4, 2), c)

    def forward(self, x):
        b, c, _, _ = x.size()
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * s.view(b, c, 1, 1).expand_as(x)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand, depthwise, (SE), project; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, se: type | None = None) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _cbr(cin, hidden, 1)
        self.dw = _cbr(hidden, hidden, 3, stride, groups=hidden)
        self.se = se(hidden) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.b1 = InvertedResidual(8, 8, 2, 1)
        self.b2 = InvertedResidual(8, 12, 2, 2, ConvSE)
        self.b3 = InvertedResidual(12, 12, 2, 1, LinearSE)
        self.head = _cbr(12, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.head(self.b3(self.b2(self.b1(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseLike(nn.Module):
    """Growth layers concatenated onto their input (nested concats), a BatchNorm on the concat
    before a transition conv, an Inception-style concat read by a depthwise conv, and a flat
    concat of pooled features into the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.grow1 = _cbr(8, 4)
        self.grow2 = _cbr(12, 4)
        self.norm = nn.BatchNorm2d(16)
        self.trans = _cbr(16, 8, 1)
        self.left = _cbr(8, 6, 1)
        self.right = _cbr(8, 4, 3)
        self.dw = _cbr(10, 10, 3, groups=10)
        self.mix = _cbr(10, 8, 1)
        self.fc = nn.Linear(8 + 10, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.grow1(x)], 1)
        x = torch.cat((x, self.grow2(x)), dim=1)
        x = self.trans(F.relu(self.norm(x)))
        y = self.dw(torch.cat([self.left(x), self.right(x)], 1))
        pooled = torch.cat([self.mix(y).mean((2, 3)), y.mean((2, 3))], 1)
        return self.fc(pooled)


class NeXtBlock(nn.Module):
    """ResNeXt's bottleneck: a grouped 3x3 between two 1x1 convs, identity shortcut."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = _cbr(c, c, 1)
        self.b = _cbr(c, c, 3, groups=2)
        self.c = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.c(self.b(self.a(x))))


class NeXtLike(nn.Module):
    """Grouped convs, then a BatchNorm on the residual stream before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.block1 = NeXtBlock(8)
        self.block2 = NeXtBlock(8)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.norm(self.block2(self.block1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


PATTERNS = {"mobilenet": MobileNetLike, "dense": DenseLike, "next": NeXtLike}


def _model(which: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(PATTERNS[which](), seed=3).eval()


# -- the dataflow found -----------------------------------------------------------------------

def test_mobilenet_meta_followers_and_fixed_convs():
    meta = trace_meta(MobileNetLike(), _image())
    assert meta.follow == {
        "b1.dw.0": "b1.expand.0", "b2.dw.0": "b2.expand.0", "b2.se.fc2": "b2.expand.0",
        "b3.dw.0": "b3.expand.0", "b3.se.fc2": "b3.expand.0"}
    assert meta.fixed == ["b2.se.fc1"] and meta.frozen == []
    assert meta.bn["b2.dw.0"] == "b2.dw.1" and "b2.dw.0" not in meta.convs
    # the SE squeeze reads the depthwise output, i.e. the expand conv's channels; so does a linear one
    assert meta.consumers["b2.expand.0"] == ["b2.project.0", "b2.se.fc1"]
    assert meta.consumers["b3.expand.0"] == ["b3.project.0", "b3.se.fc1"]
    assert meta.consumers["b2.se.fc1"] == ["b2.se.fc2"]
    assert [b.convs for b in meta.blocks] == [["b1.expand.0", "b1.project.0"], ["b3.expand.0", "b3.project.0"]]


def test_concat_meta_maps_channels_back_to_their_producers():
    meta = trace_meta(DenseLike(), _image())
    cats = {n: (c.parts, c.widths) for n, c in meta.concats.items()}
    assert cats == {"cat": (["stem.0", "grow1.0"], [8, 4]), "cat_1": (["cat", "grow2.0"], [12, 4]),
                    "cat_2": (["left.0", "right.0"], [6, 4]), "cat_3": (["mix.0", "cat_2"], [8, 10])}
    assert meta.follow == {"norm": "cat_1", "dw.0": "cat_2"}
    assert sorted(meta.concats["cat"].consumers) == ["grow2.0"]
    assert meta.concats["cat_1"].consumers == ["trans.0"] and meta.concats["cat_3"].consumers == ["fc"]
    assert meta.consumers["stem.0"] == ["grow1.0"]


def test_grouped_conv_freezes_what_it_reads_and_keeps_its_channels():
    model = NeXtLike()
    meta = trace_meta(model, _image())
    assert meta.fixed == ["block1.b.0", "block2.b.0"] and meta.frozen == ["block1.a.0", "block2.a.0"]
    assert meta.follow == {"norm": "stem.0"}  # the stream, named after its first producer
    for policy in POLICIES:
        groups = build_groups(model, policy, example_inputs=_image())
        assert not {"block1.a.0", "block2.a.0", "block1.b.0"} & set(groups.convs()), policy
    assert len(build_groups(model, "pfec", example_inputs=_image())) == 0
    coupled = build_groups(model, "coupled", example_inputs=_image())
    stream = coupled["stream:stem.0"]
    assert [(m.conv, m.follower) for m in stream.members][-1] == ("norm", True)


def test_a_concat_follower_is_held_by_one_group_per_part():
    groups = build_groups(DenseLike(), "sfp", example_inputs=_image())
    held = {g.name: m for g in groups for m in g.members if m.conv == "norm"}
    assert sorted(held) == ["grow1.0", "grow2.0", "stem.0"]
    assert held["stem.0"].rows.tolist() == list(range(8))
    assert held["grow1.0"].rows.tolist() == [8, 9, 10, 11] and held["grow2.0"].rows.tolist() == [12, 13, 14, 15]
    assert all(m.follower and m.bn == "norm" for m in held.values())


def test_followers_are_masked_but_never_scored():
    model = _model("mobilenet")
    groups = build_groups(model, "sfp", example_inputs=_image())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = score(groups, params, "l2")
    for follower in ("b2.dw.0", "b2.se.fc2", "b3.se.fc2"):
        params[f"{follower}.weight"] = params[f"{follower}.weight"] * torch.linspace(0.01, 100, params[f"{follower}.weight"].shape[0]).view(-1, *[1] * (params[f"{follower}.weight"].dim() - 1))
    after = score(groups, params, "l2")
    assert all(torch.equal(before[g], after[g]) for g in before)
    assert "b2.dw.0" not in groups.convs() and "b2.dw.0" in groups.member_of
    masks = random_masks(groups, 0.5, seed=4)
    masked = masked_tensors(groups, masks, params, hard=True)
    drop = ~masks.keep["b2.expand.0"]
    assert drop.any()
    assert masked["b2.dw.0.weight"][drop].abs().sum() == 0 and masked["b2.dw.1.weight"][drop].abs().sum() == 0
    assert masked["b2.se.fc2.bias"][drop].abs().sum() == 0
    assert masked["b2.dw.0.weight"][~drop].abs().sum() > 0


# -- exact compaction ---------------------------------------------------------------------------

# NeXtLike under `pfec` has nothing to prune: its inner convs are all grouped or frozen (tested above)
CASES = [(w, p) for w in PATTERNS for p in POLICIES if (w, p) != ("next", "pfec")]


@pytest.mark.parametrize("mode", ["hard", "faithful"])
@pytest.mark.parametrize("which,policy", CASES)
def test_compaction_of_every_pattern_is_exact(which, policy, mode):
    model = _model(which)
    size = 16
    groups = build_groups(model, policy, example_inputs=_image(size))
    attach_meta(model, _image(size))
    masks = random_masks(groups, 0.4, seed=len(which) * 7 + len(policy))
    assert any(not k.all() for k in masks.keep.values())
    small, _ = compact(model, groups, masks, mode=mode)
    x = torch.randn(2, 3, size + 2, size - 1, generator=torch.Generator().manual_seed(1))
    assert_compacts_exactly(model, small, groups, masks, mode, size, x)


def test_depthwise_convs_are_cut_with_their_input():
    model = _model("mobilenet")
    groups = build_groups(model, "pfec", example_inputs=_image())
    attach_meta(model, _image())
    masks = random_masks(groups, 0.5, seed=5)
    small, _ = compact(model, groups, masks)
    kept = int(masks.keep["b2.expand.0"].sum())
    dw = small.get_submodule("b2.dw.0")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (kept, kept, kept)
    assert small.get_submodule("b2.se.fc2").out_channels == kept
    assert small.get_submodule("b2.se.fc1").in_channels == kept
    assert small.get_submodule("b3.se.fc2").out_features == int(masks.keep["b3.expand.0"].sum())


# -- what is still refused ------------------------------------------------------------------------

class _StackModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _cbr(3, 4), _cbr(3, 4)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.stack([self.a(x), self.b(x)], 1).flatten(1, 2).mean((2, 3)))


class _SpatialCat(_StackModel):
    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 2).mean((2, 3)).repeat(1, 2))


class _Attention(_StackModel):
    def forward(self, x):
        return self.fc(torch.cat([self.a(x) * self.b(x), self.a(x)], 1).mean((2, 3)))


class _BareGrowth(nn.Module):
    """DenseNet's own layer order: the new features join the concat before any BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 4)
        self.grow = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.norm(torch.cat([x, self.grow(x)], 1)).mean((2, 3)))


class _GroupedIntoStream(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 4)
        self.conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        return self.fc((x + self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("model,pattern", [
    (_StackModel, r"node 'stack' \(call_function torch.stack\): stacking tensors into a new dim is not supported"),
    (_SpatialCat, r"node 'cat' \(call_function torch.cat\): only concatenation along the channel dim \(1\)"),
    (_Attention, r"node 'mul' \(call_function operator.mul\): multiplies two feature maps: only squeeze-excite"),
    (_BareGrowth, r"node 'cat' \(call_function torch.cat\): a concatenation reads conv 'grow' before any BatchNorm"),
    (_GroupedIntoStream, r"^trace: conv 'conv.0' \(grouped or without BatchNorm\) writes into a residual stream"),
])
def test_what_is_still_unsupported_fails_with_one_line(model, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        build_groups(model(), "coupled", example_inputs=_image(8))
    assert "\n" not in str(info.value)
