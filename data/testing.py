"""Helpers for tests that need real shards whose samples can be told apart.

`write_indexed_shards` writes tar shards where sample i of the split carries label i, so a test
can recover exactly which samples a loader delivered (on any rank, in any order) from the labels.
`in_process_batches` plays a loader's epoch without worker processes, as the reference that any
start method and any history of the workers must reproduce.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from data.manifest import MANIFEST_NAME, build_manifest, write_json_atomic
from data.shardset_writer import Sample, write_tar


def tiny_jpeg(index: int, size: int = 8) -> bytes:
    """A small JPEG whose flat colour depends on `index`."""
    colour = np.array([index * 37 % 256, index * 91 % 256, index * 13 % 256], dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.broadcast_to(colour, (size, size, 3)).copy()).save(out, format="JPEG", quality=95)
    return out.getvalue()


def write_indexed_shards(out_dir: str | Path, counts: dict[str, list[int]], size: int = 8,
                         broken: set[int] = frozenset()) -> Path:
    """Shards `{split}-{n:06d}.tar` with counts[split][n] samples; label = index within the split.

    Indices in `broken` get bytes that are not an image. Returns the manifest path; the class
    list has one entry per sample of the largest split so every label is in range.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, shard_counts in counts.items():
        records, first = [], 0
        for n, count in enumerate(shard_counts):
            samples = [Sample(f"{split}_{i:07d}", b"\xff\xd8garbage" if i in broken else tiny_jpeg(i, size), i)
                       for i in range(first, first + count)]
            name = f"{split}-{n:06d}.tar"
            got, nbytes, sha = write_tar(out_dir / name, samples)
            records.append({"name": name, "samples": got, "bytes": nbytes, "sha256": sha})
            first += count
        splits[split] = {"shards": records}
    classes = [f"id{i}" for i in range(max(sum(c) for c in counts.values()))]
    path = out_dir / MANIFEST_NAME
    write_json_atomic(path, build_manifest(classes, splits, {"kind": "indexed"}))
    return path


def _jpeg(rng, w=64, h=48, mode="RGB", fmt="JPEG") -> bytes:
    img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, quality=90)
    return out.getvalue()


def write_imagenet_like_tree(root: Path, wnids=("n02", "n01", "n03"), per_class=5, flat_val=False) -> Path:
    """A small ILSVRC-style tree: train/<wnid>/*.JPEG with an unreadable file, a truncated JPEG,
    a CMYK JPEG and a PNG named .JPEG; val/ as class folders or flat with Kaggle's CSV labels."""
    rng = np.random.default_rng(0)
    for wnid in wnids:
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(per_class):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(rng, 80 + i, 60))
    (root / "train" / "n01" / "n01_text.JPEG").write_bytes(b"this is not an image")
    good = _jpeg(rng, 120, 90)
    (root / "train" / "n02" / "n02_cut.JPEG").write_bytes(good[: len(good) // 2])
    (root / "train" / "n03" / "n03_cmyk.JPEG").write_bytes(_jpeg(rng, mode="CMYK"))
    (root / "train" / "n03" / "n03_png.JPEG").write_bytes(_jpeg(rng, fmt="PNG"))
    (root / "train" / "n03" / "notes.txt").write_text("ignored")
    val = root / "val"
    val.mkdir()
    for i, wnid in enumerate(sorted(wnids) * 2):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        target = val if flat_val else val / wnid
        target.mkdir(exist_ok=True)
        (target / name).write_bytes(_jpeg(rng, 70, 70))
    if flat_val:
        rows = [f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4" for i, w in enumerate(sorted(wnids) * 2)]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return root


def in_process_batches(loader, epoch: int) -> list[tuple]:
    """Epoch `epoch` of `loader` played in this process, its logical workers interleaved the way
    the DataLoader interleaves them (batch j from worker j % W): exactly what the loader itself
    must yield for that epoch, with worker processes or without."""
    stream = loader._planner.stream(epoch, 0)
    workers = [stream.worker_batches(w) for w in range(loader.num_workers)]
    out = []
    for j in range(len(loader)):
        images, labels, valid, _ = next(workers[j % len(workers)])
        out.append((images, labels) if loader.train else (images, labels, valid))
    return out
