"""Channel groups are derived from every registered model's declared dataflow."""

from __future__ import annotations

import pytest

import models
from pruning import build_groups

from .helpers import dense_model

ALL = models.list_models()


@pytest.mark.parametrize("policy", ["sfp", "coupled", "pfec"])
@pytest.mark.parametrize("name", ALL)
def test_every_conv_is_in_at_most_one_group_and_names_exist(name, policy):
    model = dense_model(name)
    groups = build_groups(model, policy)
    convs = [m.conv for g in groups for m in g.members]
    assert len(convs) == len(set(convs)) and len(groups) > 0
    state = model.state_dict()
    assert all(n in state for n in groups.param_names())
    assert set(groups.param_names(hard=False)) < set(groups.param_names())
    meta = model.softprune_meta
    downsample = {b.downsample for b in meta.blocks if b.downsample}
    if policy == "sfp":
        assert set(convs) == set(meta.convs) - downsample
    if policy == "pfec":
        assert set(convs) == set(meta.convs) - set(meta.stream_of)
    if policy == "coupled":
        assert set(convs) == set(meta.convs)
        for stream, sm in meta.streams.items():
            owners = {groups.member_of[p][0].name for p in sm.producers}
            assert len(owners) == 1, f"{stream}'s producers are split over {owners}"


def test_cifar_option_a_links_all_streams_into_one_group():
    groups = build_groups(dense_model("resnet20"), "coupled")
    (stream,) = [g for g in groups if g.streams]
    assert stream.streams == ("layer1", "layer2", "layer3") and stream.size == 64
    # the zero-padded shortcut puts layer1 channel c at layer2 channel c+8, and that at layer3 c+16+8
    assert stream.stream_slot["layer1"].tolist() == list(range(24, 40))
    assert stream.stream_slot["layer2"].tolist() == list(range(16, 48))
    assert len(stream.members) == 1 + 3 * 3  # stem + every block's second conv


def test_imagenet_streams_are_separate_groups_including_downsample_convs():
    groups = build_groups(dense_model("resnet50"), "coupled")
    streams = [g for g in groups if g.streams]
    assert [g.streams for g in streams] == [("stem",), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    assert "layer1.0.downsample.0" in [m.conv for m in streams[1].members]


def test_include_and_exclude_patterns():
    model = dense_model("resnet56")
    only = build_groups(model, "sfp", include=["layer2.*"])
    assert only.convs() and all(c.startswith("layer2.") for c in only.convs())
    without = build_groups(model, "sfp", exclude=["conv1", "*.conv2"])
    assert all(c.endswith(".conv1") and c != "conv1" for c in without.convs())


def test_bad_policy_and_foreign_model_are_rejected():
    with pytest.raises(ValueError, match="policy"):
        build_groups(dense_model("resnet20"), "magnitude")
    import torch

    with pytest.raises(ValueError, match="softprune_meta"):
        build_groups(torch.nn.Conv2d(3, 3, 3))
