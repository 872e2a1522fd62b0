"""Exactness of compaction for every registered model and policy (the contract in docs/design.md):
compacted(hard) == hard-masked and compacted(faithful) == soft-masked in eval mode, within 1e-4,
and the compacted model's counted MACs and params equal `masked_cost`'s prediction."""

from __future__ import annotations

import pytest
import torch

import models
from torch.func import functional_call

from pruning import build_groups, compact, count_flops, masked_cost, masked_tensors

from .helpers import dense_model, input_size_for, random_masks

ALL = models.list_models()
POLICIES = ("sfp", "coupled", "pfec")
RATES = (0.1, 0.3, 0.5, 0.7)


def _rate(name: str, policy: str) -> float:
    """Spread the rates 0.1 .. 0.7 over the cases instead of running each case four times."""
    return RATES[(ALL.index(name) + POLICIES.index(policy)) % len(RATES)]


def _masked_output(model, groups, masks, hard, x):
    """The masked model's output without copying it: the masked tensors swapped in."""
    params = dict(model.named_parameters())
    state = {**params, **dict(model.named_buffers()), **masked_tensors(groups, masks, params, hard)}
    with torch.no_grad():
        return functional_call(model, state, (x,))


@pytest.mark.parametrize("mode", ["hard", "faithful"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ALL)
def test_compacted_equals_masked(name, policy, mode):
    model = dense_model(name)
    size = input_size_for(model)
    groups = build_groups(model, policy)
    rate = _rate(name, policy)
    masks = random_masks(groups, rate, seed=len(name) + POLICIES.index(policy))
    small, spec = compact(model, groups, masks, mode=mode, input_size=size)
    x = torch.randn(2, 3, size + 3, size - 1, generator=torch.Generator().manual_seed(1))  # odd borders
    want = _masked_output(model, groups, masks, mode == "hard", x)
    with torch.no_grad():
        got = small.eval()(x)
    assert want.abs().max() > 1e-2  # a non-trivial output, so the comparison means something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert count_flops(small, size) == masked_cost(model, groups, masks, size, mode=mode)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("policy", POLICIES)
def test_faithful_differs_from_hard_when_bn_constants_are_nonzero(policy):
    model = dense_model("resnet20")
    groups = build_groups(model, policy)
    masks = random_masks(groups, 0.4, seed=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hard = compact(model, groups, masks, "hard")[0].eval()(x)
        faithful = compact(model, groups, masks, "faithful")[0].eval()(x)
    assert (hard - faithful).abs().max() > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
def test_spec_records_kept_indices_that_rebuild_the_hard_masked_model(policy):
    """What an outside check does: zero every conv's non-kept filters and BN in the dense model
    using arch.json's `kept`, and compare with the compacted model rebuilt from the spec."""
    model = dense_model("resnet18")
    groups = build_groups(model, policy)
    masks = random_masks(groups, 0.3, seed=5)
    small, spec = compact(model, groups, masks, "hard", input_size=40)
    assert set(spec["kept"]) == set(model.softprune_meta.convs)
    assert spec["model"] == "resnet18" and spec["input_size"] == 40
    rebuilt = models.build_from_spec(spec)
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    ref = models.build_from_spec(models.arch_spec(model))
    ref.load_state_dict(model.state_dict())
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for conv, kept in spec["kept"].items():
            drop = torch.ones(modules[conv].out_channels, dtype=torch.bool)
            drop[kept] = False
            bn = modules[ref.softprune_meta.bn[conv]]
            for t in (modules[conv].weight, bn.weight, bn.bias):
                t[drop] = 0
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), ref.eval()(x), rtol=0, atol=1e-4)


def test_sfp_keeps_residual_streams_full_width_and_coupled_narrows_them():
    model = dense_model("resnet50")
    masks_of = lambda g: random_masks(g, 0.5, seed=2)  # noqa: E731
    sfp = build_groups(model, "sfp")
    small, spec = compact(model, sfp, masks_of(sfp), "hard", input_size=40)
    assert small.fc.in_features == 2048 and "layer1.0.conv3" in spec["scatter"]
    assert spec["channels"]["layer1.0.downsample.0"] == 256
    coupled = build_groups(model, "coupled")
    small, spec = compact(model, coupled, masks_of(coupled), "hard", input_size=40)
    assert small.fc.in_features < 2048 and not spec.get("scatter")
    assert spec["channels"]["layer4.0.downsample.0"] == small.fc.in_features


def test_compact_rejects_unknown_mode_and_leaves_the_model_untouched():
    model = dense_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = build_groups(model, "sfp")
    with pytest.raises(ValueError, match="mode"):
        compact(model, groups, random_masks(groups, 0.3, 0), mode="soft")
    compact(model, groups, random_masks(groups, 0.3, 0), mode="faithful")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
