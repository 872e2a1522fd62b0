"""Tracing a model's pruning dataflow (pruning/trace.py): the zoo's declared metadata is
reproduced exactly, models without metadata are grouped and compacted exactly, and what the
tracer cannot follow fails with one line naming the fx node."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from pruning import (
    PRESETS,
    attach_meta,
    build_groups,
    compact,
    trace_meta,
)
from pruning.config import POLICIES

from .helpers import assert_compacts_exactly, masked_output, random_masks, randomise_bn

ZOO = models.list_models()


def _image(size: int = 32) -> torch.Tensor:
    return torch.zeros(1, 3, size, size)


@functools.cache
def _zoo(name: str):
    """A small-headed zoo model and its traced meta (32 px: every zoo model accepts it)."""
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=7)
    return model, trace_meta(model, _image())


def _traced_twin(name: str) -> nn.Module:
    """The same model object's modules, but carrying the traced meta instead of the declared."""
    model, meta = _zoo(name)
    twin = copy.copy(model)  # shallow: shares parameters, own __dict__ for softprune_meta
    twin.__dict__ = dict(model.__dict__)
    twin.softprune_meta = meta
    return twin


def _assert_same_groups(a, b) -> None:
    assert a.names() == b.names() and a.policy == b.policy and a.model_name == b.model_name
    for ga, gb in zip(a, b):
        assert (ga.name, ga.size, ga.streams, ga.rate) == (gb.name, gb.size, gb.streams, gb.rate), ga.name
        assert len(ga.members) == len(gb.members), ga.name
        for ma, mb in zip(ga.members, gb.members):
            assert (ma.conv, ma.bn, ma.channels, ma.has_bias) == (mb.conv, mb.bn, mb.channels, mb.has_bias)
            assert (ma.slot is None) == (mb.slot is None) and (ma.slot is None or torch.equal(ma.slot, mb.slot))
        assert ga.stream_slot.keys() == gb.stream_slot.keys()
        assert all(torch.equal(ga.stream_slot[s], gb.stream_slot[s]) for s in ga.stream_slot)
        assert (ga.slot_count is None) == (gb.slot_count is None)
        assert ga.slot_count is None or torch.equal(ga.slot_count, gb.slot_count)


def _cases():
    for name in ZOO:
        for policy in POLICIES:
            yield name, policy, None
        for preset in (p.name for p in PRESETS.values() if p.model == name):
            yield name, "pfec", preset


@pytest.mark.parametrize("name,policy,preset", list(_cases()))
def test_traced_groups_equal_declared_groups(name, policy, preset):
    model, _ = _zoo(name)
    declared = build_groups(model, policy, preset=preset)
    traced = build_groups(_traced_twin(name), policy, preset=preset)
    assert traced.model_name == name and len(traced) > 0
    _assert_same_groups(declared, traced)


@pytest.mark.parametrize("name", ZOO)
def test_traced_meta_fills_what_the_zoo_fills(name):
    model, meta = _zoo(name)
    declared = model.softprune_meta
    assert meta.family == "traced" and meta.input_size == 32 and meta.num_classes == 7
    for key in ("name", "first_conv", "classifier", "convs", "bn", "stream_of", "blocks"):
        assert getattr(meta, key) == getattr(declared, key), key
    assert {k: sorted(v) for k, v in meta.consumers.items()} == {k: sorted(v) for k, v in declared.consumers.items()}
    assert list(meta.streams) == list(declared.streams)
    for s, sm in declared.streams.items():
        t = meta.streams[s]
        assert (t.width, t.parent, t.parent_map, t.producers) == (sm.width, sm.parent, sm.parent_map, sm.producers)
        assert sorted(t.consumers) == sorted(sm.consumers)


def test_declared_meta_is_checked_against_the_trace():
    model, _ = _zoo("resnet20")
    groups = build_groups(model, "coupled", example_inputs=_image())
    _assert_same_groups(groups, build_groups(model, "coupled"))
    wrong = copy.copy(model)
    wrong.__dict__ = dict(model.__dict__)
    wrong.softprune_meta = copy.deepcopy(model.softprune_meta)
    wrong.softprune_meta.bn["layer2.0.conv1"] = "layer2.0.bn2"  # a hand-made slip
    with pytest.raises(ValueError, match=r"softprune_meta disagrees with the traced model: bn: "
                                         r"declared \['layer2.0.conv1'\]='layer2.0.bn2'"):
        build_groups(wrong, "sfp", example_inputs=_image())
    wrong.softprune_meta = copy.deepcopy(model.softprune_meta)
    wrong.softprune_meta.streams["layer3"].parent_map[0] = (0, 0)
    with pytest.raises(ValueError, match=r"stream 'layer3' parent_map"):
        build_groups(wrong, "sfp", example_inputs=_image())


def test_tracing_leaves_bn_statistics_and_modes_alone():
    model = _plain_cnn().train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_meta(model, torch.randn(4, 3, 16, 16))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and not model[1].training and model[5].training


# -- models without metadata ------------------------------------------------------------------

def _plain_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(24, 32, 1), nn.BatchNorm2d(32), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32, 5))


class _Basic(nn.Module):
    """torchvision's BasicBlock: `out += identity`, a Sequential projection when shapes change."""

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class _TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(_Basic(8, 16, 1), _Basic(16, 16, 1))
        self.layer2 = nn.Sequential(_Basic(16, 24, 2), _Basic(24, 24, 1))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_tiny_resnet_meta():
    meta = trace_meta(_TinyResNet(), _image(24))
    assert (meta.name, meta.first_conv, meta.classifier, meta.num_classes, meta.input_size) == (
        "_TinyResNet", "conv1", "fc", 6, 24)
    assert list(meta.streams) == ["stem", "layer1", "layer2"]
    assert meta.streams["stem"].producers == ["conv1"]
    assert meta.streams["stem"].consumers == ["layer1.0.conv1", "layer1.0.downsample.0"]
    assert meta.streams["layer1"].producers == ["layer1.0.conv2", "layer1.0.downsample.0", "layer1.1.conv2"]
    assert meta.streams["layer2"].consumers == ["layer2.1.conv1", "fc"]
    assert [(b.name, b.stage, b.shortcut, b.downsample, b.stream_in, b.stream_out) for b in meta.blocks] == [
        ("layer1.0", 1, "downsample", "layer1.0.downsample.0", "stem", "layer1"),
        ("layer1.1", 1, "identity", None, "layer1", "layer1"),
        ("layer2.0", 2, "downsample", "layer2.0.downsample.0", "layer1", "layer2"),
        ("layer2.1", 2, "identity", None, "layer2", "layer2")]
    assert meta.consumers["layer2.0.conv1"] == ["layer2.0.conv2"]


def test_plain_cnn_meta():
    meta = trace_meta(_plain_cnn(), _image(16))
    assert meta.convs == ["0", "4", "8"] and meta.bn == {"0": "1", "4": "5", "8": "9"}
    assert meta.consumers == {"0": ["4"], "4": ["8"], "8": ["14"]}
    assert (meta.first_conv, meta.classifier, meta.streams, meta.blocks) == ("0", "14", {}, [])


def test_build_groups_without_meta_needs_example_inputs():
    with pytest.raises(ValueError, match=r"Sequential has no softprune_meta: pass example_inputs"):
        build_groups(_plain_cnn(), "sfp")
    groups = build_groups(_plain_cnn(), "sfp", example_inputs=_image(16))
    assert groups.names() == ["0", "4", "8"] and groups.sizes() == [16, 24, 32]
    assert [m.has_bias for g in groups for m in g.members] == [True, False, True]


def _traced_resnet20():
    torch.manual_seed(0)
    model = models.create_model("resnet20", num_classes=7)
    del model.softprune_meta  # as a user model would come: no metadata at all
    return model


BUILDERS = {"plain": _plain_cnn, "tiny_resnet": _TinyResNet, "resnet20": _traced_resnet20}


@pytest.mark.parametrize("mode", ["hard", "faithful"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("which", list(BUILDERS))
def test_compaction_of_a_traced_model_is_exact(which, policy, mode):
    torch.manual_seed(1)
    model = randomise_bn(BUILDERS[which](), seed=2).eval()
    size = 32
    groups = build_groups(model, policy, example_inputs=_image(size))
    attach_meta(model, _image(size))
    assert model.softprune_meta.family == "traced"
    masks = random_masks(groups, 0.4, seed=len(which) + len(policy))
    small, spec = compact(model, groups, masks, mode=mode)
    x = torch.randn(2, 3, size + 3, size - 1, generator=torch.Generator().manual_seed(1))
    assert_compacts_exactly(model, small, groups, masks, mode, size, x)
    assert set(spec["kept"]) == set(model.softprune_meta.convs) and spec["compact_mode"] == mode


# -- small patterns, and what the tracer cannot follow -----------------------------------------

class _Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.bn(self.dw(self.stem(x))).mean((2, 3)))


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


class _SE(nn.Module):
    """torchvision's SqueezeExcitation after a conv-BN-ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.body(x)
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        return self.fc(torch.flatten(self.pool(x * scale), 1))


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _plain_cnn()

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.net(x)


@pytest.mark.parametrize("model,followers", [
    (_Depthwise, {"dw": "stem.0"}),
    (_SE, {"fc2": "body.0"}),
])
def test_the_small_patterns_once_refused_are_now_followed(model, followers):
    """Depthwise and SE (tests/unit/pruning/test_trace_patterns.py tests them, and concats, in full)."""
    meta = trace_meta(model(), _image(8))
    assert meta.follow == followers
    assert len(build_groups(model(), "sfp", example_inputs=_image(8))) == len(meta.convs)


@pytest.mark.parametrize("model,pattern", [
    (_Cat, r"node 'b_0' \(call_module b.0\): a second layer reads the model input; only one conv may"),
    (_DataDependent, r"^_DataDependent cannot be traced by torch.fx \(TraceError: .*\); attach softprune_meta"),
])
def test_unsupported_models_fail_with_one_line_naming_the_node(model, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        build_groups(model(), "sfp", example_inputs=_image(8))
    assert "\n" not in str(info.value)


def test_a_conv_without_batchnorm_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"node '_2' \(call_module 2\): '2' reads conv '0' before any BatchNorm"):
        trace_meta(model, _image(8))


def test_flattening_spatial_positions_into_the_classifier_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 64, 2))
    with pytest.raises(ValueError, match=r"node '_2' \(call_module 2\): flattens 4 channels into \(256,\) features"):
        trace_meta(model, _image(8))


class _PadBlock(nn.Module):
    """The common public CIFAR ResNet's option-A shortcut: subsample, then zero-pad channels."""

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - cin) // 2 if stride != 1 else None

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return torch.relu(torch.add(out, short))


class _PadResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(_PadBlock(4, 4, 1))
        self.layer2 = nn.Sequential(_PadBlock(4, 8, 2), _PadBlock(8, 8, 1))
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.linear(x.mean((2, 3)))


def test_channel_padding_shortcut_is_an_option_a_stream():
    model = randomise_bn(_PadResNet(), seed=4).eval()
    meta = trace_meta(model, _image(16))
    assert meta.streams["layer2"].parent == "layer1"
    assert meta.streams["layer2"].parent_map == [(c, c + 2) for c in range(4)]
    assert [(b.name, b.shortcut, b.stream_in, b.stream_out) for b in meta.blocks] == [
        ("layer1.0", "identity", "layer1", "layer1"), ("layer2.0", "option_a", "layer1", "layer2"),
        ("layer2.1", "identity", "layer2", "layer2")]
    coupled = build_groups(model, "coupled", example_inputs=_image(16))
    assert coupled["stream:layer1+layer2"].size == 8  # parent channel c is child channel c + 2
    attach_meta(model, _image(16))
    sfp = build_groups(model, "sfp")
    masks = random_masks(sfp, 0.4, seed=1)
    small, _ = compact(model, sfp, masks, "faithful")
    x = torch.randn(2, 3, 17, 15)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), masked_output(model, sfp, masks, False, x), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"block layer2.0's option-A shortcut is not a ShortcutA module"):
        compact(model, coupled, random_masks(coupled, 0.4, seed=1), "hard")
