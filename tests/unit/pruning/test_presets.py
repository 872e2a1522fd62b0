"""PFEC presets: layer numbering checked through the paper's published FLOPs reductions."""

from __future__ import annotations

import pytest

from pruning import PRESETS, build_groups, full_masks, masked_cost, preset_rates, score, select
from pruning.presets import layer_numbers

from .helpers import dense_model

# PFEC Table 1/2: FLOPs reduction of each pruned configuration (CIFAR-10 / ImageNet).
PUBLISHED = {"vgg16-A": 0.342, "resnet56-A": 0.104, "resnet56-B": 0.276, "resnet110-A": 0.159,
             "resnet110-B": 0.386, "resnet34-A": 0.155, "resnet34-B": 0.242}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_flops_reduction_matches_the_paper(name):
    model = dense_model(PRESETS[name].model)
    groups = build_groups(model, "pfec", preset=name)
    masks = select(groups, score(groups, dict(model.named_parameters()), "l1"), 1.0)
    size = model.softprune_meta.input_size
    dense = masked_cost(model, groups, full_masks(groups), size)
    pruned = masked_cost(model, groups, masks, size)
    assert 1 - pruned.conv_macs / dense.conv_macs == pytest.approx(PUBLISHED[name], abs=0.006)


def test_layer_numbering():
    meta = dense_model("resnet56").softprune_meta
    numbers = layer_numbers(meta)
    assert numbers[1] == "conv1" and numbers[20] == "layer2.0.conv1" and numbers[54] == "layer3.8.conv1"
    rates = preset_rates("resnet56-B", meta)
    assert "layer1.8.conv1" not in rates and rates["layer1.0.conv1"] == 0.6 and rates["layer2.1.conv1"] == 0.3
    r34 = layer_numbers(dense_model("resnet34").softprune_meta)
    assert r34[8] == "layer2.0.conv1" and r34[16] == "layer3.0.conv1" and r34[26] == "layer3.5.conv1"
    vgg = preset_rates("vgg16-A", dense_model("vgg16_cifar").softprune_meta)
    assert list(vgg) == ["features.0", "features.24", "features.27", "features.30", "features.34",
                         "features.37", "features.40"]


def test_preset_for_another_model_or_policy_is_rejected():
    with pytest.raises(ValueError, match="for model 'resnet56'"):
        build_groups(dense_model("resnet20"), "pfec", preset="resnet56-A")
    with pytest.raises(ValueError, match="policy"):
        build_groups(dense_model("resnet56"), "coupled", preset="resnet56-A")
