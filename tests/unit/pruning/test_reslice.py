"""Optimizer moments through compaction (`slice_moments` with `compaction_index`): real torch
SGD and AdamW states of a trained ResNet-20, cut by a plan whose kept channels are known."""

from __future__ import annotations

import pytest
import torch

from models import create_model
from pruning import MaskSet, build_groups, compact
from pruning.compact import compaction_index
from pruning.reslice import slice_moments

KEPT = lambda n: [i for i in range(n) if i % 3 != 1]  # noqa: E731  the known plan: drop every third slot


def _trained(optim: str):
    """ResNet-20 after 3 real steps of `optim` and its moments by parameter name."""
    torch.manual_seed(0)
    model = create_model("resnet20", 4)
    params = dict(model.named_parameters())
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) if optim == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 4, (4,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    moments = {n: {k: v.clone() for k, v in opt.state[p].items() if k != "step"} for n, p in params.items()}
    return model, moments


def _known_masks(groups) -> MaskSet:
    keep = {}
    for g in groups:
        k = torch.zeros(g.size, dtype=torch.bool)
        k[KEPT(g.size)] = True
        keep[g.name] = k
    return MaskSet(0, keep)


@pytest.mark.parametrize("optim, keys", [("sgd", ["momentum_buffer"]), ("adamw", ["exp_avg", "exp_avg_sq"])])
@pytest.mark.parametrize("policy", ["sfp", "coupled"])
def test_moments_at_kept_indices_are_the_old_ones(optim, keys, policy):
    model, moments = _trained(optim)
    groups = build_groups(model, policy)
    masks = _known_masks(groups)
    small, _ = compact(model, groups, masks, "hard")
    shapes = {n: p.shape for n, p in small.named_parameters()}
    sliced = slice_moments(moments, compaction_index(model, groups, masks, "hard"), shapes)
    assert set(sliced) == set(shapes)
    for name, per in sliced.items():
        assert sorted(per) == keys and all(per[k].shape == shapes[name] for k in keys), name
    for key in keys:
        old, new = (lambda n, k=key: moments[n][k]), (lambda n, k=key: sliced[n][k])
        # an inner conv: its filters, its BN, and its reader's input channels, at the known kept slots
        kept = KEPT(16)
        conv1 = old("layer1.0.conv1.weight")[kept]
        conv1 = conv1[:, kept] if policy == "coupled" else conv1  # coupled narrows the stream it reads
        assert torch.equal(new("layer1.0.conv1.weight"), conv1)
        assert torch.equal(new("layer1.0.bn1.weight"), old("layer1.0.bn1.weight")[kept])
        assert torch.equal(new("layer1.0.bn1.bias"), old("layer1.0.bn1.bias")[kept])
        # conv2 writes the stream: its own filters (sfp, scattered) or the stream's (coupled)
        assert torch.equal(new("layer1.0.conv2.weight"), old("layer1.0.conv2.weight")[kept][:, kept])
        wide = 64  # the last stream: the classifier reads it
        fc = old("fc.weight")[:, KEPT(wide)] if policy == "coupled" else old("fc.weight")
        assert torch.equal(new("fc.weight"), fc)
        assert torch.equal(new("fc.bias"), old("fc.bias"))  # taken whole


@pytest.mark.parametrize("policy", ["sfp", "coupled"])
def test_a_moment_shaped_like_the_weights_is_cut_into_the_compacted_weights(policy):
    """Moments follow exactly the cut compaction makes of the weights: a 'moment' equal to each
    dense parameter becomes the compacted model's parameter (whose function test_compact checks)."""
    model, _ = _trained("sgd")
    groups = build_groups(model, policy)
    masks = _known_masks(groups)
    small, _ = compact(model, groups, masks, "hard")
    as_moments = {n: {"m": p.detach().clone()} for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in small.named_parameters()}
    sliced = slice_moments(as_moments, compaction_index(model, groups, masks, "hard"), shapes)
    for name, p in small.named_parameters():
        assert torch.equal(sliced[name]["m"], p.detach()), name


def test_parameters_compaction_computes_otherwise_start_from_zero():
    """Faithful compaction folds the removed stream channels' constants into the classifier's
    bias (coupled narrows its input): that bias gets zero moments; hard mode copies it."""
    model, moments = _trained("adamw")
    groups = build_groups(model, "coupled")
    masks = _known_masks(groups)
    small, _ = compact(model, groups, masks, "faithful")
    shapes = {n: p.shape for n, p in small.named_parameters()}
    faithful = compaction_index(model, groups, masks, "faithful")
    assert faithful["fc.bias"] is None and compaction_index(model, groups, masks, "hard")["fc.bias"] == ()
    sliced = slice_moments(moments, faithful, shapes)
    assert moments["fc.bias"]["exp_avg"].abs().sum() > 0
    assert sliced["fc.bias"]["exp_avg"].abs().sum() == 0 and sliced["fc.bias"]["exp_avg_sq"].abs().sum() == 0
    shapes["extra.weight"] = torch.Size([3])  # a parameter the dense model did not have
    assert slice_moments(moments, faithful, shapes)["extra.weight"]["exp_avg"].abs().sum() == 0


def test_an_index_of_another_compaction_is_refused_naming_the_parameter():
    model, moments = _trained("sgd")
    groups = build_groups(model, "sfp")
    masks = _known_masks(groups)
    shapes = {n: p.shape for n, p in model.named_parameters()}  # the dense shapes: not what the index cuts
    message = (r"^slice_moments: conv1\.weight\.momentum_buffer cut to \(11, 3, 3, 3\), "
               r"the compacted parameter is \(16, 3, 3, 3\)$")
    with pytest.raises(ValueError, match=message):
        slice_moments(moments, compaction_index(model, groups, masks, "hard"), shapes)
