"""Crop geometry, fused draft decoding against a plain full-resolution reference, normalize."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from data import normalize
from data.decode import check_decodes, decode_crop, decode_full
from data.transforms import centre_crop_box, pad_crop, random_resized_crop_box


def _photo_like(w=500, h=375, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    smooth = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
    img = np.clip(128 + 90 * smooth + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_random_resized_crop_stays_inside_with_valid_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        l, t, r, b = random_resized_crop_box(500, 375, rng)
        assert 0 <= l < r <= 500 and 0 <= t < b <= 375
        area = (r - l) * (b - t) / (500 * 375)
        assert 0.07 <= area <= 1.0
        assert 3 / 4 - 0.02 <= (r - l) / (b - t) <= 4 / 3 + 0.02


def test_random_resized_crop_falls_back_to_clamped_centre_crop():
    # A 1000x10 strip: no random crop with ratio <= 4/3 and area >= 8% fits, so it centre-crops.
    l, t, r, b = random_resized_crop_box(1000, 10, np.random.default_rng(0))
    assert (b - t) == 10 and (r - l) == round(10 * 4 / 3) and l == (1000 - (r - l)) // 2


def test_centre_crop_box_is_the_resize_then_crop_square():
    assert centre_crop_box(500, 375, 0.875) == pytest.approx((85.9375, 23.4375, 414.0625, 351.5625))


def test_pad_crop_matches_numpy_pad():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    for oy in range(9):
        for ox in (0, 3, 8):
            assert np.array_equal(pad_crop(image, (oy, ox)), padded[oy:oy + 32, ox:ox + 32])


@pytest.mark.parametrize("box", [(0, 0, 500, 375), (100, 50, 300, 250), (10, 10, 120, 100)])
def test_fused_draft_decode_is_close_to_full_resolution_reference(box):
    data = _photo_like()
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").crop(box).resize((224, 224), Image.BILINEAR))
    fast = decode_crop(data, lambda w, h: box, 224)
    assert fast.shape == (224, 224, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - reference.astype(int)).mean() < 4.0
    flipped = decode_crop(data, lambda w, h: box, 224, flip=True)
    assert np.array_equal(flipped, fast[:, ::-1])


def test_draft_decodes_fewer_pixels_for_large_crops():
    data = _photo_like(1600, 1200)
    seen = {}

    def box_fn(w, h):
        seen["size"] = (w, h)
        return (0, 0, w, h)

    img = Image.open(io.BytesIO(data))
    from data.decode import _draft
    scaled = _draft(img, (0, 0, 1600, 1200), 224)
    assert img.size[0] <= 400 and scaled[2] == pytest.approx(img.size[0])  # 1/4 or 1/8 scale
    decode_crop(data, box_fn, 224)
    assert seen["size"] == (1600, 1200)  # the crop is sampled on full-resolution coordinates


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")])
def test_non_rgb_and_non_jpeg_images_decode_to_rgb(mode, fmt):
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode).save(out, format=fmt)
    assert decode_crop(out.getvalue(), lambda w, h: (0, 0, w, h), 16).shape == (16, 16, 3)
    assert decode_full(out.getvalue(), 32).shape == (32, 32, 3)
    assert check_decodes(out.getvalue())[:2] == (40, 30)


def test_check_decodes_rejects_truncated_jpeg():
    data = _photo_like(300, 200)
    with pytest.raises(OSError):
        check_decodes(data[: len(data) // 2])


def test_normalize_matches_formula_and_rejects_floats():
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = normalize(images, mean, std)
    ref = (images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    assert normalize(images, mean, std, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="uint8"):
        normalize(images.float(), mean, std)
    assert math.isclose(float(normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8), mean, std)[0, 0, 0]),
                        (1 - 0.5) / 0.2, rel_tol=1e-5)


@pytest.mark.parametrize("box", [(0, 0, 500, 120), (30, 100, 260, 300), (5, 5, 480, 370), (200, 0, 330, 60)])
@pytest.mark.parametrize("draft", [False, True])
def test_decoding_only_the_crop_rows_is_bit_identical(box, draft):
    data = _photo_like()
    limited = decode_crop(data, lambda w, h: box, 56, draft=draft, rows=True)
    everything = decode_crop(data, lambda w, h: box, 56, draft=draft, rows=False)
    assert np.array_equal(limited, everything)


def test_truncated_jpeg_still_fails_with_row_limited_decoding():
    data = _photo_like(300, 200)
    with pytest.raises(OSError):
        decode_crop(data[: len(data) * 3 // 4], lambda w, h: (0, 0, 50, 40), 32)
