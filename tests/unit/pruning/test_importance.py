"""Importance criteria against straightforward per-filter references."""

from __future__ import annotations

import pytest
import torch

from pruning import build_groups, filter_scores, score

from .helpers import dense_model, trained_looking


def test_l1_l2_fpgm_match_per_filter_loops():
    w = torch.randn(12, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    l1 = torch.tensor([f.abs().sum() for f in w])
    l2 = torch.tensor([f.pow(2).sum().sqrt() for f in w])
    fpgm = torch.tensor([sum((f - g).norm() for g in w) for f in w])
    torch.testing.assert_close(filter_scores(w, "l1"), l1)
    torch.testing.assert_close(filter_scores(w, "l2"), l2)
    torch.testing.assert_close(filter_scores(w, "fpgm"), fpgm, rtol=1e-4, atol=1e-4)


def test_fpgm_ranks_the_filter_at_the_median_lowest():
    w = torch.randn(9, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    w[4] = w.mean(0)  # a filter at the centre of the others
    assert int(filter_scores(w, "fpgm").argmin()) == 4


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm"])
def test_coupled_slot_score_is_the_mean_over_its_members_of_mean_normalised_scores(criterion):
    model = dense_model("resnet18")
    groups = build_groups(model, "coupled")
    tensors = trained_looking(model)
    s = score(groups, tensors, criterion)
    g = groups["stream:layer1"]
    members = torch.stack([filter_scores(tensors[f"{m.conv}.weight"], criterion) for m in g.members])
    torch.testing.assert_close(s[g.name], (members / members.mean(1, keepdim=True)).mean(0))
    single = groups["layer1.0.conv1"]
    own = filter_scores(tensors["layer1.0.conv1.weight"], criterion)
    torch.testing.assert_close(s[single.name], own / own.mean())
    assert set(s) == set(groups.names()) and all(v.device.type == "cpu" for v in s.values())


def test_option_a_slot_score_averages_the_members_mapped_to_it():
    model = dense_model("resnet20")
    groups = build_groups(model, "coupled")
    tensors = trained_looking(model, seed=2)
    (g,) = [g for g in groups if g.streams]
    total = torch.zeros(g.size)
    for m in g.members:
        own = torch.linalg.vector_norm(tensors[f"{m.conv}.weight"].flatten(1), dim=1)
        total.index_add_(0, m.slot, own / own.mean())
    torch.testing.assert_close(score(groups, tensors, "l2")[g.name], total / g.slot_count)


def test_unknown_criterion_and_missing_weight_are_rejected():
    model = dense_model("resnet20")
    groups = build_groups(model, "sfp")
    with pytest.raises(ValueError, match="criterion"):
        score(groups, dict(model.named_parameters()), "taylor")
    with pytest.raises(ValueError, match="conv1.weight"):
        score(groups, {}, "l2")
