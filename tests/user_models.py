"""Models outside the zoo, for `model.name=tests.user_models:<factory>` (Ray's local workers import
them too: a driver's working directory, the repository root under pytest, is on their path).

`small_net(blocks="plain")` is plain convs and residual adds (identity and projection
shortcuts); `blocks="full"` adds an inverted-residual block (a groups=channels depthwise conv + BN
between two 1x1 convs, with a squeeze-excite gate) and a block that concatenates two branches
with `torch.cat`."""

from __future__ import annotations

import torch
from torch import nn

BLOCKS = ("plain", "full")


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Residual(nn.Module):
    """Two 3x3 conv-BNs and an identity shortcut."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.a = conv_bn(ch, ch)
        self.b = conv_bn(ch, ch, relu=False)

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + x)


class Down(nn.Module):
    """Stride-2 residual block whose shortcut is a 1x1 projection (torchvision's BasicBlock)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.a = conv_bn(cin, cout, stride=2)
        self.b = conv_bn(cout, cout, relu=False)
        self.proj = conv_bn(cin, cout, 1, stride=2, relu=False)

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + self.proj(x))


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: a per-channel gate from pooled features."""

    def __init__(self, ch: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, ch, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expand, 3x3 depthwise, squeeze-excite, 1x1 project, identity shortcut."""

    def __init__(self, ch: int, expand: int = 2) -> None:
        super().__init__()
        hidden = ch * expand
        self.expand = conv_bn(ch, hidden, 1)
        self.depthwise = conv_bn(hidden, hidden, 3, groups=hidden)
        self.se = SqueezeExcite(hidden, max(hidden // 4, 1))
        self.project = conv_bn(hidden, ch, 1, relu=False)

    def forward(self, x):
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class Concat(nn.Module):
    """Two branches of half the width each, concatenated along the channels."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.left = conv_bn(cin, cout // 2, 1)
        self.right = conv_bn(cin, cout - cout // 2, 3)

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], 1)


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8, blocks: str = "plain") -> None:
        super().__init__()
        if blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {BLOCKS}, got {blocks!r}")
        w = width
        self.stem = conv_bn(3, w)
        self.stage1 = Residual(w)
        self.down = Down(w, 2 * w)
        self.stage2 = Residual(2 * w)
        extra = [InvertedResidual(2 * w), Concat(2 * w, 2 * w), conv_bn(2 * w, 2 * w)] if blocks == "full" else []
        self.extra = nn.Sequential(*extra)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        x = self.extra(self.stage2(self.down(self.stage1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_net(num_classes: int = 10, width: int = 8, blocks: str = "plain") -> SmallNet:
    return SmallNet(num_classes, width, blocks)


def flat_head(num_classes: int = 10, size: int = 8) -> nn.Module:
    """Flattens every spatial position into the classifier (of `size` x `size` images): the tracer
    refuses it, naming the node."""
    return nn.Sequential(conv_bn(3, 4), nn.Flatten(), nn.Linear(4 * size * size, num_classes))


def fixed_head() -> SmallNet:
    """A factory without a num_classes keyword: always 3 classes."""
    return SmallNet(3)


NOT_A_FACTORY = 42
