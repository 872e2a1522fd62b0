"""PFEC's published configurations (Li et al., ICLR 2017, section 4 and Table 1/2) as presets.

Layer numbering, checked against the paper's text and the best-known public re-implementation
(Eric-mingjie/rethinking-network-pruning, `res56prune.py`, `res110prune.py`, ImageNet `prune.py`):
- VGG-16: conv_1 .. conv_13 in forward order. VGG-16-A halves conv_1 (64 -> 32) and conv_8 ..
  conv_13 (512 -> 256), i.e. every 512-wide conv; conv_2 .. conv_7 are untouched.
- ResNets: layers are the 3x3 convs counted from 1 in forward order, the stem conv being layer 1
  and 1x1 projection shortcuts not counted; block b (0-based over the whole network) holds layers
  2b+2 and 2b+3. Only each block's first conv (the even layer numbers) is pruned, at its stage's
  rate, unless its number is in the skip list. Examples: ResNet-56 (9 blocks per stage) layer 20
  is the first conv of stage 2's first block, 54 that of stage 3's last block; the thresholds in
  the public code (stage 1 up to layer 18, stage 2 up to 36) agree; the paper names 20, 38 and 54
  as the sensitive layers "close to where the number of feature maps changes".
  ResNet-34 (ImageNet; blocks 3/4/6/3): stage 1 holds layers 2-6, stage 2 8-14, stage 3 16-26,
  stage 4 28-32, as in the public code's thresholds.
Rounding: presets follow the public code, which keeps int(N*(1-P)) filters; that removes one more
filter than softprune's usual floor(N*P) when N*P is not an integer (ResNet-56-A: 16 filters at
10% keep 14, not 15). With it the FLOPs reductions match the paper's Table 1 within ~1 point
(VGG-16-A 34.2%, ResNet-56-A/B 10.4/27.6%, ResNet-110-A/B 15.9/38.6%, ResNet-34-A/B 15.5/24.2%),
which is how tests/unit/pruning/test_presets.py checks the layer numbering.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    stage_rates: tuple[float, ...] = ()  # ResNets: per stage, first conv of each block
    skip: tuple[int, ...] = ()  # ResNets: layer numbers left alone
    layer_rates: dict[int, float] = field(default_factory=dict)  # VGG: layer number -> rate


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("vgg16-A", "vgg16_cifar", layer_rates={1: 0.5, **{i: 0.5 for i in range(8, 14)}}),
    Preset("resnet56-A", "resnet56", (0.1, 0.1, 0.1), (16, 20, 38, 54)),
    Preset("resnet56-B", "resnet56", (0.6, 0.3, 0.1), (16, 18, 20, 34, 38, 54)),
    Preset("resnet110-A", "resnet110", (0.5, 0.0, 0.0), (36,)),
    Preset("resnet110-B", "resnet110", (0.5, 0.4, 0.3), (36, 38, 74)),
    Preset("resnet34-A", "resnet34", (0.3, 0.3, 0.3, 0.0), (2, 8, 14, 16, 26, 28, 30, 32)),
    Preset("resnet34-B", "resnet34", (0.5, 0.6, 0.4, 0.0), (2, 8, 14, 16, 26, 28, 30, 32)),
)}


def preset_names() -> list[str]:
    return list(PRESETS)


def resolve_preset_name(name: str) -> str | None:
    """The canonical name for `name` (case-insensitive, '_' for '-'), or None if unknown."""
    key = name.lower().replace("_", "-")
    return next((p for p in PRESETS if p.lower() == key), None)


def get_preset(name: str) -> Preset:
    canonical = resolve_preset_name(name)
    if canonical is None:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[canonical]


def layer_numbers(meta) -> dict[int, str]:
    """PFEC's 1-based layer numbers: convs in forward order, projection shortcuts not counted."""
    downsample = {b.downsample for b in meta.blocks if b.downsample}
    return {i: c for i, c in enumerate((c for c in meta.convs if c not in downsample), start=1)}


def preset_rates(name: str, meta) -> dict[str, float]:
    """Conv module name -> rate for the preset on the model `meta` describes (rate-0 layers left
    out). Raises ValueError when the preset was published for another model."""
    p = get_preset(name)
    if meta.name != p.model:
        raise ValueError(f"preset {p.name!r} is for model {p.model!r}, not {meta.name!r}")
    numbers = layer_numbers(meta)
    if p.layer_rates:
        return {numbers[i]: r for i, r in sorted(p.layer_rates.items()) if r > 0}
    number_of = {c: i for i, c in numbers.items()}
    rates = {}
    for block in meta.blocks:
        first = block.convs[0]
        rate = p.stage_rates[block.stage - 1]
        if rate > 0 and number_of[first] not in p.skip:
            rates[first] = rate
    return rates
