"""JPEG decoding fused with the crop, with PIL: decode only as many pixels as the crop needs.

The loader's path for what `data.fastdecode` (simplejpeg) does not take: everything where
simplejpeg is not installed, and non-JPEG, CMYK or damaged files where it is.

libjpeg can decode at 1/2, 1/4 or 1/8 scale inside the inverse DCT (PIL's `draft`), which is far
cheaper than decoding at full size and resizing afterwards. We pick that scale per crop: the
largest reduction that still leaves the crop at least as large as the output. libjpeg also emits
rows top to bottom, so we stop it below the crop's last row (the rows under the crop are never
entropy-decoded). The crop and the resize are then one `Image.resize(box=...)` call, and the
result stays uint8. Each step can be switched off, which is how benchmarks/bench_loader.py
measures what it gives.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFile

from data.transforms import Box

RESAMPLE = Image.Resampling.BILINEAR


def open_image(data: bytes) -> Image.Image:
    """Parse the header only (no pixels decoded yet)."""
    return Image.open(io.BytesIO(data))


def _draft(img: Image.Image, box: Box, out_size: int) -> Box:
    """Ask libjpeg for the cheapest DCT scale that keeps the crop >= out_size; rescale `box`."""
    width, height = img.size
    reduce = min((box[2] - box[0]) / out_size, (box[3] - box[1]) / out_size)
    if reduce < 2 or img.format != "JPEG":
        return box
    img.draft("RGB", (int(width / reduce) + 1, int(height / reduce) + 1))
    sx, sy = img.size[0] / width, img.size[1] / height
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _load_rows(img: Image.Image, data: bytes, box: Box, out_size: int) -> None:
    """Decode only the rows down to the crop's bottom (plus the resampling filter's reach).

    PIL has no API for this, so we shorten the JPEG tile and image height before loading; libjpeg
    then complains that too few scanlines were read, which LOAD_TRUNCATED_IMAGES tolerates. That
    flag would also hide a truly truncated file, so files without their end-of-image marker take
    the normal path (where truncation raises). The rows kept are bit-identical to a full decode.
    """
    width, height = img.size
    reach = max(1.0, (box[3] - box[1]) / out_size)  # bilinear support in source rows
    rows = min(height, int(math.ceil(box[3] + reach)) + 1)
    tile = img.tile[0] if len(img.tile) == 1 else None
    if rows >= height or img.format != "JPEG" or tile is None or not data.endswith(b"\xff\xd9"):
        img.load()
        return
    img.tile = [tile._replace(extents=(0, 0, width, rows))]
    img._size = (width, rows)
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # workers are single-threaded: the toggle is local
    try:
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def decode_crop(data: bytes, box_fn, out_size: int, flip: bool = False,
                draft: bool = True, fused: bool = True, rows: bool = True) -> np.ndarray:
    """Decode `data` and return the crop `box_fn(width, height)` resized to out_size^2, uint8 HxWx3.

    `box_fn` receives the full-resolution size (known from the header before decoding).
    `draft=False` decodes at full resolution; `rows=False` decodes every row; `fused=False` crops,
    then resizes, as two steps.
    """
    img = open_image(data)
    box = box_fn(*img.size)
    if draft:
        box = _draft(img, box, out_size)
    if rows:
        _load_rows(img, data, box, out_size)
    if fused:
        img = img.resize((out_size, out_size), RESAMPLE, box=box)
    else:
        img = img.crop(tuple(int(round(v)) for v in box)).resize((out_size, out_size), RESAMPLE)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_rgb_array(img)


def decode_full(data: bytes, size: int | None = None) -> np.ndarray:
    """Decode the whole image (resized to size^2 if it is not already that size), uint8 HxWx3."""
    img = open_image(data)
    if size is not None and img.size != (size, size):
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = img.resize((size, size), RESAMPLE)
    return _to_rgb_array(img)


def check_decodes(data: bytes) -> tuple[int, int, str, str]:
    """Decode fully at 1/8 scale (every entropy-coded byte is still parsed, so truncation and
    corruption are caught at a fraction of a full decode's cost); return (w, h, format, mode)."""
    img = open_image(data)
    size, fmt, mode = img.size, img.format, img.mode
    if fmt == "JPEG":
        img.draft(img.mode if img.mode in ("RGB", "L") else None, (size[0] // 8, size[1] // 8))
    img.load()
    return size[0], size[1], fmt or "", mode
