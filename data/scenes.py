"""Synthetic "scenes": textured shapes among clutter, a dev set harder than the gratings.

`write_synthetic(..., kind="scenes")` / `softprune shards synthetic OUT --kind scenes`. Same
contract as data/synthetic.py: image i of a split depends only on (seed, split, i), whatever the
shard size or number of writer processes; the manifest's settings say kind "scenes".

Classes. Class c has a texture family (stripes, checker, dots, aperiodic blobs: c mod 4), a
shape (disc, square, triangle, ring, cross, crescent: shared by the pair 2j, 2j+1) and, per
seed, a texture orientation, a texture frequency (cycles per object radius) and a hue. No cue
names the class alone: a shape belongs to two classes, a family to every 4th, and the hues are
spread evenly round the circle in an order where hue neighbours differ in family and shape (so a
colour jittered into the next class's range still leaves two cues). Beyond 12 classes the
(family, shape) pairs repeat and orientation, frequency and hue tell the repeats apart. Any
number of classes >= 2 works.

An image: a two-colour gradient background with a faint texture of some class; 0-1 smaller
distractor objects of other classes (their shape, texture and colour tendency); the object of
the class (radius 0.32-0.46 of the side, anywhere, any rotation; texture orientation and
frequency jittered; a light and a darker shade of its colour: 65% of the time the class hue
jittered with sd 0.06 of the circle, against 0.1 between classes, 35% of the time any hue);
sometimes a small occluder on top; brightness and contrast jitter, pixel noise. Everything is
drawn analytically at the requested size (anti-aliased signed-distance shapes, textures from
sines or an upsampled random field), so 64 px images carry detail that 32 px ones lack. About
1 ms per 32 px image and 2 ms per 64 px one (one core).

Calibration (the `Style` defaults; benchmarks/calibrate_devset.py: CIFAR ResNet-20 in one plain
PyTorch process on one CPU thread, through the real loader with the "cifar" transform, batch
128, SGD lr 0.1 nesterov momentum 0.9, wd 5e-4, lr x0.2 at epochs 15 and 25):

    nice -n 5 .venv/bin/python benchmarks/calibrate_devset.py --epochs 30
    # 2,000 train / 500 val, 32 px, 10 classes, seed 0:
    # epoch 1: train acc 20.4%, val 14.0%; val top-1 at epochs 5/10/15/20/25/30:
    # 41.4 / 54.2 / 85.4 / 92.0 / 93.4 / 94.6%; final 94.6% (11 min on a busy 2-core machine)

The model leans on every cue: on fresh scenes it scores 92.8% as trained, 83.6% with every
object's colour drawn at random and 95.6% with every colour from its class (the script's cue
probes). Earlier versions where colour was a reliable cue (5% random, sd 0.03) plateaued at
~89.5%: the network learned colour and little else (20% with random colours). At 64 px
(`--size 64 --train 1000 --epochs 6`, 1,000 train images) val top-1 goes 10.8% -> 41.0% in 6
epochs.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

# Bump when a change alters the images: shard sets record it, and a re-run refuses a stale set.
SCENES_VERSION = 1
FAMILIES = ("stripes", "checker", "dots", "blobs")
SHAPES = ("disc", "square", "triangle", "ring", "cross", "crescent")


@dataclass(frozen=True)
class Style:
    """How hard the scenes are; the defaults are the calibrated ones (see the module docstring)."""

    scale: tuple[float, float] = (0.32, 0.46)        # object radius / image side
    rotation_jitter: float = 0.15                    # texture orientation jitter (radians, sd)
    freq_jitter: float = 0.12                        # texture frequency jitter (relative, sd)
    hue_jitter: float = 0.06                         # class hue jitter (sd, hue circle = 1)
    random_colour: float = 0.35                      # chance the object's colour ignores its class
    distractors: tuple[int, int] = (0, 1)            # clutter objects, inclusive range
    distractor_scale: tuple[float, float] = (0.25, 0.45)  # relative to the object's radius
    occlusion: float = 0.05                          # chance a small distractor covers the object
    background_texture: tuple[float, float] = (0.02, 0.08)  # contrast of another class's texture
    noise: tuple[float, float] = (0.02, 0.05)        # pixel noise sd


@dataclass(frozen=True)
class SceneClass:
    family: int      # index into FAMILIES
    shape: int       # index into SHAPES
    theta: float     # texture orientation (radians)
    freq: float      # texture cycles per object radius
    hue: float       # colour tendency on the hue circle [0, 1)


@dataclass(frozen=True)
class SceneTable:
    """The classes of one seed, and how to draw an image of any of them."""

    classes: tuple[SceneClass, ...]
    style: Style = Style()

    @staticmethod
    def make(classes: int, seed: int, style: Style = Style()) -> SceneTable:
        rng = np.random.default_rng([seed, 0x5CE4E5])
        # Shapes are shared by pairs of classes and families by every 4th class, so that neither
        # cue alone names the class; the combination does (up to 12 classes, then the texture's
        # orientation, frequency and the hue tell repeats apart).
        ids = np.arange(classes)
        families, shapes = ids % len(FAMILIES), (ids // 2) % len(SHAPES)
        order = _hue_order(families, shapes, rng)
        hues = np.empty(classes)
        hues[order] = (ids + rng.uniform(0, 1)) / classes
        table = tuple(
            SceneClass(family=int(families[c]), shape=int(shapes[c]), theta=float(rng.uniform(0, math.pi)),
                       freq=float(rng.uniform(1.3, 2.2)), hue=float(hues[c]))
            for c in range(classes))
        return SceneTable(table, style)

    def render(self, label: int, size: int, rng: np.random.Generator) -> np.ndarray:
        """One uint8 [size, size, 3] image of class `label`; all randomness comes from `rng`."""
        st, k = self.style, len(self.classes)
        grid = _grid(size)
        image = _background(grid, rng, st, self.classes[int(rng.integers(k))])
        radius = rng.uniform(*st.scale)
        centre = rng.uniform(radius * 0.6, 1 - radius * 0.6, 2)
        count = rng.integers(st.distractors[0], st.distractors[1] + 1)
        others = [int((label + rng.integers(1, k)) % k) for _ in range(count)]
        for other in others:
            r = radius * rng.uniform(*st.distractor_scale)
            _paint(image, grid, size, self.classes[other], rng.uniform(r * 0.5, 1 - r * 0.5, 2), r, rng, st)
        _paint(image, grid, size, self.classes[label], centre, radius, rng, st)
        if rng.random() < st.occlusion:
            r = radius * rng.uniform(0.3, 0.5)
            spot = centre + rng.uniform(-radius, radius, 2)
            occluder = self.classes[int((label + rng.integers(1, k)) % k)]
            _paint(image, grid, size, occluder, spot, r, rng, st)
        gain, offset = rng.uniform(0.75, 1.15), rng.uniform(-0.1, 0.1)
        image = image * gain + offset + rng.normal(0, rng.uniform(*st.noise), image.shape)
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _hue_order(families: np.ndarray, shapes: np.ndarray, rng, steps: int = 1000) -> np.ndarray:
    """Classes in hue order (order[j] sits at the j-th hue), chosen so that hue neighbours differ
    in texture family and shape, and classes two hues apart in family: a colour jittered into its
    neighbour's range still leaves texture and shape to tell them apart. Seeded hill climbing."""
    def cost(o):
        f, s = families[o], shapes[o]
        return (4 * int((f == np.roll(f, 1)).sum()) + 2 * int((s == np.roll(s, 1)).sum())
                + int((f == np.roll(f, 2)).sum()))

    order = rng.permutation(len(families))
    best = cost(order)
    for _ in range(steps if len(families) > 2 else 0):
        if best == 0:
            break
        i, j = rng.integers(len(families), size=2)
        order[[i, j]] = order[[j, i]]
        trial = cost(order)
        if trial <= best:
            best = trial
        else:
            order[[i, j]] = order[[j, i]]
    return order


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in image-side units, as broadcastable [1, W] and [H, 1] arrays."""
    coords = ((np.arange(size) + 0.5) / size).astype(np.float32)
    return coords[None, :], coords[:, None]


def _colour(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32)


def _background(grid, rng, st: Style, texture_of: SceneClass) -> np.ndarray:
    """A two-colour gradient in a random direction plus a faint texture of some class."""
    x, y = grid
    a = _colour(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.25, 0.9))
    b = _colour(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.25, 0.9))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.clip((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle) + 0.5, 0, 1)[..., None]
    image = a * (1 - ramp) + b * ramp
    texture = _texture(grid, texture_of, rng.uniform(0.2, 0.8, 2), rng.uniform(*st.scale), rng, st)
    return image + rng.uniform(*st.background_texture) * (texture[..., None] - 0.5)


def _paint(image, grid, size, cls: SceneClass, centre, radius, rng, st: Style) -> None:
    """Composite one textured shape of class `cls` onto `image` in place."""
    x, y = grid
    turn = rng.uniform(0, 2 * math.pi)
    dx, dy = (x - centre[0]) / radius, (y - centre[1]) / radius
    u = dx * math.cos(turn) + dy * math.sin(turn)
    v = dy * math.cos(turn) - dx * math.sin(turn)
    # Signed distance (in radii, > 0 inside) -> coverage with a one-pixel anti-aliased edge.
    alpha = np.clip(_SHAPE_SDF[cls.shape](u, v) * radius * size + 0.5, 0, 1)[..., None]
    texture = _texture(grid, cls, centre, radius, rng, st)[..., None]
    hue = rng.random() if rng.random() < st.random_colour else cls.hue + rng.normal(0, st.hue_jitter)
    light = _colour(hue, rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0))
    dark = light * rng.uniform(0.2, 0.55)
    fill = dark + (light - dark) * texture
    image *= 1 - alpha
    image += alpha * fill


def _texture(grid, cls: SceneClass, centre, radius, rng, st: Style) -> np.ndarray:
    """Class texture in [0, 1] over the whole image, its scale tied to the object's radius."""
    x, y = grid
    theta = cls.theta + rng.normal(0, st.rotation_jitter)
    w = 2 * math.pi * cls.freq * (1 + rng.normal(0, st.freq_jitter)) / radius
    ct, sn = math.cos(theta), math.sin(theta)
    tu = (x - centre[0]) * ct + (y - centre[1]) * sn
    tv = (y - centre[1]) * ct - (x - centre[0]) * sn
    p, q = rng.uniform(0, 2 * math.pi, 2)
    family = FAMILIES[cls.family]
    if family == "stripes":
        s = np.sin(w * tu + p)
    elif family == "checker":
        s = 2 * np.sin(w * tu + p) * np.sin(w * tv + q)
    elif family == "dots":
        s = np.cos(w * tu + p) + np.cos(w * tv + q) - 1.0
    else:
        s = _blobs(x.shape[1], 2 * cls.freq / radius, rng)
    return np.clip(0.5 + 1.5 * s, 0, 1)


def _blobs(size: int, cells: float, rng) -> np.ndarray:
    """Aperiodic blobs: a coarse grid of random values (about `cells` across the image) smoothly
    upsampled, centred and scaled to unit spread. Drawn at `size`, so 64 px blobs are smooth."""
    n = int(np.clip(round(cells), 2, 32))
    coarse = Image.fromarray(rng.standard_normal((n, n)).astype(np.float32), mode="F")
    field = np.asarray(coarse.resize((size, size), Image.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def _disc(u, v):
    return 1 - np.sqrt(u * u + v * v)


def _ring(u, v):
    return 0.28 - np.abs(np.sqrt(u * u + v * v) - 0.7)


def _square(u, v):
    return 0.8 - np.maximum(np.abs(u), np.abs(v))


def _triangle(u, v):
    # Equilateral, circumradius 1.1: inside every edge's half-plane (inradius 0.55).
    edges = [0.55 - (u * math.cos(a) + v * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    return np.minimum(np.minimum(edges[0], edges[1]), edges[2])


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return np.maximum(np.minimum(0.95 - au, 0.32 - av), np.minimum(0.32 - au, 0.95 - av))


def _crescent(u, v):
    bite = np.sqrt((u - 0.5) ** 2 + v * v) - 0.75
    return np.minimum(_disc(u, v), bite)


_SHAPE_SDF = (_disc, _square, _triangle, _ring, _cross, _crescent)
assert len(_SHAPE_SDF) == len(SHAPES)
