"""Masks as data: packing, hashing, churn, checkpoint state."""

from __future__ import annotations

import json

import pytest
import torch

from pruning import MaskSet, build_groups, full_masks

from .helpers import dense_model, random_masks


def _groups(name="resnet50", policy="coupled"):
    return build_groups(dense_model(name), policy)


def test_pack_unpack_round_trip_and_size():
    groups = _groups()
    masks = random_masks(groups, 0.3, seed=1)
    masks.epoch = 17
    data = masks.pack()
    back = MaskSet.unpack(data, groups)
    assert back == masks and back.epoch == 17 and back.hash() == masks.hash()
    assert len(data) <= 32 + (sum(groups.sizes()) + 7) // 8


def test_unpack_rejects_other_groups_and_garbage():
    masks = random_masks(_groups(), 0.3, seed=1)
    with pytest.raises(ValueError, match="different groups"):
        MaskSet.unpack(masks.pack(), _groups(policy="sfp"))
    with pytest.raises(ValueError):
        MaskSet.unpack(b"nonsense" * 8, _groups())


def test_hash_is_stable_and_sensitive():
    groups = _groups("resnet20", "sfp")
    a, b = random_masks(groups, 0.3, 4), random_masks(groups, 0.3, 4)
    assert a.hash() == b.hash() and len(a.hash()) == 64
    first = groups.names()[0]
    b.keep[first][0] = ~b.keep[first][0]
    assert a.hash() != b.hash()


def test_churn_counts_changed_slots():
    groups = _groups("resnet20", "sfp")
    a = full_masks(groups)
    b = MaskSet(1, {k: v.clone() for k, v in a.keep.items()})
    assert b.churn(a) == 0.0 and b.churn(None) == 0.0
    first = groups.names()[0]
    b.keep[first][:4] = False
    assert b.churn(a) == pytest.approx(4 / sum(groups.sizes()))


def test_state_is_json_and_round_trips():
    groups = _groups()
    masks = random_masks(groups, 0.6, seed=9)
    state = json.loads(json.dumps(masks.to_state()))
    assert MaskSet.from_state(state) == masks
    with pytest.raises(ValueError, match="invalid mask state"):
        MaskSet.from_state({"epoch": 0})


def test_kept_fraction_and_type_checks():
    groups = _groups("resnet20", "sfp")
    fractions = random_masks(groups, 0.5, 0).kept_fraction()
    assert set(fractions) == set(groups.names()) and all(0 < f <= 1 for f in fractions.values())
    with pytest.raises(ValueError, match="bool"):
        MaskSet(0, {"conv1": torch.ones(3)})
