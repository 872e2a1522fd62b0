"""ImageNet ResNets use torchvision's state-dict keys and shapes, so its weight files load with
strict=True. torchvision is not installed here; the expected layout is written down from its
naming rules (torchvision/models/resnet.py): conv1/bn1 stem, layerS.B blocks with convN/bnN,
`downsample.0` (1x1 conv) and `downsample.1` (BN) on the first block of a stage when the shape
changes, `fc` classifier; every BN has weight, bias, running_mean, running_var,
num_batches_tracked.
"""

from __future__ import annotations

import pytest
import torch

import models

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
DEPTHS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
          "resnet50": ("bottleneck", [3, 4, 6, 3]), "resnet101": ("bottleneck", [3, 4, 23, 3]),
          "resnet152": ("bottleneck", [3, 8, 36, 3])}
# torchvision's documented parameter counts (model table, num_params)
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808}
# len(torchvision.models.resnetX().state_dict())
TORCHVISION_KEYS = {"resnet18": 122, "resnet50": 320}


def _bn(prefix: str, c: int) -> dict:
    shapes = {"weight": (c,), "bias": (c,), "running_mean": (c,), "running_var": (c,),
              "num_batches_tracked": ()}
    return {f"{prefix}.{k}": shapes[k] for k in BN_KEYS}


def expected_layout(name: str) -> dict[str, tuple]:
    kind, layers = DEPTHS[name]
    exp = 1 if kind == "basic" else 4
    out = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    cin = 64
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            if kind == "basic":
                convs = [(planes, cin, 3), (planes, planes, 3)]
            else:
                convs = [(planes, cin, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            for i, (o, c, k) in enumerate(convs, start=1):
                out[f"{p}.conv{i}.weight"] = (o, c, k, k)
                out.update(_bn(f"{p}.bn{i}", o))
            if b == 0 and (s > 1 or exp != 1):
                out[f"{p}.downsample.0.weight"] = (planes * exp, cin, 1, 1)
                out.update(_bn(f"{p}.downsample.1", planes * exp))
            cin = planes * exp
    out["fc.weight"] = (1000, cin)
    out["fc.bias"] = (1000,)
    return out


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_state_dict_matches_torchvision(name):
    model = models.create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_layout(name)
    assert list(got) == list(want)  # same keys in the same order
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]
    if name in TORCHVISION_KEYS:
        assert len(got) == TORCHVISION_KEYS[name]


def test_torchvision_style_file_loads_strict(tmp_path):
    """A weights file saved under torchvision's layout (built here from the written-down list)."""
    weights = {k: torch.randn(s) if s else torch.tensor(0) for k, s in expected_layout("resnet50").items()}
    path = tmp_path / "resnet50-torchvision.pth"
    torch.save(weights, path)
    model = models.create_model("resnet50")
    model.load_state_dict(torch.load(path), strict=True)
    torch.testing.assert_close(model.fc.weight, weights["fc.weight"])
