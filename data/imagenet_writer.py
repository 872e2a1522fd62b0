"""ImageNet folders -> shuffled webdataset shards + manifest (resumable, parallel).

Every image is checked by a fast reduced-scale decode (so truncated or corrupt files are listed
in the manifest's `bad_files` instead of reaching training). Images are stored as they are,
except: non-JPEG or CMYK files are re-encoded as RGB JPEG, and with `max_side` every image whose
longer side exceeds it is downscaled and re-encoded, so training decodes fewer pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data.decode import check_decodes, open_image
from data.imagenet import scan_imagenet
from data.manifest import MANIFEST_NAME
from data.shardset_writer import PROGRESS_DIR, BadFile, Sample, ShardJob, write_shard_set

DEFAULT_SHARD_MB = 128
TAR_OVERHEAD = 1536  # two 512-byte headers plus padding per sample, roughly


def reencode(data: bytes, max_side: int | None, quality: int) -> bytes:
    """RGB JPEG of the image, its longer side capped at `max_side`."""
    img = open_image(data)
    w, h = img.size
    scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if img.format == "JPEG" and scale < 1:
        img.draft("RGB", size)  # DCT-domain reduction first: most of the downscale for free
    img = img.convert("RGB")
    if img.size != size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def prepare_image(data: bytes, max_side: int | None, quality: int) -> bytes:
    """The bytes to store for one source image; raises if it cannot be decoded."""
    w, h, fmt, mode = check_decodes(data)
    if fmt == "JPEG" and mode in ("RGB", "L") and not (max_side and max(w, h) > max_side):
        return data
    return reencode(data, max_side, quality)


def describe_error(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown format or corrupt header)"
    return f"{type(exc).__name__}: {exc}"


def sample_key(relpath: str) -> str:
    """A webdataset key from a source path: its stem, with dots (key separators) replaced."""
    return Path(relpath).stem.replace(".", "_")


@dataclass(frozen=True)
class FolderProducer:
    """Turns a job's (relative path, label, key) items into stored samples."""

    src: str
    max_side: int | None
    quality: int

    def samples(self, job: ShardJob) -> Iterator[Sample | BadFile]:
        for relpath, label, key in job.items:
            try:
                data = prepare_image((Path(self.src) / relpath).read_bytes(), self.max_side, self.quality)
            except Exception as exc:  # unreadable image: listed in the manifest, not fatal
                yield BadFile(relpath, describe_error(exc))
                continue
            yield Sample(key, data, label)


def _keys(items: list[tuple[str, int]]) -> list[str]:
    keys = [sample_key(p) for p, _ in items]
    if len(set(keys)) == len(keys):
        return keys
    # Stems repeat across class folders: fall back to the whole relative path.
    return [str(Path(p).with_suffix("")).replace("/", "__").replace(".", "_") for p, _ in items]


def plan_jobs(splits: dict[str, list[tuple[str, int]]], per_shard: int, seed: int) -> list[ShardJob]:
    """Shuffle each split with the seed and cut it into shards of `per_shard` samples."""
    jobs = []
    for split_id, (split, items) in enumerate(sorted(splits.items())):
        keyed = [(p, label, key) for (p, label), key in zip(items, _keys(items))]
        order = np.random.default_rng([seed, split_id]).permutation(len(keyed))
        shuffled = [keyed[i] for i in order]
        for n, lo in enumerate(range(0, len(shuffled), per_shard)):
            jobs.append(ShardJob(f"{split}-{n:06d}.tar", split, tuple(shuffled[lo:lo + per_shard])))
    return jobs


def estimate_per_shard(src: Path, items: list[tuple[str, int]], shard_mb: float,
                       max_side: int | None, quality: int, seed: int) -> int:
    """Samples per shard for a byte target, from the stored size of up to 64 sampled images."""
    rng = np.random.default_rng([seed, 99])
    picks = rng.choice(len(items), size=min(64, len(items)), replace=False)
    sizes = []
    for i in picks:
        try:
            sizes.append(len(prepare_image((src / items[i][0]).read_bytes(), max_side, quality)))
        except Exception:
            continue  # bad files are reported when the shards are written
    mean = (sum(sizes) / len(sizes) if sizes else 110_000) + TAR_OVERHEAD
    return max(1, int(shard_mb * 2**20 // mean))


def _previous_per_shard(out_dir: Path, requested: dict) -> int | None:
    """samples_per_shard of an earlier run with the same request, so a resume plans identically."""
    for path in (out_dir / PROGRESS_DIR / "settings.json", out_dir / MANIFEST_NAME):
        if path.is_file():
            old = json.loads(path.read_text())
            old = old.get("settings", old)
            if {k: old.get(k) for k in requested} == requested:
                return old.get("samples_per_shard")
    return None


def _plan_digest(jobs: list[ShardJob]) -> str:
    blob = json.dumps([[j.name, j.items] for j in jobs]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_imagenet_shards(src: str | Path, out_dir: str | Path, *, shard_size: int | None = None,
                          shard_mb: float | None = None, max_side: int | None = None,
                          quality: int = 90, seed: int = 0, workers: int | None = None,
                          val_labels: str | Path | None = None, progress: bool = True) -> Path:
    """Write ImageNet-layout folders under `src` as shuffled tar shards; return the manifest path.

    Shards hold `shard_size` samples, or as many as make about `shard_mb` MiB (both: the smaller;
    neither: 128 MiB). Re-running after an interruption keeps finished shards. Unreadable images
    are skipped and listed under each split's `bad_files` in the manifest.
    """
    if max_side is not None and max_side < 16:
        raise ValueError(f"max_side must be at least 16 pixels, got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    src, out_dir = Path(src).resolve(), Path(out_dir)
    classes, splits = scan_imagenet(src, val_labels)
    requested = {"kind": "imagenet", "src": str(src), "seed": seed, "shard_size": shard_size,
                 "shard_mb": shard_mb, "max_side": max_side, "quality": quality}
    per_shard = _previous_per_shard(out_dir, requested) or _per_shard(src, splits, requested)
    jobs = plan_jobs(splits, per_shard, seed)
    settings = {**requested, "samples_per_shard": per_shard, "plan": _plan_digest(jobs)}
    producer = FolderProducer(str(src), max_side, quality)
    sizes = {j.name: len(j.items) for j in jobs}
    return write_shard_set(out_dir, jobs, producer, classes, settings, sizes,
                           workers or os.cpu_count() or 1, progress)


def _per_shard(src: Path, splits, requested: dict) -> int:
    size, mb = requested["shard_size"], requested["shard_mb"]
    if size is not None and size < 1:
        raise ValueError(f"shard_size must be positive, got {size}")
    if size is not None and mb is None:
        return size
    items = splits.get("train") or next(iter(splits.values()))
    by_bytes = estimate_per_shard(src, items, mb or DEFAULT_SHARD_MB, requested["max_side"],
                                  requested["quality"], requested["seed"])
    return min(by_bytes, size) if size else by_bytes
