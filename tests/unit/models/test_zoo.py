"""Every registered model: forward/backward, spec round trip, narrowed rebuild, counted MACs."""

from __future__ import annotations

import json
import random

import pytest
import torch

import models
from pruning import count_flops

ALL = models.list_models()

# Published counts. CIFAR ResNets: SFP's counter (conv MACs only). ImageNet ResNets: torchvision's
# model table ("GFLOPS" there are MACs, conv + fc). VGG-16-CIFAR: PFEC Table 1 (convs).
PUBLISHED = {
    "resnet20": ("conv_macs", 4.06e7),
    "resnet56": ("conv_macs", 1.25e8),
    "resnet110": ("conv_macs", 2.53e8),
    "resnet18": ("macs", 1.81e9),
    "resnet34": ("macs", 3.66e9),
    "resnet50": ("macs", 4.09e9),
    "resnet101": ("macs", 7.80e9),
    "vgg16_cifar": ("conv_macs", 3.13e8),
}


def _small_input(model: torch.nn.Module) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    model = models.create_model(name, num_classes=7)
    out = model(_small_input(model))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.softprune_meta.first_conv in dict(model.named_modules())
    assert model.softprune_meta.classifier in dict(model.named_modules())


@pytest.mark.parametrize("name", ALL)
def test_spec_round_trip(name):
    model = models.create_model(name).eval()
    spec = json.loads(json.dumps(models.arch_spec(model)))
    clone = models.build_from_spec(spec).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    x = _small_input(model)
    torch.testing.assert_close(clone(x), model(x))


def _narrow(model: torch.nn.Module, rng: random.Random) -> dict:
    """A spec narrowing every inner conv (those whose outputs feed only other convs)."""
    spec = models.arch_spec(model)
    for conv in model.softprune_meta.consumers:
        spec["channels"][conv] = rng.randint(1, spec["channels"][conv])
    return spec


@pytest.mark.parametrize("name", ALL)
def test_narrowed_model_builds_and_round_trips(name):
    rng = random.Random(name)
    model = models.create_model(name)
    spec = _narrow(model, rng)
    narrow = models.build_from_spec(spec).eval()
    assert narrow(_small_input(narrow)).shape == (2, model.softprune_meta.num_classes)
    assert models.arch_spec(narrow)["channels"] == spec["channels"]
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counted_macs_match_published(name):
    model = models.create_model(name)
    counts = count_flops(model, model.softprune_meta.input_size)
    key, published = PUBLISHED[name]
    assert getattr(counts, key) == pytest.approx(published, rel=0.01)
    assert counts.macs == counts.conv_macs + counts.linear_macs


def test_unknown_model_and_foreign_spec_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        models.create_model("resnet9")
    spec = models.arch_spec(models.create_model("resnet20"))
    spec["model"] = "vgg16_cifar"
    with pytest.raises(ValueError, match="does not have"):
        models.build_from_spec(spec)
    with pytest.raises(ValueError, match="positive int"):
        models.create_model("resnet20", spec={"channels": {"conv1": 0}})


def test_block_width_mismatch_names_the_block():
    spec = {"channels": {"layer1.0.conv2": 10}}  # identity shortcut needs 64
    with pytest.raises(ValueError, match="layer1.0"):
        models.create_model("resnet18", spec=spec)


def test_meta_dataflow_resnet50():
    meta = models.create_model("resnet50").softprune_meta
    assert meta.consumers["layer1.0.conv1"] == ["layer1.0.conv2"]
    assert meta.stream_of["layer1.0.conv3"] == "layer1"
    assert meta.stream_of["layer1.0.downsample.0"] == "layer1"
    assert meta.streams["stem"].consumers == ["layer1.0.conv1", "layer1.0.downsample.0"]
    assert "fc" in meta.streams["layer4"].consumers
    assert len(meta.streams["layer3"].producers) == 6 + 1  # six blocks' conv3 + the projection
    assert meta.bn["layer2.0.downsample.0"] == "layer2.0.downsample.1"


def test_meta_option_a_links_streams():
    meta = models.create_model("resnet56").softprune_meta
    child = meta.streams["layer2"]
    assert child.parent == "layer1"
    assert child.parent_map == [(c, c + 8) for c in range(16)]
    assert meta.streams["layer1"].producers[0] == "conv1"
