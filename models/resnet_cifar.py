"""CIFAR ResNet-20/32/56/110 (He et al. 2016, section 4.2) with the parameter-free "option A"
shortcut that SFP and PFEC use: stride-2 subsampling plus zero channel padding.

Three stages of 16/32/64 channels, n basic blocks each (depth = 6n + 2).
"""

from __future__ import annotations

from torch import Tensor, nn

from .layers import ShortcutA
from .meta import BlockMeta, ModelMeta
from .spec import SpecView

STAGE_PLANES = (16, 32, 64)


class CifarBlock(nn.Module):
    def __init__(self, view: SpecView, name: str, cin: int, dense_in: int, planes: int, stride: int):
        super().__init__()
        c1 = view.out(f"{name}.conv1", planes)
        c2 = view.out(f"{name}.conv2", planes)
        self.conv1 = view.conv(f"{name}.conv1", cin, c1, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = view.conv(f"{name}.conv2", c1, c2, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU(inplace=True)
        self.scatter = view.scatter(f"{name}.conv2", c2)
        self.width = c2 if self.scatter is None else self.scatter.width
        self.shortcut = None
        if stride != 1 or dense_in != planes:
            pad = (planes - dense_in) // 2
            entry = view.shortcut(name) or {"src": list(range(cin)), "dst": [c + pad for c in range(cin)]}
            self.shortcut = ShortcutA(entry["src"], entry["dst"], self.width, stride)
        elif cin != self.width:
            raise ValueError(f"spec: block {name} outputs {self.width} channels, its input has {cin}")

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity if self.scatter is None else self.scatter(out, identity)
        return self.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, name: str, depth: int, num_classes: int = 10, spec: dict | None = None):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        view = SpecView(spec, name)
        meta = ModelMeta(name, "cifar_resnet", num_classes, 32, first_conv="conv1", classifier="fc")
        stem = view.out("conv1", 16)
        self.conv1 = view.conv("conv1", 3, stem, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(stem)
        self.stem_scatter = view.scatter("conv1", stem)
        self.relu = nn.ReLU(inplace=True)
        width = stem if self.stem_scatter is None else self.stem_scatter.width
        meta.add_conv("conv1", "bn1")
        meta.add_stream("layer1", width)
        meta.produce("conv1", "layer1")
        dense_in = 16
        for stage, planes in enumerate(STAGE_PLANES, start=1):
            blocks = []
            for i in range(n):
                bname = f"layer{stage}.{i}"
                stride = 2 if stage > 1 and i == 0 else 1
                blk = CifarBlock(view, bname, width, dense_in, planes, stride)
                _record(meta, blk, bname, stage)
                blocks.append(blk)
                width, dense_in = blk.width, planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)
        meta.feed("layer3", "fc")
        view.check_all_used()
        self.softprune_meta = meta

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        if self.stem_scatter is not None:
            x = self.stem_scatter(x)
        x = self.layer3(self.layer2(self.layer1(self.relu(x))))
        return self.fc(self.avgpool(x).flatten(1))

    def softprune_scatters(self) -> dict[str, nn.Module]:
        found = {"conv1": self.stem_scatter}
        for name, mod in self.named_modules():
            if isinstance(mod, CifarBlock):
                found[f"{name}.conv2"] = mod.scatter
        return {k: v for k, v in found.items() if v is not None}


def _record(meta: ModelMeta, blk: CifarBlock, name: str, stage: int) -> None:
    stream_in = f"layer{max(stage - 1, 1)}" if name.endswith(".0") else f"layer{stage}"
    stream_out = f"layer{stage}"
    if stream_out not in meta.streams:
        meta.add_stream(stream_out, blk.width, parent=stream_in,
                        parent_map=list(zip(blk.shortcut.src, blk.shortcut.dst)))
    meta.add_conv(f"{name}.conv1", f"{name}.bn1")
    meta.add_conv(f"{name}.conv2", f"{name}.bn2")
    meta.feed(stream_in, f"{name}.conv1")
    meta.feed(f"{name}.conv1", f"{name}.conv2")
    meta.produce(f"{name}.conv2", stream_out)
    shortcut = "identity" if blk.shortcut is None else "option_a"
    meta.blocks.append(BlockMeta(name, stage, [f"{name}.conv1", f"{name}.conv2"], shortcut, None,
                                 stream_in, stream_out))


def resnet20(num_classes: int = 10, spec: dict | None = None) -> CifarResNet:
    return CifarResNet("resnet20", 20, num_classes, spec)


def resnet32(num_classes: int = 10, spec: dict | None = None) -> CifarResNet:
    return CifarResNet("resnet32", 32, num_classes, spec)


def resnet56(num_classes: int = 10, spec: dict | None = None) -> CifarResNet:
    return CifarResNet("resnet56", 56, num_classes, spec)


def resnet110(num_classes: int = 10, spec: dict | None = None) -> CifarResNet:
    return CifarResNet("resnet110", 110, num_classes, spec)
