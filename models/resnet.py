"""ImageNet ResNet-18/34/50/101/152 with torchvision's module names and state-dict keys.

Stride sits on the 3x3 conv of a bottleneck (torchvision's "v1.5"). Every conv's width comes from
the spec, so the same code builds the dense model and any pruned variant of it.
"""

from __future__ import annotations

from torch import Tensor, nn

from .meta import BlockMeta, ModelMeta
from .spec import SpecView

STAGE_PLANES = (64, 128, 256, 512)


class _Block(nn.Module):
    """Shared forward of basic and bottleneck blocks: main branch, shortcut, optional scatter."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.branch(x)
        out = out + identity if self.scatter is None else self.scatter(out, identity)
        return self.relu(out)

    def _add_downsample(self, spec: SpecView, name: str, cin: int, width: int, stride: int) -> None:
        conv = spec.conv(f"{name}.downsample.0", cin, width, 1, stride)
        self.downsample = nn.Sequential(conv, nn.BatchNorm2d(width))


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, spec: SpecView, name: str, cin: int, planes: int, stride: int, width: int | None):
        super().__init__()
        c1 = spec.out(f"{name}.conv1", planes)
        c2 = spec.out(f"{name}.conv2", planes)
        self.conv1 = spec.conv(f"{name}.conv1", cin, c1, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = spec.conv(f"{name}.conv2", c1, c2, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU(inplace=True)
        self.scatter = spec.scatter(f"{name}.conv2", c2)
        self.downsample = None
        if width is not None:
            self._add_downsample(spec, name, cin, width, stride)

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, spec: SpecView, name: str, cin: int, planes: int, stride: int, width: int | None):
        super().__init__()
        c1 = spec.out(f"{name}.conv1", planes)
        c2 = spec.out(f"{name}.conv2", planes)
        c3 = spec.out(f"{name}.conv3", planes * 4)
        self.conv1 = spec.conv(f"{name}.conv1", cin, c1, 1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = spec.conv(f"{name}.conv2", c1, c2, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = spec.conv(f"{name}.conv3", c2, c3, 1)
        self.bn3 = nn.BatchNorm2d(c3)
        self.relu = nn.ReLU(inplace=True)
        self.scatter = spec.scatter(f"{name}.conv3", c3)
        self.downsample = None
        if width is not None:
            self._add_downsample(spec, name, cin, width, stride)

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class ResNet(nn.Module):
    """torchvision-layout ResNet; `spec` narrows any conv (see models/spec.py)."""

    def __init__(self, name: str, block: type[_Block], layers: list[int], num_classes: int = 1000,
                 spec: dict | None = None) -> None:
        super().__init__()
        view = SpecView(spec, name)
        meta = ModelMeta(name, "resnet", num_classes, 224, first_conv="conv1", classifier="fc")
        stem = view.out("conv1", 64)
        self.conv1 = view.conv("conv1", 3, stem, 7, 2, 3)
        self.bn1 = nn.BatchNorm2d(stem)
        self.stem_scatter = view.scatter("conv1", stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        meta.add_conv("conv1", "bn1")
        width = stem if self.stem_scatter is None else self.stem_scatter.width
        # The stem is its own stream when layer1 opens with a projection (bottlenecks).
        stream = "stem" if block.expansion != 1 else "layer1"
        meta.add_stream(stream, width)
        meta.produce("conv1", stream)
        dense_in = 64
        for stage, (planes, n) in enumerate(zip(STAGE_PLANES, layers), start=1):
            stride = 1 if stage == 1 else 2
            layer, width, stream, dense_in = self._make_stage(
                view, meta, block, stage, planes, n, stride, width, stream, dense_in)
            setattr(self, f"layer{stage}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)
        meta.feed(stream, "fc")
        view.check_all_used()
        self.softprune_meta = meta

    @staticmethod
    def _make_stage(view, meta, block, stage, planes, n, stride, width, stream, dense_in):
        blocks = []
        for i in range(n):
            name = f"layer{stage}.{i}"
            s = stride if i == 0 else 1
            project = s != 1 or dense_in != planes * block.expansion
            out_width = view.out(f"{name}.downsample.0", planes * block.expansion) if project else None
            blk = block(view, name, width, planes, s, out_width)
            _check_width(blk, name, out_width if project else width)
            stream_out = f"layer{stage}" if project or stream == f"layer{stage}" else stream
            if stream_out not in meta.streams:
                meta.add_stream(stream_out, out_width)
            _record_block(meta, blk, name, stage, stream, stream_out)
            blocks.append(blk)
            width = out_width if project else width
            stream, dense_in = stream_out, planes * block.expansion
        return nn.Sequential(*blocks), width, stream, dense_in

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        if self.stem_scatter is not None:
            x = self.stem_scatter(x)
        x = self.maxpool(self.relu(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))

    def softprune_scatters(self) -> dict[str, nn.Module]:
        found = {"conv1": self.stem_scatter}
        for name, mod in self.named_modules():
            if isinstance(mod, _Block):
                last = "conv3" if isinstance(mod, Bottleneck) else "conv2"
                found[f"{name}.{last}"] = mod.scatter
        return {k: v for k, v in found.items() if v is not None}


def _check_width(blk: _Block, name: str, expected: int) -> None:
    last = blk.conv3 if isinstance(blk, Bottleneck) else blk.conv2
    got = last.out_channels if blk.scatter is None else blk.scatter.width
    if got != expected:
        raise ValueError(f"spec: block {name} outputs {got} channels, its residual stream has {expected}")


def _record_block(meta: ModelMeta, blk: _Block, name: str, stage: int, stream_in: str, stream_out: str):
    convs = [f"{name}.conv{i}" for i in (1, 2, 3) if hasattr(blk, f"conv{i}")]
    ds = f"{name}.downsample.0" if blk.downsample is not None else None
    meta.feed(stream_in, convs[0])
    for a, b in zip(convs, convs[1:]):
        meta.add_conv(a, a.replace("conv", "bn"))
        meta.feed(a, b)
    meta.add_conv(convs[-1], convs[-1].replace("conv", "bn"))
    meta.produce(convs[-1], stream_out)
    if ds is not None:
        meta.add_conv(ds, f"{name}.downsample.1")
        meta.feed(stream_in, ds)
        meta.produce(ds, stream_out)
    shortcut = "downsample" if ds else "identity"
    meta.blocks.append(BlockMeta(name, stage, convs, shortcut, ds, stream_in, stream_out))


def resnet18(num_classes: int = 1000, spec: dict | None = None) -> ResNet:
    return ResNet("resnet18", BasicBlock, [2, 2, 2, 2], num_classes, spec)


def resnet34(num_classes: int = 1000, spec: dict | None = None) -> ResNet:
    return ResNet("resnet34", BasicBlock, [3, 4, 6, 3], num_classes, spec)


def resnet50(num_classes: int = 1000, spec: dict | None = None) -> ResNet:
    return ResNet("resnet50", Bottleneck, [3, 4, 6, 3], num_classes, spec)


def resnet101(num_classes: int = 1000, spec: dict | None = None) -> ResNet:
    return ResNet("resnet101", Bottleneck, [3, 4, 23, 3], num_classes, spec)


def resnet152(num_classes: int = 1000, spec: dict | None = None) -> ResNet:
    return ResNet("resnet152", Bottleneck, [3, 8, 36, 3], num_classes, spec)
