"""VGG-16 for CIFAR as PFEC (Li et al. 2017) uses it: 13 convs each followed by BN, a 2x2 average
pool, and a two-layer classifier (512 -> 512 -> classes, BN in between). Conv MACs at 32 px:
3.13e8, PFEC's Table 1.
"""

from __future__ import annotations

from torch import Tensor, nn

from .meta import ModelMeta
from .spec import SpecView

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(nn.Module):
    def __init__(self, name: str, cfg=VGG16_CFG, num_classes: int = 10, spec: dict | None = None):
        super().__init__()
        view = SpecView(spec, name)
        meta = ModelMeta(name, "vgg", num_classes, 32, first_conv="features.0", classifier="classifier.3")
        layers: list[nn.Module] = []
        cin, prev = 3, None
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            conv_name, bn_name = f"features.{len(layers)}", f"features.{len(layers) + 1}"
            cout = view.out(conv_name, item)
            layers += [view.conv(conv_name, cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            meta.add_conv(conv_name, bn_name)
            if prev is not None:
                meta.feed(prev, conv_name)
            cin, prev = cout, conv_name
        self.features = nn.Sequential(*layers)
        # PFEC pools the final 2x2 map with AvgPool2d(2); adaptive pooling is the same at 32 px
        # and keeps the classifier input at one feature per channel for other sizes.
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(cin, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))
        meta.feed(prev, "classifier.0")
        view.check_all_used()
        self.softprune_meta = meta

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))

    def softprune_scatters(self) -> dict[str, nn.Module]:
        return {}


def vgg16_cifar(num_classes: int = 10, spec: dict | None = None) -> VGG:
    return VGG("vgg16_cifar", VGG16_CFG, num_classes, spec)
