"""Helpers shared by the pruning tests: dense models with non-trivial BN statistics, built once."""

from __future__ import annotations

import functools

import torch
from torch import nn

from models import create_model

CIFAR_SIZE, IMAGENET_SIZE = 32, 36  # 36 px: ImageNet ResNets still end at 2x2


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from their defaults, so that a pruned
    channel's BN constant is non-zero and differs from channel to channel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.randn(n, generator=g) * 0.3 + 1.0)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.5)
                mod.num_batches_tracked.fill_(7)
    return model


@functools.cache
def dense_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(create_model(name)).eval()


def input_size_for(model: nn.Module) -> int:
    return CIFAR_SIZE if model.softprune_meta.input_size == 32 else IMAGENET_SIZE


def random_masks(groups, rate: float, seed: int):
    """Random masks pruning about `rate` of each group's slots (never all of them)."""
    from pruning import MaskSet

    g = torch.Generator().manual_seed(seed)
    keep = {}
    for grp in groups:
        k = torch.rand(grp.size, generator=g) >= rate
        if not k.any():
            k[torch.randint(grp.size, (1,), generator=g)] = True
        keep[grp.name] = k
    return MaskSet(0, keep)


def trained_looking(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's parameters by name, conv weights rescaled as training leaves them: each conv by
    its own factor (log-uniform in [1/8, 8]; BN after it makes the network indifferent to it) and
    each filter by a log-normal one, so members of a coupled group differ in magnitude and filters
    of one conv differ in norm. The model itself is not changed."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        w = p.detach()
        if w.dim() == 4:
            layer = 2.0 ** (torch.rand((), generator=g).item() * 6 - 3)
            filt = torch.exp(torch.randn(w.shape[0], generator=g) * 0.5).view(-1, 1, 1, 1)
            w = w * layer * filt
        out[name] = w
    return out


def masked_output(model: nn.Module, groups, masks, hard: bool, x: torch.Tensor) -> torch.Tensor:
    """`model(x)` with the masks applied to a copy of its parameters (hard or soft)."""
    from torch.func import functional_call

    from pruning import masked_tensors

    params = dict(model.named_parameters())
    state = {**params, **dict(model.named_buffers()), **masked_tensors(groups, masks, params, hard, strict=True)}
    with torch.no_grad():
        return functional_call(model, state, (x,))


def assert_compacts_exactly(model: nn.Module, small: nn.Module, groups, masks, mode: str, size: int,
                            x: torch.Tensor) -> None:
    """The compacted `small` computes the hard- (or, faithful, soft-) masked `model` within 1e-4,
    costs what `masked_cost` predicted, and is smaller."""
    from pruning import count_flops, masked_cost

    want = masked_output(model, groups, masks, mode == "hard", x)
    with torch.no_grad():
        got = small.eval()(x)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert count_flops(small, size) == masked_cost(model, groups, masks, size, mode=mode)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
