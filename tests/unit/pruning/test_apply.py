"""Soft and hard masks zero exactly the right tensors."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning import apply_masks, build_groups, masked_tensors

from .helpers import dense_model, random_masks


def _setup(policy="sfp"):
    model = copy.deepcopy(dense_model("resnet20"))
    groups = build_groups(model, policy)
    return model, groups, random_masks(groups, 0.4, seed=2)


def test_soft_zeroes_filters_only_and_hard_also_bn():
    model, groups, masks = _setup()
    params = dict(model.named_parameters())
    soft = masked_tensors(groups, masks, params)
    hard = masked_tensors(groups, masks, params, hard=True)
    assert set(soft) == set(groups.param_names(hard=False))
    assert set(hard) == set(groups.param_names(hard=True))
    keep = masks.keep["layer1.0.conv1"]
    w = soft["layer1.0.conv1.weight"]
    assert (w[~keep] == 0).all() and torch.equal(w[keep], params["layer1.0.conv1.weight"][keep])
    assert (hard["layer1.0.bn1.weight"][~keep] == 0).all() and (hard["layer1.0.bn1.bias"][~keep] == 0).all()
    assert params["layer1.0.conv1.weight"][~keep].abs().sum() > 0  # inputs untouched: new tensors


def test_hard_masked_channels_output_exactly_zero_and_soft_ones_a_constant():
    for hard in (True, False):
        model, groups, masks = _setup()
        apply_masks(model, groups, masks, hard=hard)
        out = {}
        model.layer1[0].bn1.register_forward_hook(lambda m, a, o: out.__setitem__("y", o))
        with torch.no_grad():
            model.eval()(torch.randn(2, 3, 32, 32))
        pruned = out["y"][:, ~masks.keep["layer1.0.conv1"]]
        assert pruned.shape[1] > 0  # some channel is masked, so the checks below check something
        if hard:
            assert (pruned == 0).all()
        else:
            assert torch.allclose(pruned, pruned[:1, :, :1, :1].expand_as(pruned))


def test_zero_moments_masks_optimizer_state():
    model, groups, masks = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    buf = opt.state[model.layer1[0].conv1.weight]["momentum_buffer"]
    keep = masks.keep["layer1.0.conv1"]
    assert buf[~keep].abs().sum() > 0
    apply_masks(model, groups, masks, optimizer=opt, zero_moments=False)
    assert buf[~keep].abs().sum() > 0
    apply_masks(model, groups, masks, optimizer=opt, zero_moments=True)
    assert (buf[~keep] == 0).all() and buf[keep].abs().sum() > 0


def test_strict_and_shape_errors():
    model, groups, masks = _setup()
    with pytest.raises(ValueError, match="no tensor"):
        masked_tensors(groups, masks, {}, strict=True)
    assert masked_tensors(groups, masks, {}) == {}
    with pytest.raises(ValueError, match="channels"):
        masked_tensors(groups, masks, {"conv1.weight": torch.zeros(3, 3, 3, 3)})


def test_regrowth_is_zero_right_after_masking_and_measures_what_grew_back():
    from pruning import regrowth

    model, groups, masks = _setup()
    apply_masks(model, groups, masks)
    params = dict(model.named_parameters())
    assert regrowth(groups, masks, params) and set(regrowth(groups, masks, params).values()) == {0.0}
    w, keep = params["layer1.0.conv1.weight"], masks.keep["layer1.0.conv1"]
    with torch.no_grad():  # the pruned filters grow back to exactly the kept filters' mean norm
        target = w[keep].reshape(int(keep.sum()), -1).norm(dim=1).mean()
        w[~keep] = torch.randn_like(w[~keep])
        rows = w[~keep].reshape(int((~keep).sum()), -1)
        w[~keep] = (rows / rows.norm(dim=1, keepdim=True) * target).view_as(w[~keep])
    grown = regrowth(groups, masks, params)
    assert grown["layer1.0.conv1"] == pytest.approx(1.0, rel=1e-5)
    assert grown["layer1.0.conv2"] == 0.0  # untouched layers stay at zero


def test_churn_per_group():
    _, groups, masks = _setup()
    other = random_masks(groups, 0.4, seed=3)
    per_group = other.churn_per_group(masks)
    assert set(per_group) == set(masks.keep) and any(v > 0 for v in per_group.values())
    sizes = {n: len(k) for n, k in masks.keep.items()}
    assert sum(per_group[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(other.churn(masks))
    assert set(masks.churn_per_group(masks).values()) == {0.0}
