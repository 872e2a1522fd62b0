"""Augmentation geometry (no torchvision) and `normalize`, which runs where the model runs.

Geometry is sampled here as plain numbers from a numpy Generator; `data.decode` applies it while
decoding, so a crop never costs a full-resolution resize.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """A crop of random area fraction (`scale`) and aspect ratio (`ratio`, log-uniform).

    The same sampling as the usual RandomResizedCrop: up to 10 tries to fit the crop inside the
    image, then a centre crop with the aspect ratio clamped to `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    return _clamped_centre_crop(width, height, ratio)


def _clamped_centre_crop(width: int, height: int, ratio: tuple[float, float]) -> Box:
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def centre_crop_box(width: int, height: int, crop_fraction: float = 0.875) -> Box:
    """The square that 'resize the short side to S / crop_fraction, centre-crop S' keeps."""
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def pad_crop_offsets(rng: np.random.Generator, pad: int = 4) -> tuple[int, int]:
    """CIFAR-style random crop after zero padding: offsets into the padded image."""
    return int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))


def pad_crop(image: np.ndarray, offsets: tuple[int, int], pad: int = 4) -> np.ndarray:
    """Crop of `image` (HxWxC) padded with `pad` zeros, at `offsets` into the padded image."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    dy, dx = offsets[0] - pad, offsets[1] - pad  # shift of the crop relative to the image
    ys, yd = max(dy, 0), max(-dy, 0)
    xs, xd = max(dx, 0), max(-dx, 0)
    hh, ww = h - abs(dy), w - abs(dx)
    out[yd:yd + hh, xd:xd + ww] = image[ys:ys + hh, xs:xs + ww]
    return out


def normalize(images, mean: Sequence[float], std: Sequence[float], dtype=None):
    """uint8 images [..., 3, H, W] -> float (x / 255 - mean) / std, on the images' device.

    Meant for the training process (after the uint8 batch has reached the device): moving uint8
    costs 4x less bandwidth than float32, and the loader workers skip the float pass entirely.
    `mean` and `std` are in 0..1 units.
    """
    import torch

    if images.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images.dtype}")
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W], got shape {tuple(images.shape)}")
    dtype = dtype or torch.float32
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    out = images.to(torch.float32).mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)
    return out.to(dtype)
