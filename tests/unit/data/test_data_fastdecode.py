"""The loader's simplejpeg path (data.fastdecode) against the plain PIL pipeline at the same crop.

What must hold: a 3xSxS uint8 image of the right region (a known colour layout, compared with a
full PIL decode + crop + bilinear resize of the same box); the DCT scale is the largest that
keeps the crop >= the output size; cutting the rows below the crop changes no pixel; files it
does not take (truncated, CMYK, PNG) go to PIL, with the same crop; and with simplejpeg missing
the real loader (spawned worker) runs on PIL. Nothing here is timed (benchmarks/bench_loader.py).
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataConfig, fastdecode, make_train_loader, write_synthetic
from data.fastdecode import decode_crop_chw, decode_for_crop, dct_reduction
from data.stream import ImageTransform, StreamSpec
from data.testing import in_process_batches
from data.transforms import centre_crop_box, random_resized_crop_box

ROOT = Path(__file__).resolve().parents[3]


def _grid_jpeg(w: int, h: int, cells=(10, 8), quality=92, seed=0, **save) -> bytes:
    """Flat cells of distinct colours plus a gentle gradient: a crop's content tells where it is."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(20, 236, (cells[1], cells[0], 3))
    ys, xs = np.arange(h) * cells[1] // h, np.arange(w) * cells[0] // w
    img = colours[ys[:, None], xs[None, :]].astype(np.float32)
    img += (np.arange(w)[None, :, None] / w) * 20 - 10
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality, **save)
    return out.getvalue()


def _naive(data: bytes, box, size: int) -> np.ndarray:
    """Full decode, crop, resize: the torchvision-style reference, as 3xSxS."""
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR, box=box)
    return np.asarray(img).transpose(2, 0, 1)


def _err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# (image size, crop box, expected DCT reduction at 224 px out)
CASES = [((500, 375), (0, 0, 500, 375), 1),
         ((500, 375), (120, 40, 330, 250), 1),      # upsampled crop
         ((500, 375), (300, 200, 390, 290), 1),
         ((1200, 900), (100, 50, 700, 600), 2),     # 600x550 -> 1/2
         ((2000, 1600), (37, 91, 1937, 1591), 4),   # 1900x1500 -> 1/4
         ((2000, 1900), (0, 0, 2000, 1900), 8)]     # 2000x1900 -> 1/8


@pytest.mark.parametrize("size,box,reduce", CASES)
def test_fast_path_gives_the_naive_crop_within_jpeg_tolerance(size, box, reduce):
    data = _grid_jpeg(*size)
    assert dct_reduction(box, 224) == reduce
    fast = decode_crop_chw(data, lambda w, h: box, 224)
    assert fast.shape == (3, 224, 224) and fast.dtype == np.uint8
    reference = _naive(data, box, 224)
    err = _err(fast, reference)
    assert err < 1.5, err  # mean |difference| in 0..255 units (at full scale: nearly bit-equal)
    # The tolerance tells regions apart: the box with its left edge 3% further in is far off.
    moved = _naive(data, (box[0] + round(0.03 * (box[2] - box[0])), *box[1:]), 224)
    assert _err(fast, moved) > 4 * err + 1.0


def test_flip_mirrors_the_same_crop():
    data = _grid_jpeg(500, 375)
    box = (50, 60, 350, 300)
    plain = decode_crop_chw(data, lambda w, h: box, 96)
    assert np.array_equal(decode_crop_chw(data, lambda w, h: box, 96, flip=True), plain[:, :, ::-1])


@pytest.mark.parametrize("size,box,reduce", CASES)
def test_dct_scale_keeps_the_crop_at_least_the_output_size(size, box, reduce):
    image, scaled = decode_for_crop(_grid_jpeg(*size), lambda w, h: box, 224, rows=False)
    assert image.shape[:2] == (-(-size[1] // reduce), -(-size[0] // reduce))
    assert scaled == pytest.approx([v / reduce for v in box])
    if reduce > 1:  # a reduced decode still holds the crop at >= the output size
        assert min(scaled[2] - scaled[0], scaled[3] - scaled[1]) >= 224
    if reduce < 8:  # and it is the largest such scale: twice the reduction would go below
        assert min(box[2] - box[0], box[3] - box[1]) / (2 * reduce) < 224


@pytest.mark.parametrize("save", [{}, {"subsampling": 0}, {"restart_marker_rows": 1}, {"mode": "L"}],
                         ids=["420", "444", "restart-markers", "grey"])
@pytest.mark.parametrize("box", [(0, 0, 500, 120), (30, 100, 260, 300), (200, 0, 330, 60), (5, 5, 480, 370)])
@pytest.mark.parametrize("size", [(500, 375), (1600, 1200)])
def test_cutting_the_rows_below_the_crop_changes_no_pixel(save, box, size):
    scale = size[0] / 500
    box = tuple(v * scale for v in box)
    save = dict(save)
    mode = save.pop("mode", "RGB")
    img = Image.open(io.BytesIO(_grid_jpeg(*size))).convert(mode)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90, **save)
    data = out.getvalue()
    cut = decode_for_crop(data, lambda w, h: box, 56, rows=True)[0]
    whole = decode_for_crop(data, lambda w, h: box, 56, rows=False)[0]
    assert cut.shape[0] < whole.shape[0] or box[3] >= size[1] - 40 * scale  # rows were cut
    assert np.array_equal(cut, whole[:cut.shape[0]])
    assert np.array_equal(decode_crop_chw(data, lambda w, h: box, 56, rows=True),
                          decode_crop_chw(data, lambda w, h: box, 56, rows=False))


def test_progressive_jpeg_decodes_whole_and_right():
    data = _grid_jpeg(500, 375, progressive=True)
    box = (10, 10, 200, 150)
    assert fastdecode._cut_rows(data, 200) is None  # its scans cover every row: nothing to cut
    assert _err(decode_crop_chw(data, lambda w, h: box, 64), _naive(data, box, 64)) < 1.5


def test_files_it_does_not_take_go_to_pil():
    data = _grid_jpeg(300, 200)
    assert decode_crop_chw(data[: len(data) * 3 // 4], lambda w, h: (0, 0, 50, 40), 32) is None  # truncated
    assert fastdecode._cut_rows(data[:-2], 50) is None  # no end-of-image marker: rows are not cut
    for mode, fmt in (("CMYK", "JPEG"), ("RGB", "PNG")):
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).convert(mode).save(out, format=fmt)
        assert decode_crop_chw(out.getvalue(), lambda w, h: (0, 0, w, h), 16) is None


def _spec(**kw) -> StreamSpec:
    base = dict(train=True, batch_size=4, image_size=64, transform="imagenet", crop_fraction=0.875,
                shuffle_buffer=1, seed=0, epoch=0, rank=0, max_bad_fraction=1.0, shard_counts={},
                num_classes=None)
    return StreamSpec(**{**base, **kw})


@pytest.mark.parametrize("train", [True, False])
def test_both_paths_draw_the_same_crops_and_flips_as_the_naive_pipeline(train):
    """Replaying the generator gives each image's box and flip; both paths match the naive
    pipeline at that box and flip, and consume the generator alike."""
    fast, pil = ImageTransform(_spec(train=train)), ImageTransform(_spec(train=train, fast_decode=False))
    assert fast.fast and not pil.fast
    rngs = [np.random.default_rng(3) for _ in range(3)]
    errs = {"fast": [], "pil": []}
    for seed in range(16):
        data = _grid_jpeg(500, 375, seed=seed)
        if train:
            flip = bool(rngs[2].random() < 0.5)
            box = random_resized_crop_box(500, 375, rngs[2])
        else:
            flip, box = False, tuple(round(v) for v in centre_crop_box(500, 375, 0.875))
        reference = _naive(data, box, 64)
        reference = reference[:, :, ::-1] if flip else reference
        for name, transform, rng in (("fast", fast, rngs[0]), ("pil", pil, rngs[1])):
            out = transform(data, rng)
            assert out.shape == (3, 64, 64) and out.dtype == np.uint8
            errs[name].append(_err(out, reference))
    assert rngs[0].random() == rngs[1].random() == rngs[2].random()
    # sharp-edged cells at 64 px: the DCT-scaled decodes differ a little from a full decode
    assert np.mean(errs["fast"]) < 1.2 and max(errs["fast"]) < 2.5, errs["fast"]
    assert np.mean(errs["pil"]) < 1.6 and max(errs["pil"]) < 2.5, errs["pil"]


def test_transform_samples_the_box_once_when_the_fast_path_gives_up():
    # An RST marker in the middle of the entropy data: libjpeg warns, simplejpeg (strict) gives up
    # after the crop was sampled, PIL decodes it (as it always did). Too few rows to cut any.
    data = _grid_jpeg(64, 16)
    at = data.index(b"\xff\xda") + 24
    data = data[:at] + b"\xff\xd3" + data[at + 2:]
    assert decode_crop_chw(data, lambda w, h: (0, 0, w, h), 16) is None
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    fast = ImageTransform(_spec(image_size=16))(data, rng)
    pil = ImageTransform(_spec(image_size=16, fast_decode=False))(data, ref)
    assert np.array_equal(fast, pil)  # the same box, decoded by PIL
    assert rng.random() == ref.random()


def test_truncated_jpeg_is_still_an_error_on_the_loader_path():
    data = _grid_jpeg(300, 200)
    with pytest.raises(OSError):
        ImageTransform(_spec())(data[: len(data) * 3 // 4], np.random.default_rng(0))


# ---- the real loader, with worker processes ---------------------------------------------------

FALLBACK_SCRIPT = """
import sys
import torch
from data import DataConfig, fastdecode, make_train_loader

if __name__ == "__main__":  # the spawned worker imports this file again
    assert not fastdecode.available(), "simplejpeg should be hidden"
    cfg = DataConfig(train=sys.argv[1], image_size=48, batch_size=8, num_workers=1, shuffle_buffer=16,
                     prefetch_factor=1)
    loader = make_train_loader(cfg, 0, 1)
    loader.set_epoch(1)
    batches = list(loader)
    loader.close()
    torch.save(batches, sys.argv[2])
"""


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("textured")
    return str(write_synthetic(out, classes=4, train=32, val=8, size=96, shard_size=16))


def _loader(src: str, workers: int):
    cfg = DataConfig(train=src, image_size=48, batch_size=8, num_workers=workers, shuffle_buffer=16,
                     prefetch_factor=1)
    return make_train_loader(cfg, 0, 1)


def _pil_reference(src: str) -> list[tuple]:
    loader = _loader(src, 1)
    loader._planner = dataclasses.replace(
        loader._planner, spec=dataclasses.replace(loader._planner.spec, fast_decode=False))
    return in_process_batches(loader, 1)


def test_spawned_worker_batches_equal_in_process_ones_on_the_fast_path(textured):
    loader = _loader(textured, 1)
    loader.set_epoch(1)
    try:
        from_worker = list(loader)
    finally:
        loader.close()
    in_process = in_process_batches(_loader(textured, 1), 1)
    assert len(from_worker) == len(in_process) == 4
    for (xw, yw), (xi, yi) in zip(from_worker, in_process):
        assert xw.shape == (8, 3, 48, 48) and xw.dtype == torch.uint8 and xw.is_contiguous()
        assert torch.equal(yw, yi) and torch.equal(xw, xi)
    pil = _pil_reference(textured)
    assert not all(torch.equal(x, p) for (x, _), (p, _) in zip(from_worker, pil))  # really the fast path
    assert all(_err(x.numpy(), p.numpy()) < 1.5 for (x, _), (p, _) in zip(from_worker, pil))


def test_without_simplejpeg_the_loader_falls_back_to_pil(textured, tmp_path):
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "simplejpeg.py").write_text("raise ImportError('hidden by the fallback test')\n")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(FALLBACK_SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(ROOT)])}  # spawned workers too
    out = tmp_path / "batches.pt"
    proc = subprocess.run([sys.executable, str(script), textured, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, reference = torch.load(out), _pil_reference(textured)
    assert len(got) == len(reference) == 4
    for (x, y), (xr, yr) in zip(got, reference):
        assert torch.equal(y, yr) and torch.equal(x, xr)
