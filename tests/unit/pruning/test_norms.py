"""Kept filters' norms and the effective learning rate lr / |w|^2 of scale-invariant filters."""

from __future__ import annotations

import pytest
import torch

from pruning.norms import filter_norm_stats, summarize


def test_norms_and_effective_lr_of_kept_filters_only():
    w = torch.zeros(4, 2, 3, 3)
    w[0] = 1.0 / 18 ** 0.5   # norm 1
    w[1] = 2.0 / 18 ** 0.5   # norm 2
    w[2] = 10.0              # large, but pruned by the mask below
    keep = torch.tensor([True, True, False, False])  # filter 3 is zero anyway

    from pruning.groups import Group, GroupSet, Member
    from pruning.masks import MaskSet

    groups = GroupSet("toy", "sfp", [Group("g", 4, (Member("conv", "bn", 4, False),))])
    stats = filter_norm_stats({"conv": w}, lr=0.1, groups=groups, masks=MaskSet(0, {"g": keep}))
    assert stats["conv"]["norm"] == pytest.approx(1.5)
    assert stats["conv"]["eff_lr"] == pytest.approx(0.1 * (1 + 1 / 4) / 2)
    unmasked = filter_norm_stats({"conv": w}, lr=0.1)["conv"]  # every non-zero filter counts
    assert unmasked["norm"] == pytest.approx((1 + 2 + 10 * 18 ** 0.5) / 3)


def test_doubling_a_filter_quarters_its_effective_lr():
    w = torch.randn(8, 3, 3, 3)
    before = filter_norm_stats({"c": w}, lr=1.0)["c"]
    after = filter_norm_stats({"c": 2 * w}, lr=1.0)["c"]
    assert after["norm"] == pytest.approx(2 * before["norm"], rel=1e-5)
    assert after["eff_lr"] == pytest.approx(before["eff_lr"] / 4, rel=1e-5)


def test_summary_weighs_layers_equally():
    total = summarize({"a": {"norm": 1.0, "eff_lr": 0.5}, "b": {"norm": 3.0, "eff_lr": 0.1}})
    assert total == pytest.approx({"norm": 2.0, "eff_lr": 0.3})
    assert summarize({}) == {}
