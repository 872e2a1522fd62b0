"""Shard writing: ImageNet layouts with bad files, manifests that match the tars, resume, synthetic."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data import load_manifest, write_imagenet_shards, write_synthetic
from data.testing import write_imagenet_like_tree as make_tree


def read_shard(path: Path) -> list[tuple[str, bytes, int]]:
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".")[0] for name in members})
    return [(k, members[f"{k}.jpg"], int(members[f"{k}.cls"])) for k in keys]


def check_manifest_matches(out: Path) -> dict:
    manifest = load_manifest(out / "manifest.json")
    for split in manifest["splits"].values():
        for rec in split["shards"]:
            path = out / rec["name"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha256"]
            assert path.stat().st_size == rec["bytes"]
            assert len(read_shard(path)) == rec["samples"]
        assert split["samples"] == sum(r["samples"] for r in split["shards"])
    return manifest


@pytest.mark.parametrize("flat_val", [False, True])
def test_imagenet_tree_to_shards(tmp_path, flat_val):
    src = make_tree(tmp_path / "src", flat_val=flat_val)
    out = tmp_path / "out"
    write_imagenet_shards(src, out, shard_size=4, workers=2, progress=False)
    manifest = check_manifest_matches(out)
    assert manifest["classes"] == ["n01", "n02", "n03"]
    train = manifest["splits"]["train"]
    assert train["samples"] == 15 + 2  # CMYK and PNG are re-encoded, not dropped
    assert sorted(b["path"] for b in train["bad_files"]) == ["train/n01/n01_text.JPEG", "train/n02/n02_cut.JPEG"]
    assert manifest["totals"]["bad_files"] == 2 and manifest["splits"]["val"]["samples"] == 6
    samples = [s for rec in train["shards"] for s in read_shard(out / rec["name"])]
    labels = {key: label for key, _, label in samples}
    assert labels["n01_0"] == 0 and labels["n02_4"] == 1 and labels["n03_cmyk"] == 2
    assert all(Image.open(io.BytesIO(data)).format == "JPEG" for _, data, _ in samples)
    assert Image.open(io.BytesIO(dict((k, d) for k, d, _ in samples)["n03_cmyk"])).mode == "RGB"
    assert [k for k, _, _ in samples] != sorted(k for k, _, _ in samples)  # shuffled across shards
    val = [s for rec in manifest["splits"]["val"]["shards"] for s in read_shard(out / rec["name"])]
    assert sorted(label for _, _, label in val) == [0, 0, 1, 1, 2, 2]


def test_max_side_downscales_and_reencodes(tmp_path):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    write_imagenet_shards(src, out, shard_size=50, max_side=40, workers=1, progress=False)
    samples = read_shard(out / "train-000000.tar")
    sizes = [Image.open(io.BytesIO(data)).size for _, data, _ in samples]
    assert max(max(s) for s in sizes) == 40


@pytest.mark.parametrize("layout,match", [
    ({}, "neither train/ nor val/"),
    ({"train/readme.txt": b"x"}, "no class folders"),
    ({"train/n01/a.txt": b"x"}, "no images"),
    ({"val/ILSVRC2012_val_00000001.JPEG": b"x"}, "labels file"),
])
def test_wrong_layouts_are_clear_errors(tmp_path, layout, match):
    src = tmp_path / "src"
    src.mkdir()
    for rel, data in layout.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    with pytest.raises(ValueError, match=match):
        write_imagenet_shards(src, tmp_path / "out", shard_size=4, progress=False)


def test_rerun_keeps_good_shards_and_rewrites_damaged_ones(tmp_path):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    write_imagenet_shards(src, out, shard_size=4, workers=1, progress=False)
    before = (out / "manifest.json").read_text()
    damaged, kept = out / "train-000001.tar", out / "train-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    kept_stat = kept.stat()
    write_imagenet_shards(src, out, shard_size=4, workers=1, progress=False)
    assert (out / "manifest.json").read_text() == before
    assert kept.stat().st_mtime_ns == kept_stat.st_mtime_ns and kept.stat().st_ino == kept_stat.st_ino
    check_manifest_matches(out)
    with pytest.raises(ValueError, match="other settings"):
        write_imagenet_shards(src, out, shard_size=5, workers=1, progress=False)


def test_synthetic_is_deterministic_and_independent_of_workers(tmp_path):
    a = write_synthetic(tmp_path / "a", classes=4, train=60, val=20, size=16, seed=1, shard_size=25)
    b = write_synthetic(tmp_path / "b", classes=4, train=60, val=20, size=16, seed=1, shard_size=25, workers=2)
    c = write_synthetic(tmp_path / "c", classes=4, train=60, val=20, size=16, seed=2, shard_size=25)
    ma, mb, mc = (json.loads(p.read_text()) for p in (a, b, c))
    assert ma["splits"] == mb["splits"]
    assert ma["splits"]["train"]["shards"][0]["sha256"] != mc["splits"]["train"]["shards"][0]["sha256"]
    manifest = check_manifest_matches(a.parent)
    assert [r["name"] for r in manifest["splits"]["train"]["shards"]] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    labels = [label for r in manifest["splits"]["train"]["shards"] for _, _, label in read_shard(a.parent / r["name"])]
    assert sorted(set(labels)) == [0, 1, 2, 3] and max(labels.count(k) for k in range(4)) == 15


@pytest.mark.parametrize("kind", ["grating", "scenes"])
def test_a_test_split_is_held_out_and_leaves_train_and_val_as_they_were(tmp_path, kind):
    plain = write_synthetic(tmp_path / "plain", classes=4, train=30, val=12, size=16, seed=1, shard_size=10, kind=kind)
    held = write_synthetic(tmp_path / "held", classes=4, train=30, val=12, size=16, seed=1, shard_size=10,
                           kind=kind, test=20)
    mp, mh = (json.loads(p.read_text()) for p in (plain, held))
    assert "test" not in mp["splits"] and "test" not in mp["settings"]  # older sets keep their identity
    for split in ("train", "val"):
        assert mh["splits"][split] == mp["splits"][split]  # byte for byte: runs on either set agree
    assert mh["splits"]["test"]["samples"] == 20 and mh["settings"]["test"] == 20
    test = [s for r in mh["splits"]["test"]["shards"] for s in read_shard(held.parent / r["name"])]
    val = [s for r in mh["splits"]["val"]["shards"] for s in read_shard(held.parent / r["name"])]
    assert sorted(label for _, _, label in test) == [k for k in range(4) for _ in range(5)]  # balanced
    assert not {image for _, image, _ in test} & {image for _, image, _ in val}  # other images
    with pytest.raises(ValueError, match="test must be at least 0"):
        write_synthetic(tmp_path / "bad", classes=4, train=4, val=0, size=16, test=-1)


def test_synthetic_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        write_synthetic(tmp_path, classes=1, train=10, val=0, size=16)
