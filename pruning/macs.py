"""Counted (not estimated) parameters and multiply-accumulates, by running the model once.

`torch.utils.flop_counter` reports FLOPs as 2 x MACs for convolutions and matrix products; we
report MACs, split into conv and linear, because the papers quote different things: SFP's counter
counts conv MACs only, torchvision's "GFLOPS" column is conv + linear MACs. BatchNorm, ReLU,
pooling and residual adds are not counted by either, nor here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_CONV_OPS = {"convolution", "_convolution", "cudnn_convolution", "conv2d"}  # aten op names


@dataclass(frozen=True)
class Counts:
    """Parameters and MACs of one forward pass at batch 1."""

    params: int
    macs: int
    conv_macs: int
    linear_macs: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hw(input_size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a square size or a pair."""
    return (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)


def count_flops(model: nn.Module, input_size: int | tuple[int, int], in_chans: int = 3) -> Counts:
    """Run `model` once on a zero image of `input_size` and count its MACs (eval mode, no grad)."""
    h, w = hw(input_size)
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, h, w, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    conv = linear = 0
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op).removeprefix("aten.").split(".")[0]
        if name in _CONV_OPS:
            conv += flops // 2
        else:
            linear += flops // 2  # mm / addmm / bmm: the classifier
    return Counts(count_params(model), conv + linear, conv, linear)
