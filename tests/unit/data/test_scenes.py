"""The "scenes" synthetic kind: deterministic, balanced, class-structured, native at every size."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import write_synthetic
from data.scenes import FAMILIES, SHAPES, SceneTable, Style
from data.synthetic import KINDS
from launch.cli import build_parser, main


def _samples(manifest_path: Path, split: str) -> dict[str, tuple[bytes, int]]:
    """key -> (jpeg bytes, label) over every shard of `split`."""
    manifest = json.loads(manifest_path.read_text())
    out = {}
    for rec in manifest["splits"][split]["shards"]:
        with tarfile.open(manifest_path.parent / rec["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in members:
            key = name.split(".")[0]
            out[key] = (members[f"{key}.jpg"], int(members[f"{key}.cls"]))
    return out


def _renders(table: SceneTable, label: int, size: int, count: int, seed: int = 0) -> np.ndarray:
    return np.stack([table.render(label, size, np.random.default_rng([seed, label, i])) for i in range(count)])


def test_same_seed_same_bytes_whatever_the_shards_and_workers(tmp_path):
    a = write_synthetic(tmp_path / "a", classes=5, train=60, val=20, size=32, seed=3, shard_size=25, kind="scenes")
    b = write_synthetic(tmp_path / "b", classes=5, train=60, val=20, size=32, seed=3, shard_size=7, workers=2,
                        kind="scenes")
    c = write_synthetic(tmp_path / "c", classes=5, train=60, val=20, size=32, seed=4, shard_size=25, kind="scenes")
    for split in ("train", "val"):
        sa, sb, sc = _samples(a, split), _samples(b, split), _samples(c, split)
        assert len(sa) == (60 if split == "train" else 20)
        assert sa == sb
        assert sum(sa[k][0] != sc[k][0] for k in sa) == len(sa)  # another seed: every image differs
    assert json.loads(a.read_text())["settings"]["kind"] == "scenes"


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_dtype_and_balance(tmp_path, size):
    manifest = write_synthetic(tmp_path / "s", classes=7, train=100, val=14, size=size, seed=0, kind="scenes")
    samples = _samples(manifest, "train")
    counts = Counter(label for _, label in samples.values())
    assert sorted(counts) == list(range(7)) and set(counts.values()) == {14, 15}
    assert Counter(label for _, label in _samples(manifest, "val").values()) == {c: 2 for c in range(7)}
    for jpeg, _ in list(samples.values())[:5]:
        image = np.asarray(Image.open(io.BytesIO(jpeg)))
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert image.std() > 10  # a scene, not a flat colour
    raw = SceneTable.make(7, 0).render(3, size, np.random.default_rng(0))
    assert raw.shape == (size, size, 3) and raw.dtype == np.uint8


def test_no_single_cue_names_the_class_but_the_combination_does():
    table = SceneTable.make(10, 0)
    shapes = Counter(c.shape for c in table.classes)
    families = Counter(c.family for c in table.classes)
    assert min(shapes.values()) >= 2 and min(families.values()) >= 2
    assert len({(c.family, c.shape) for c in table.classes}) == 10
    assert set(shapes) <= set(range(len(SHAPES))) and set(families) <= set(range(len(FAMILIES)))


@pytest.mark.parametrize("classes", [10, 13, 20])
def test_hue_neighbours_differ_in_texture_and_shape(classes):
    """A colour jittered into the neighbouring class's hue still leaves two cues to tell them apart."""
    by_hue = sorted(SceneTable.make(classes, 5).classes, key=lambda c: c.hue)
    for a, b in zip(by_hue, by_hue[1:] + by_hue[:1]):
        assert a.family != b.family and a.shape != b.shape
    hues = np.array(sorted(c.hue for c in by_hue))
    assert np.allclose(np.diff(hues), 1 / classes)  # evenly spread around the circle


@pytest.mark.parametrize("classes", [2, 3, 13, 40])
def test_any_number_of_classes_renders(classes):
    table = SceneTable.make(classes, 1)
    assert len(table.classes) == classes
    for label in (0, classes - 1):
        assert table.render(label, 16, np.random.default_rng(label)).shape == (16, 16, 3)


def _statistics(images: np.ndarray) -> np.ndarray:
    """Per image: the hue histogram of its saturated pixels (where the objects' colours show) and
    the histogram of its gradient orientations weighted by magnitude (textures, edges)."""
    x = images.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = (np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b) / (2 * np.pi)) % 1
    saturated = x.max(-1) - x.min(-1) > 80
    hues = np.stack([np.histogram(h[m], bins=12, range=(0, 1))[0] / max(1, m.sum()) for h, m in zip(hue, saturated)])
    grey = x.mean(-1)
    gx, gy = grey[:, 1:-1, 2:] - grey[:, 1:-1, :-2], grey[:, 2:, 1:-1] - grey[:, :-2, 1:-1]
    angles, weights = np.arctan2(gy, gx) % np.pi, np.hypot(gx, gy)
    edges = np.stack([np.histogram(a, bins=8, range=(0, np.pi), weights=w)[0] for a, w in zip(angles, weights)])
    return np.concatenate([hues, edges / edges.sum(1, keepdims=True)], 1)


def test_classes_differ_but_simple_statistics_do_not_solve_them():
    """A nearest-class-mean classifier on colour and edge-orientation histograms, fit on 50 scenes
    per class, names the class of held-out scenes far above chance (classes differ) but far from
    always: colour and orientation tendencies alone do not solve the set (0.66 as calibrated; with
    every object coloured from its class it reaches 0.78, and 0.94 without hue jitter as well)."""
    table, fit, held = SceneTable.make(10, 0), 50, 30
    stats = [_statistics(_renders(table, c, 32, fit + held)) for c in range(10)]
    means = np.stack([s[:fit].mean(0) for s in stats])
    scale = np.concatenate([s[:fit] for s in stats]).std(0) + 1e-3
    correct = sum(int((np.abs((s[fit:, None] - means[None]) / scale).sum(-1).argmin(1) == c).sum())
                  for c, s in enumerate(stats))
    accuracy = correct / (10 * held)
    assert 0.3 < accuracy < 0.75, accuracy


def _gradient_energy(images: np.ndarray) -> float:
    x = images.astype(np.float32)
    # Squared, not absolute: blur spreads a step over more pixels, which keeps the sum of |steps|
    # (total variation) but lowers the sum of squares.
    return float((np.diff(x, axis=1) ** 2).mean() + (np.diff(x, axis=2) ** 2).mean())


def test_64_px_is_rendered_not_upsampled():
    """Without pixel noise, a 64 px scene has sharper edges and finer texture than the same scene
    drawn at 32 px and upsampled: its pixel-to-pixel gradients are clearly larger."""
    table = SceneTable.make(10, 0, Style(noise=(0.0, 0.0)))
    big = np.concatenate([_renders(table, c, 64, 6) for c in range(10)])
    small = np.concatenate([_renders(table, c, 32, 6) for c in range(10)])
    upsampled = np.stack([np.asarray(Image.fromarray(s).resize((64, 64), Image.BILINEAR)) for s in small])
    # Same scenes (same draws): the 64 px ones agree with the upsampled 32 px ones on average...
    assert abs(float(big.astype(np.float32).mean()) - float(upsampled.astype(np.float32).mean())) < 2
    # ... but carry detail the upsampled ones lack.
    assert _gradient_energy(big) > 1.3 * _gradient_energy(upsampled)


def test_bad_kind_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of grating, scenes, got 'scene'"):
        write_synthetic(tmp_path / "x", classes=3, train=4, val=0, size=16, kind="scene")
    assert not (tmp_path / "x").exists()


def test_grating_default_settings_unchanged(tmp_path):
    manifest = write_synthetic(tmp_path / "g", classes=3, train=6, val=3, size=16)
    assert json.loads(manifest.read_text())["settings"]["kind"] == "synthetic"


def test_cli_writes_scenes_and_refuses_a_bad_kind(tmp_path, capsys):
    assert main(["shards", "synthetic", str(tmp_path / "s"), "--kind", "scenes", "--classes", "4", "--train", "20",
                 "--val", "8", "--size", "32", "--shard-size", "10", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["settings"]["kind"] == "scenes" and manifest["totals"]["samples"] == 28
    assert manifest["num_classes"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "synthetic", str(tmp_path / "t"), "--kind", "noise", "--classes", "4", "--train", "20",
              "--val", "8", "--size", "32"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--kind" in err[-1] and "'noise'" in err[-1] and "scenes" in err[-1]
    assert not (tmp_path / "t").exists()


def test_cli_kind_choices_are_the_writers():
    shards = build_parser("shards")._subparsers._group_actions[0].choices["shards"]
    synthetic = shards._subparsers._group_actions[0].choices["synthetic"]
    kind = next(a for a in synthetic._actions if a.dest == "kind")
    assert tuple(kind.choices) == KINDS and kind.default == "grating"


def test_a_style_override_changes_the_images_and_is_recorded(tmp_path):
    """docs/results.md was measured on scenes with colour a reliable cue: `style` reproduces that
    set, and its manifest says so (a default set is not mistaken for it)."""
    older = {"rotation_jitter": 0.2, "hue_jitter": 0.03, "random_colour": 0.05}
    a = write_synthetic(tmp_path / "a", classes=4, train=16, val=4, size=16, seed=0, shard_size=8, kind="scenes")
    b = write_synthetic(tmp_path / "b", classes=4, train=16, val=4, size=16, seed=0, shard_size=8, kind="scenes",
                        style=older)
    sa, sb = _samples(a, "train"), _samples(b, "train")
    assert sum(sa[k][0] != sb[k][0] for k in sa) > len(sa) // 2
    assert json.loads(b.read_text())["settings"]["style"] == older
    assert "style" not in json.loads(a.read_text())["settings"]
