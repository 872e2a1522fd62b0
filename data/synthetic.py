"""Synthetic shards in the ImageNet shard format, learnable but not trivially.

Each class owns a grating orientation, a spatial frequency and a colour, all drawn from the seed.
Every image is that class's grating (with jittered orientation, frequency, phase and contrast)
plus a fainter grating of a random other class, a random brightness offset, and pixel noise. A
small CNN separates the classes within a few epochs, but the jitter and the distractor keep it
from being perfect at once. Image i of a split depends only on (seed, split, i), so the data is
identical for a seed whatever the shard size or number of writer processes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.scenes import SCENES_VERSION, SceneTable, Style
from data.shardset_writer import Sample, ShardJob, write_shard_set

# "test" is a held-out split from the same classes and distribution: a set with one scores a
# finished model on images no run ever saw, neither in training nor in picking what it ships.
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# "grating": this module's gratings; "scenes": textured shapes among clutter (data/scenes.py).
KINDS = ("grating", "scenes")


@dataclass(frozen=True)
class ClassTable:
    theta: np.ndarray   # grating orientation per class (radians)
    freq: np.ndarray    # cycles per image side per class
    color: np.ndarray   # [K, 3] colour direction per class

    @staticmethod
    def make(classes: int, seed: int) -> "ClassTable":
        rng = np.random.default_rng([seed, 0xC1A55])
        # Orientations evenly spread (shuffled) so that no two classes are identical.
        theta = rng.permutation(classes) * math.pi / classes + rng.uniform(0, math.pi / classes)
        freq = rng.uniform(1.5, 4.0, classes)
        color = rng.uniform(-1, 1, (classes, 3))
        color /= np.linalg.norm(color, axis=1, keepdims=True)
        return ClassTable(theta, freq, color)


def _grating(size: int, theta: float, freq: float, phase: float) -> np.ndarray:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = coords[None, :], coords[:, None]
    return np.sin(2 * math.pi * freq * (x * math.cos(theta) + y * math.sin(theta)) + phase)


def render(label: int, table: ClassTable, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [size, size, 3] image of class `label`."""
    k = len(table.theta)
    main = _grating(size, table.theta[label] + rng.normal(0, 0.15),
                    table.freq[label] * rng.uniform(0.85, 1.15), rng.uniform(0, 2 * math.pi))
    other = int((label + rng.integers(1, k)) % k) if k > 1 else label
    distractor = _grating(size, table.theta[other], table.freq[other], rng.uniform(0, 2 * math.pi))
    contrast = rng.uniform(0.15, 0.35)
    image = (0.5 + rng.uniform(-0.12, 0.12)
             + contrast * main[..., None] * table.color[label]
             + contrast * rng.uniform(0.2, 0.6) * distractor[..., None] * table.color[other]
             + rng.normal(0, 0.12, (size, size, 3)))
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def labels_for(split: str, count: int, classes: int, seed: int) -> np.ndarray:
    """Balanced labels (every class count // classes or one more times), in seeded order."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 0x1AB])
    return rng.permutation(np.arange(count) % classes)


@dataclass(frozen=True)
class SyntheticProducer:
    classes: int
    size: int
    seed: int
    quality: int
    kind: str = "grating"
    style: tuple[tuple[str, float], ...] = ()  # scenes: Style fields that differ from the defaults

    def samples(self, job: ShardJob) -> Iterator[Sample]:
        split, lo, hi, total = job.items
        draw = self._painter()
        labels = labels_for(split, total, self.classes, self.seed)
        for i in range(lo, hi):
            rng = np.random.default_rng([self.seed, SPLIT_IDS[split], i])
            out = io.BytesIO()
            Image.fromarray(draw(int(labels[i]), rng)).save(out, format="JPEG", quality=self.quality)
            yield Sample(f"{split}_{i:08d}", out.getvalue(), int(labels[i]))

    def _painter(self):
        """(label, rng) -> uint8 image of this producer's kind."""
        if self.kind == "scenes":
            scenes = SceneTable.make(self.classes, self.seed, Style(**dict(self.style)))
            return lambda label, rng: scenes.render(label, self.size, rng)
        table = ClassTable.make(self.classes, self.seed)
        return lambda label, rng: render(label, table, self.size, rng)


def write_synthetic(out_dir: str | Path, classes: int, train: int, val: int, size: int, seed: int = 0,
                    shard_size: int = 1000, quality: int = 90, workers: int = 1,
                    progress: bool = False, kind: str = "grating", style: dict | None = None,
                    test: int = 0) -> Path:
    """Write `train` + `val` (+ `test`) synthetic images of `size` px in `classes` classes; return
    the manifest path.

    `kind` is "grating" (this module's gratings) or "scenes" (data/scenes.py, the harder dev set);
    `style` overrides fields of the scenes' `Style` (recorded in the manifest's settings).
    Same layout as ImageNet shards (`train-000000.tar`, ..., `val-000000.tar`, `manifest.json`).
    `test` > 0 adds a held-out "test" split (`test-000000.tar`, ...); the train and val images
    do not depend on it, so a set written with a test split holds the same train and val shards
    as one written without. Running it again on a finished directory with the same arguments
    only re-verifies it.
    """
    _check_synthetic_args(classes, train, val, size, shard_size, quality)
    if test < 0:
        raise ValueError(f"test must be at least 0, got {test}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    jobs = []
    for split, count in (("train", train), ("val", val), ("test", test)):
        for n, lo in enumerate(range(0, count, shard_size)):
            hi = min(lo + shard_size, count)
            jobs.append(ShardJob(f"{split}-{n:06d}.tar", split, (split, lo, hi, count)))
    settings = {"kind": "synthetic", "classes": classes, "train": train, "val": val, "size": size,
                "seed": seed, "shard_size": shard_size, "quality": quality, **({"test": test} if test else {})}
    if kind == "scenes":
        # Gratings keep the settings they always had (their shard sets still resume); a scenes set
        # records its generator's version, so that one written by an older generator is refused.
        settings.update(kind="scenes", generator=SCENES_VERSION, **({"style": style} if style else {}))
    names = [f"class_{c:04d}" for c in range(classes)]
    sizes = {j.name: j.items[2] - j.items[1] for j in jobs}
    return write_shard_set(out_dir, jobs, SyntheticProducer(classes, size, seed, quality, kind,
                                                               tuple(sorted((style or {}).items()))), names,
                           settings, sizes, workers, progress)


def _check_synthetic_args(classes, train, val, size, shard_size, quality) -> None:
    for name, value, low in (("classes", classes, 2), ("train", train, 1), ("val", val, 0),
                             ("size", size, 8), ("shard_size", shard_size, 1), ("quality", quality, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if size > 1024 or quality > 100:
        raise ValueError(f"size must be <= 1024 and quality <= 100, got size={size}, quality={quality}")
