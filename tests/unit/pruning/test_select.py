"""Selection: the papers' floor(N*P) rounding, global ranking, floors, rounding to multiples."""

from __future__ import annotations

import pytest
import torch

from pruning import build_groups, kept_count, score, select

from .helpers import dense_model


def _setup(name="resnet56", policy="sfp"):
    model = dense_model(name)
    groups = build_groups(model, policy)
    return groups, score(groups, dict(model.named_parameters()), "l2")


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.7, 0.9])
def test_layer_scope_prunes_floor_n_p_of_the_smallest(rate):
    groups, scores = _setup()
    masks = select(groups, scores, rate)
    for g in groups:
        keep = masks.keep[g.name]
        n_pruned = int((~keep).sum())
        assert n_pruned == int(g.size * rate + 1e-9)
        if 0 < n_pruned < g.size:
            assert scores[g.name][~keep].max() <= scores[g.name][keep].min()


def test_kept_count_rounding():
    assert kept_count(64, 0.3) == 45  # 64 - floor(19.2)
    assert kept_count(10, 0.7) == 3  # 10 * 0.7 is 7.000000000000001 in binary
    assert kept_count(100, 0.29) == 71  # 100 * 0.29 is 28.999999999999996
    assert kept_count(64, 0.3, round_to=8) == 48
    assert kept_count(16, 0.99, min_keep=4) == 4
    assert kept_count(12, 0.5, round_to=8) == 8
    assert kept_count(3, 0.0, round_to=8) == 3


def test_auto_rounding_rounds_wide_groups_to_8_and_leaves_narrow_ones():
    assert kept_count(256, 0.3, round_to="auto") == 184  # 180 up to a multiple of 8
    assert kept_count(64, 0.3, round_to="auto") == 48  # 45 up
    assert kept_count(63, 0.3, round_to="auto") == 45  # below 64 channels: exact
    assert kept_count(16, 0.4, round_to="auto") == 10  # a multiple of 8 would keep all 16
    with pytest.raises(ValueError, match="round_to"):
        select(*_setup(), 0.3, round_to="nearest")


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_auto_rounding_in_select_follows_each_group_width(scope):
    model = dense_model("resnet50")
    groups = build_groups(model, "coupled")
    scores = score(groups, dict(model.named_parameters()), "l2")
    exact, auto = select(groups, scores, 0.3, scope=scope), select(groups, scores, 0.3, scope=scope, round_to="auto")
    widths = {g.name: g.size for g in groups}
    assert any(widths[n] >= 64 and int(k.sum()) % 8 for n, k in exact.keep.items())  # rounding has work
    for name, keep in auto.keep.items():
        kept, before = int(keep.sum()), int(exact.keep[name].sum())
        if widths[name] >= 64:
            assert kept % 8 == 0 and before <= kept < before + 8
            assert bool((keep | ~exact.keep[name]).all())  # the exact selection's channels stay kept
        else:
            assert kept == before


def test_auto_rounding_leaves_a_published_preset_exact():
    model = dense_model("resnet34")
    groups = build_groups(model, "pfec", preset="resnet34-B")
    scores = score(groups, dict(model.named_parameters()), "l1")
    exact, auto = select(groups, scores, 1.0), select(groups, scores, 1.0, round_to="auto")
    assert any(g.size >= 64 and int(exact.keep[g.name].sum()) % 8 for g in groups)
    assert auto == exact
    eight = select(groups, scores, 1.0, round_to=8)  # asked for explicitly: rounded
    assert all(int(k.sum()) % 8 == 0 for k in eight.keep.values())


def test_ties_prune_the_lower_index_first():
    groups, scores = _setup("resnet20")
    flat = {k: torch.ones_like(v) for k, v in scores.items()}
    a, b = select(groups, flat, 0.5), select(groups, flat, 0.5)
    assert a == b
    first = groups.names()[0]
    assert a.keep[first].tolist() == [False] * 8 + [True] * 8


def test_global_scope_prunes_the_total_and_respects_the_floor():
    groups, scores = _setup("vgg16_cifar")
    name = groups.names()[3]
    masks = select(groups, scores, 0.5, scope="global", min_keep=3)
    total = sum(groups.sizes())
    assert sum(int((~k).sum()) for k in masks.keep.values()) == int(total * 0.5)
    assert all(int(k.sum()) >= 3 for k in masks.keep.values())
    crushed = {k: v.clone() for k, v in scores.items()}
    crushed[name][:] = 1e-6
    crushed[name][5] = 1.0  # after normalisation by its mean, everything else is ~0
    crushed_masks = select(groups, crushed, 0.5, scope="global")
    assert crushed_masks.keep[name].nonzero().flatten().tolist() == [5]  # only the floor survives
    rounded = select(groups, crushed, 0.5, scope="global", round_to=8)
    assert all(int(k.sum()) % 8 == 0 or int(k.sum()) == len(k) for k in rounded.keep.values())


def test_preset_groups_scale_their_own_rate():
    model = dense_model("resnet56")
    groups = build_groups(model, "pfec", preset="resnet56-B")
    scores = score(groups, dict(model.named_parameters()), "l1")
    full = select(groups, scores, 1.0)
    kept = {g.name: int(full.keep[g.name].sum()) for g in groups}
    assert kept["layer1.1.conv1"] == int(16 * (1 - 0.6))  # the public code's int(N * (1 - P))
    assert kept["layer3.1.conv1"] == int(64 * (1 - 0.1))
    assert all(k.all() for k in select(groups, scores, 0.0).keep.values())
    with pytest.raises(ValueError, match="global"):
        select(groups, scores, 0.5, scope="global")


@pytest.mark.parametrize("bad", [dict(rate=1.0), dict(rate=-0.1), dict(scope="net"), dict(min_keep=0)])
def test_bad_arguments_are_rejected(bad):
    groups, scores = _setup("resnet20")
    kwargs = {"rate": 0.3, **bad}
    with pytest.raises(ValueError):
        select(groups, scores, **kwargs)


def test_coupled_option_a_group_never_empties_a_stream():
    model = dense_model("resnet20")
    groups = build_groups(model, "coupled")
    (g,) = [g for g in groups if g.streams]
    scores = {k: torch.ones(len(v)) for k, v in score(groups, dict(model.named_parameters())).items()}
    scores[g.name][g.stream_slot["layer1"]] = 0.0  # the first stage's slots are the least important
    for min_keep in (1, 4):
        masks = select(groups, scores, 0.6, min_keep=min_keep)
        assert int(masks.keep[g.name][g.stream_slot["layer1"]].sum()) == min_keep
