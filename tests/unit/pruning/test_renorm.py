"""Norm control: kept filters back to their target norm, the network's function unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning import apply_masks, build_groups
from pruning.renorm import layer_norms, mean_factor, renormalise

from .helpers import dense_model, random_masks


def _grown(policy: str = "sfp", seed: int = 0):
    """ResNet-20 with non-trivial BN statistics, its targets taken now, then its masked convs'
    filters grown by per-filter factors in [5, 50] (as regrowth ratchets them) with the BN
    statistics grown to match (the function is the same), and soft masks applied."""
    model = copy.deepcopy(dense_model("resnet20"))
    groups = build_groups(model, policy)
    targets = layer_norms(groups, dict(model.named_parameters()))
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for conv in groups.convs():
            w, bn = modules[conv].weight, modules[groups.member_of[conv][1].bn]
            c = 5 + 45 * torch.rand(w.shape[0], generator=g)
            w.mul_(c.view(-1, 1, 1, 1))
            bn.running_mean.mul_(c)
            bn.running_var.mul_(c * c)
    masks = random_masks(groups, 0.4, seed=3)
    apply_masks(model, groups, masks)
    return model, groups, masks, targets


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x), model.train()(x)


def test_kept_filters_reach_their_target_and_the_function_is_unchanged():
    model, groups, masks, targets = _grown()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = _outputs(copy.deepcopy(model), x)
    factors = renormalise(model, groups, masks, targets)
    after = _outputs(copy.deepcopy(model), x)
    params = dict(model.named_parameters())
    for conv, keep in masks.keep.items():
        norms = params[f"{conv}.weight"].detach().flatten(1).norm(dim=1)
        assert torch.allclose(norms[keep], torch.full_like(norms[keep], targets[conv]), rtol=1e-5), conv
        assert (norms[~keep] == 0).all(), f"{conv}: a pruned filter is no longer zero"
    assert 1 / 50 < mean_factor(factors) < 1 / 5  # the grown filters were shrunk back
    for mode, b, a in zip(("eval", "train"), before, after):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3), f"{mode}: max diff {(a - b).abs().max():.2e}"


def test_without_the_bn_statistics_the_eval_function_changes():
    """The check above can fail: scaling the weights alone changes what eval mode computes."""
    model, groups, masks, targets = _grown()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = _outputs(copy.deepcopy(model), x)[0]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    renormalise(model, groups, masks, targets)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    after = _outputs(model, x)[0]
    assert not torch.allclose(after, before, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_optimizer_moments_follow_the_filter(opt_name):
    model, groups, masks, targets = _grown()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    model.train()(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    w = model.layer1[0].conv1.weight
    before = {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v) and v.dim() == 4}
    factors = renormalise(model, groups, masks, targets, optimizer=opt)
    c = factors["layer1.0.conv1"].view(-1, 1, 1, 1)
    powers = {"momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2}
    assert before, "the optimizer kept no per-filter state: nothing was checked"
    for key, value in before.items():
        assert torch.allclose(opt.state[w][key], value * c ** powers[key], rtol=1e-5, atol=1e-12), key
        assert not torch.allclose(opt.state[w][key], value), f"{key} was not scaled"


def test_layer_norms_ignore_zero_filters():
    model = copy.deepcopy(dense_model("resnet20"))
    groups = build_groups(model, "sfp")
    params = dict(model.named_parameters())
    w = params["layer1.0.conv1.weight"]
    expected = float(w.detach().flatten(1).norm(dim=1)[1:].mean())
    with torch.no_grad():
        w[0].zero_()
    assert layer_norms(groups, params)["layer1.0.conv1"] == pytest.approx(expected)
