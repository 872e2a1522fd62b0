"""The loader's JPEG path: SIMD libjpeg-turbo (simplejpeg) straight into the crop, torch's resize.

Per image: read the header; pick the DCT scale (1, 1/2, 1/4, 1/8: the largest reduction that
keeps the crop at least `out_size` on both sides, so the crop distribution is unchanged); make
libjpeg stop below the crop's last row; decode into a numpy array; resize the crop with torch's
uint8 antialiased bilinear kernel (AVX2; the same filter as PIL's BILINEAR), which hands back
channels-first output, so the batch needs no transpose (PIL's resize where the DCT scale leaves
the box between pixels). Measured against the PIL path (`data.decode.decode_crop`) in
benchmarks/bench_loader.py; docs/results.md, "Loader".

simplejpeg is optional: `decode_crop_chw` returns None when it is missing or cannot take the
file (not a JPEG, CMYK, a decode error), and the caller uses the PIL path. That path also
decides what is a bad sample: simplejpeg is stricter (it raises on libjpeg warnings PIL lets
pass), so its errors never reach the loader.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.transforms import Box

try:
    import simplejpeg
except ImportError:  # optional: the loader falls back to PIL
    simplejpeg = None

# JPEG colour spaces simplejpeg turns into RGB the way PIL does (CMYK/YCCK: PIL's conversion).
_COLOURSPACES = ("YCbCr", "Gray", "RGB")
_EOI = b"\xff\xd9"
_SOI = b"\xff\xd8"


def available() -> bool:
    return simplejpeg is not None


def dct_reduction(box: Box, out_size: int) -> int:
    """The largest of 1, 2, 4, 8 that leaves the crop >= out_size on both sides."""
    need = min(box[2] - box[0], box[3] - box[1]) / out_size
    return next(f for f in (8, 4, 2, 1) if need >= f or f == 1)


def _sof_height_at(data: bytes) -> int | None:
    """Offset of the image height in a baseline/extended sequential Huffman SOF (None otherwise:
    progressive and arithmetic files scan the whole image in several passes, so rows cannot be cut)."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xC0, 0xC1):
            return i + 5
        if (0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xDA:
            return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def _rows_needed(box: Box, height: int, reduce: int, out_size: int) -> int:
    """Source rows libjpeg must decode so the crop's rows come out exactly as in a full decode:
    the crop's bottom, the resize filter's reach below it (in decoded rows), and a margin for the
    chroma upsampler's context row and the MCU row in progress (8 decoded rows, >= 16 source)."""
    reach = max(1.0, (box[3] - box[1]) / reduce / out_size)
    return min(height, int(math.ceil(box[3] + reduce * (reach + 1))) + max(16, 8 * reduce))


def _cut_rows(data: bytes, rows: int) -> bytes | None:
    """The file with its declared height set to `rows`: libjpeg then decodes only those rows and
    skips the rest of the entropy data (a warning, not an error). Only for files that end with
    their end-of-image marker, so a truncated file still fails (on the PIL path)."""
    at = _sof_height_at(data)
    if at is None or not data.endswith(_EOI):
        return None
    return data[:at] + struct.pack(">H", rows) + data[at + 2:]


def decode_crop_chw(data: bytes, box_fn, out_size: int, flip: bool = False,
                    rows: bool = True, fast_dct: bool = False) -> np.ndarray | None:
    """The crop `box_fn(width, height)` of JPEG `data`, resized to out_size^2: uint8 3xSxS.

    `box_fn` gets the full-resolution size; its box is rounded to whole source pixels (train
    boxes are whole already; the val centre crop moves by under half a pixel). None: simplejpeg
    is missing or does not take this file; use `data.decode.decode_crop`. `rows=False` decodes
    every row, `fast_dct=True` uses libjpeg's fast DCT and chroma upsampling (both only for
    benchmarks/bench_loader.py, which measures what they give).
    """
    decoded = decode_for_crop(data, box_fn, out_size, rows, fast_dct)
    return None if decoded is None else resize_crop(*decoded, out_size, flip)


def decode_for_crop(data: bytes, box_fn, out_size: int, rows: bool = True,
                    fast_dct: bool = False) -> tuple[np.ndarray, Box] | None:
    """(decoded HxWx3 uint8 image, the crop box in its pixels), or None (see decode_crop_chw)."""
    if simplejpeg is None or not data.startswith(_SOI):
        return None
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colourspace not in _COLOURSPACES:
        return None
    box = tuple(float(round(v)) for v in box_fn(width, height))  # whole source pixels (val: <0.5 px)
    reduce = dct_reduction(box, out_size)
    decoded_height, strict = height, True
    if rows:
        needed = _rows_needed(box, height, reduce, out_size)
        cut = _cut_rows(data, needed) if needed < height else None
        if cut is not None:
            data, decoded_height, strict = cut, needed, False
    shape = (-(-decoded_height // reduce), -(-width // reduce))  # libjpeg rounds scaled sizes up
    try:
        image = simplejpeg.decode_jpeg(data, "RGB", fast_dct, fast_dct, min_height=shape[0],
                                       min_width=shape[1], strict=strict)
    except ValueError:
        return None
    if image.shape[:2] != shape:
        return None  # simplejpeg picked another scale than 1/reduce: let PIL do it
    return image, tuple(v / reduce for v in box)


def resize_crop(image: np.ndarray, box, out_size: int, flip: bool = False) -> np.ndarray:
    """HxWx3 uint8 `image` cropped to `box`, resized (bilinear, antialiased) to uint8 3xSxS.

    Whole-pixel boxes (every full-scale decode: train crops are sampled in whole pixels) go to
    torch's uint8 kernel, which takes no fractional box; a box that the DCT scale left between
    pixels goes to PIL's resize, which does (rounding it would move the crop's edges by up to
    half an output pixel)."""
    if all(float(v).is_integer() for v in box):
        h, w = image.shape[:2]
        left, right = _span(box[0], box[2], w)
        top, bottom = _span(box[1], box[3], h)
        crop = torch.from_numpy(np.ascontiguousarray(image[top:bottom, left:right])).permute(2, 0, 1)
        # uint8 in channels-last layout takes torch's AVX2 path; the result comes back channels-first.
        out = F.interpolate(crop[None], size=(out_size, out_size), mode="bilinear", antialias=True)[0].numpy()
    else:
        resized = Image.fromarray(image).resize((out_size, out_size), Image.Resampling.BILINEAR, box=tuple(box))
        out = np.asarray(resized).transpose(2, 0, 1)
    return out[:, :, ::-1] if flip else out


def _span(lo: float, hi: float, size: int) -> tuple[int, int]:
    a = min(max(int(round(lo)), 0), size - 1)
    return a, min(max(int(round(hi)), a + 1), size)
