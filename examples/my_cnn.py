"""A CNN of your own for `softprune train ... model.name=examples.my_cnn:my_cnn` (README, "Pruning
your own model"). Any function or class that returns an nn.Module will do: softprune reads the
pruning dataflow off its torch.fx graph."""

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Block(nn.Module):
    """Two 3x3 convs added to a shortcut: the identity, or a strided 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(cin, cout, stride=stride), conv_bn(cout, cout)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))


def my_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    """softprune passes num_classes (the data's class count); width comes from model.kwargs."""
    return nn.Sequential(conv_bn(3, width), nn.ReLU(), Block(width, width), Block(width, 2 * width, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))
