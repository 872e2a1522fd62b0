"""Loader throughput on ImageNet-like JPEGs: where the time goes and what each trick buys.

Makes N photo-like JPEGs (about 500x375, quality 90, smooth content plus noise), writes them as
shards twice (original bytes, and `--max-side`), then measures in one run:
  1. one loader worker producing 224 px train batches: a naive pipeline (full PIL decode, crop,
     resize, float conversion and normalisation in the worker) and then each of our steps added
     in turn: the PIL path (uint8 out, crop+resize in one call, DCT-domain downscale per crop,
     decoding only the crop's rows; the fallback without simplejpeg), then data.fastdecode
     (simplejpeg's SIMD libjpeg-turbo at the DCT scale the crop allows + torch's uint8 resize,
     channels-first out; then cutting the rows below the crop = the default), and libjpeg's fast
     DCT and chroma upsampling on top (measured, not kept), all reading the same shards;
  2. our real loader (data.make_train_loader, 1 worker) on the original and the --max-side
     shards, on the default path and on the PIL path, against the naive pipeline on the original
     shards: the end-to-end gain;
  3. our real loader with 1 vs 2 workers, and the same against the old loader (fork per pass);
  4. the share of our per-image time spent inside simplejpeg (the floor Python cannot remove);
  5. what a pass costs to start, on a short epoch (--startup-images, 2 workers): the old loader
     (a new DataLoader per pass, workers forked each time; kept here only, as `ForkPerPassLoader`)
     against the persistent workers of today (spawn, the default; forkserver for comparison):
     time from iter() to the first batch, and the whole short epoch, first pass apart (it starts
     the persistent workers), median of the later ones, and the old/new ratio.
--quick runs parts 1, 2 and 4 only. Throughput is counted from the first batch on (worker
start-up excluded). Every job runs once per round, --repeat rounds, the jobs interleaved within a
round so that background load hits them alike; each ratio is taken against naive in the same
round, and the table gives the median ratio with its lowest and highest. The real loader is
measured on its second pass (its persistent workers are started by a first, unmeasured one). Every
CPU figure is the workers' CPU time over the measured pass (psutil), so spawn's one-off start is
not in it. The --max-side end-to-end ratio per worker CPU-second (per core) is printed last.

    python benchmarks/bench_loader.py [--images 512] [--max-side 384] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import DataConfig, make_train_loader, write_imagenet_shards  # noqa: E402
from data import fastdecode  # noqa: E402
from data.decode import decode_crop, open_image  # noqa: E402
from data.loader import StreamingLoader  # noqa: E402
from data.stream import StreamSpec  # noqa: E402
from data.sources import resolve_source  # noqa: E402
from data.tario import read_range  # noqa: E402
from data.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from data.transforms import random_resized_crop_box  # noqa: E402

SIZE = 224


def photo_like(rng: np.random.Generator, width: int, height: int) -> bytes:
    """Smooth colour fields plus blobs plus sensor-like noise: compresses like a photo (~100 KB)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    f = rng.uniform(2, 9, (3, 2))
    img = np.stack([np.sin(f[c, 0] * xx + rng.uniform(0, 6)) * np.cos(f[c, 1] * yy + rng.uniform(0, 6))
                    for c in range(3)], -1) * 70 + 128
    for _ in range(6):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 0.75), rng.uniform(0.03, 0.2)
        img += rng.uniform(-80, 80, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / r**2)[..., None]
    img += rng.normal(0, 18, img.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_images(src: Path, count: int) -> None:
    if (src / "done").exists() and int((src / "done").read_text()) == count:
        return
    rng = np.random.default_rng(0)
    shapes = [(500, 375), (375, 500), (500, 333), (500, 400)]
    for i in range(count):
        folder = src / "train" / f"n{i % 10:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = shapes[i % len(shapes)] if i % 5 else shapes[0]
        (folder / f"img_{i:06d}.JPEG").write_bytes(photo_like(rng, w, h))
    (src / "done").write_text(str(count))


# ---- the pipelines measured in part 1 (all read the shards with the same tar reader) ----------

def naive(data: bytes, rng) -> np.ndarray:
    """What a straightforward torchvision-style pipeline does, float tensor made in the worker."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    box = random_resized_crop_box(*img.size, rng)
    img = img.crop(box).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = np.asarray(img, dtype=np.float32) / 255.0
    return ((x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)).transpose(2, 0, 1)


def steps(draft: bool, fused: bool, rows: bool):
    def ours(data: bytes, rng) -> np.ndarray:
        flip = bool(rng.random() < 0.5)
        return decode_crop(data, lambda w, h: random_resized_crop_box(w, h, rng), SIZE,
                           flip=flip, draft=draft, fused=fused, rows=rows)
    return ours


def simd(rows: bool, fast_dct: bool = False):
    """data.fastdecode: simplejpeg (DCT scale per crop) + torch's resize, channels-first out."""
    def ours(data: bytes, rng) -> np.ndarray:
        flip = bool(rng.random() < 0.5)
        return fastdecode.decode_crop_chw(data, lambda w, h: random_resized_crop_box(w, h, rng), SIZE,
                                          flip, rows=rows, fast_dct=fast_dct)
    return ours


# (name, per-image function, layout of what it returns: "float" CHW float32, "hwc" or "chw" uint8)
LADDER = [
    ("naive: full decode, crop, resize, float+normalise in worker", naive, "float"),
    ("+ uint8 out (normalise on the device)", steps(False, False, False), "hwc"),
    ("+ crop and resize in one call", steps(False, True, False), "hwc"),
    ("+ DCT-domain downscale chosen per crop (draft)", steps(True, True, False), "hwc"),
    ("+ decode only the crop's rows (= the PIL path, the fallback)", steps(True, True, True), "hwc"),
    ("simplejpeg (SIMD, DCT scale per crop) + torch uint8 resize, CHW out", simd(False), "chw"),
    ("+ decode only the crop's rows (= ours, default)", simd(True), "chw"),
    ("+ libjpeg's fast DCT and chroma upsampling (not kept)", simd(True, True), "chw"),
]


class BenchStream(IterableDataset):
    def __init__(self, urls, counts, fn, layout, batch):
        self.urls, self.counts, self.fn, self.layout, self.batch = urls, counts, fn, layout, batch

    def __iter__(self):
        rng = np.random.default_rng(0)
        out = []
        for url, count in zip(self.urls, self.counts):
            for _, entry in read_range(url, 0, count):
                out.append(self.fn(entry["jpg"], rng))
                if len(out) == self.batch:
                    yield self._stack(out)
                    out = []

    def _stack(self, arrays):
        if self.layout == "hwc":
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return torch.from_numpy(np.stack(arrays))


def worker_cpu() -> dict[int, float]:
    """CPU seconds so far of every loader worker of this process (the resource tracker left out)."""
    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                times = child.cpu_times()
                out[child.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return out


def rate(batches, batch_size: int, count: int) -> tuple[float, float]:
    """(images per wall second from the first batch on, images per worker CPU-second) of one
    pass of `count` batches.

    The CPU figure is what the workers cost, whatever else runs on the machine: their CPU time
    (psutil) from just before the pass to just after its last batch, before a per-pass worker
    exits. Persistent workers idle between passes, so their start-up is not in it; a per-pass
    forked worker's (small) start is. On an idle machine the two figures agree for one worker.
    """
    cpu0 = worker_cpu()
    it = iter(batches)
    next(it)
    start = time.perf_counter()
    for _ in range(count - 1):
        next(it)
    wall = (count - 1) * batch_size / (time.perf_counter() - start)
    cpu = sum(t - cpu0.get(pid, 0.0) for pid, t in worker_cpu().items())
    for _ in it:  # ends the pass cleanly
        pass
    return wall, count * batch_size / cpu


def ladder_rate(shards, fn, layout, batch) -> tuple[float, float]:
    stream = BenchStream(shards.urls, shards.counts, fn, layout, batch)
    loader = DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4)
    return rate(loader, batch, shards.total // batch)


def loader_rate(source: str, workers: int, batch: int, old: bool = False, pil: bool = False) -> tuple[float, float]:
    """Our loader's second pass (the first starts its persistent workers); `old`: fork per pass;
    `pil`: the PIL path (what runs where simplejpeg is not installed)."""
    cfg = DataConfig(train=source, image_size=SIZE, batch_size=batch, num_workers=workers,
                     shuffle_buffer=256, prefetch_factor=4)
    loader = (ForkPerPassLoader(resolve_source(source, "train"), cfg, 0, 1, True) if old
              else make_train_loader(cfg, 0, 1))
    if pil:
        loader._planner = without_simd(loader._planner)
    try:
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            result = rate(loader, batch, len(loader))
        return result
    finally:
        loader.close()


def without_simd(planner):
    spec: StreamSpec = dataclasses.replace(planner.spec, fast_decode=False)
    return dataclasses.replace(planner, spec=spec)


class ForkPerPassLoader(StreamingLoader):
    """The loader before persistent workers, for comparison only: a new DataLoader every pass,
    its workers forked from this process (what hung a threaded training process)."""

    def _batches(self, start: int):
        if self.cfg.num_workers == 0:
            return super()._batches(start)
        stream = self._planner.stream(self.epoch, start)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                               prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
                               multiprocessing_context="fork"))


OLD_1 = "ours, real loader, original shards (old: fork per pass)"
OLD_2 = "ours, real loader, original shards, 2 workers (old: fork per pass)"
STARTUP_MODES = {
    "fork per pass (old)": lambda cfg: ForkPerPassLoader(resolve_source(cfg.train, "train"), cfg, 0, 1, True),
    "persistent spawn (new default)": lambda cfg: make_train_loader(cfg, 0, 1),
    "persistent forkserver": lambda cfg: make_train_loader(cfg.model_copy(update={"mp_context": "forkserver"}),
                                                           0, 1),
}


def timed_pass(loader, epoch: int) -> tuple[float, float]:
    """(seconds from iter() to the first batch, seconds for the whole pass)."""
    loader.set_epoch(epoch)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    for _ in it:
        pass
    return first, time.perf_counter() - start


def startup_costs(source: str, batch: int, epochs: int) -> dict[str, list[tuple[float, float]]]:
    """Every mode's (first batch, whole pass) seconds for `epochs` passes, modes interleaved."""
    cfg = DataConfig(train=source, image_size=SIZE, batch_size=batch, num_workers=2,
                     shuffle_buffer=64, prefetch_factor=2)
    loaders = {name: make(cfg) for name, make in STARTUP_MODES.items()}
    times = {name: [] for name in loaders}
    try:
        for epoch in range(epochs):
            for name, loader in loaders.items():
                times[name].append(timed_pass(loader, epoch))
    finally:
        for loader in loaders.values():
            loader.close()
    return times


def print_startup(times: dict, images: int, batches: int) -> None:
    later_passes = len(next(iter(times.values()))) - 1
    print(f"\nper-pass start-up, 2 workers, short epoch of {images} images ({batches} batches); "
          f"seconds: first pass (starts persistent workers) | median of the {later_passes} later passes")
    later = {}
    for name, runs in times.items():
        (first_ttfb, first_pass), rest = runs[0], runs[1:]
        later[name] = (float(np.median([r[0] for r in rest])), float(np.median([r[1] for r in rest])))
        print(f"  to 1st batch {first_ttfb:6.3f}, whole {first_pass:6.3f} | to 1st batch {later[name][0]:6.3f}, "
              f"whole {later[name][1]:6.3f}  {name}")
    old, new = later["fork per pass (old)"], later["persistent spawn (new default)"]
    once = times["persistent spawn (new default)"][0][1] - old[1]
    print(f"start-up per pass, old / new (later passes): time to first batch {old[0] / new[0]:.1f}x, "
          f"whole short epoch {old[1] / new[1]:.2f}x; spawn's one-off cost {once:.1f} s is repaid after "
          f"{max(once, 0) / max(old[1] - new[1], 1e-9):.0f} passes")


def decode_share(shards, limit: int = 200) -> tuple[float, float]:
    """(share of our per-image time spent decoding (simplejpeg), ms per image), in-process."""
    datas = [e["jpg"] for u, c in zip(shards.urls, shards.counts) for _, e in read_range(u, 0, c)][:limit]
    rng = np.random.default_rng(1)
    boxes = [random_resized_crop_box(*open_image(d).size, rng) for d in datas]
    fn = simd(True)
    best_dec, best_all = 1e9, 1e9
    for _ in range(3):
        t0 = time.process_time()
        for d, box in zip(datas, boxes):
            fastdecode.decode_for_crop(d, lambda w, h, box=box: box, SIZE)
        t1 = time.process_time()
        for d in datas:
            fn(d, rng)
        t2 = time.process_time()
        best_dec, best_all = min(best_dec, t1 - t0), min(best_all, t2 - t1)
    return best_dec / best_all, 1000 * best_all / len(datas)


def interleaved(repeat: int, jobs: dict) -> dict[str, list[tuple[float, float]]]:
    """Every job's (wall, cpu) rates in each of `repeat` rounds, the jobs interleaved per round."""
    runs = {k: [] for k in jobs}
    for _ in range(repeat):
        for key, job in jobs.items():
            runs[key].append(job())
    return runs


def summary(runs: list[tuple[float, float]], base: list[tuple[float, float]], col: int) -> tuple[float, float, float, float]:
    """(median rate, median ratio to `base` of the same round, lowest, highest ratio) of column
    `col` (0: per wall second, 1: per worker CPU-second)."""
    ratios = [r[col] / b[col] for r, b in zip(runs, base)]
    return float(np.median([r[col] for r in runs])), float(np.median(ratios)), min(ratios), max(ratios)


def print_table(runs: dict, base_key: str, title: str) -> None:
    print(f"\n{title}\n  images per worker CPU-second (median; x naive: median [min-max] of the per-round ratios)"
          " | images per wall second (median, x naive median)")
    for name, series in runs.items():
        cpu, ratio, lo, hi = summary(series, runs[base_key], 1)
        wall, wratio, _, _ = summary(series, runs[base_key], 0)
        print(f"  {cpu:7.1f} ({ratio:4.2f}x [{lo:4.2f}-{hi:4.2f}]) | {wall:7.1f} ({wratio:4.2f}x)  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--max-side", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--startup-images", type=int, default=128, help="short epoch of part 5")
    parser.add_argument("--startup-epochs", type=int, default=8, help="passes per mode in part 5")
    parser.add_argument("--startup-batch", type=int, default=8, help="batch of part 5 (small: start-up shows)")
    parser.add_argument("--workdir", default=str(ROOT / ".cache" / "bench_loader"))
    parser.add_argument("--quick", action="store_true",
                        help="parts 1, 2 and 4 only (no worker scaling, old loader or start-up parts)")
    args = parser.parse_args()
    if not fastdecode.available():
        sys.exit("simplejpeg is not installed: pip install -e '.[simd]' (the PIL path is measured either way)")
    work = Path(args.workdir)
    make_images(work / "src", args.images)
    orig = write_imagenet_shards(work / "src", work / "orig", shard_size=args.images // 4, workers=2, progress=False)
    small = write_imagenet_shards(work / "src", work / f"max{args.max_side}", shard_size=args.images // 4,
                                  max_side=args.max_side, workers=2, progress=False)
    shards = resolve_source(str(orig), "train")
    small_shards = resolve_source(str(small), "train")
    mean_kb = sum(shards.bytes) / shards.total / 1024
    print(f"{shards.total} images, ~500x375 q90, {mean_kb:.0f} KiB/image in shards; "
          f"--max-side {args.max_side}: {sum(small_shards.bytes) / small_shards.total / 1024:.0f} KiB/image; "
          f"batch {args.batch}, {SIZE} px train crops, {os.cpu_count()} CPUs, {args.repeat} interleaved rounds; "
          f"load average at start {os.getloadavg()[0]:.1f}")

    small_key = f"ours, real loader, --max-side {args.max_side} shards"
    jobs = {name: (lambda fn=fn, lay=lay: ladder_rate(shards, fn, lay, args.batch)) for name, fn, lay in LADDER}
    jobs["ours, real loader, original shards, PIL path (no simplejpeg)"] = \
        lambda: loader_rate(str(orig), 1, args.batch, pil=True)
    jobs["ours, real loader, original shards"] = lambda: loader_rate(str(orig), 1, args.batch)
    jobs[f"{small_key}, PIL path (no simplejpeg)"] = lambda: loader_rate(str(small), 1, args.batch, pil=True)
    jobs[small_key] = lambda: loader_rate(str(small), 1, args.batch)
    if not args.quick:
        jobs["ours, real loader, original shards, 2 workers"] = lambda: loader_rate(str(orig), 2, args.batch)
        jobs[OLD_1] = lambda: loader_rate(str(orig), 1, args.batch, old=True)
        jobs[OLD_2] = lambda: loader_rate(str(orig), 2, args.batch, old=True)
    runs = interleaved(args.repeat, jobs)
    naive_key = LADDER[0][0]
    print_table({k: v for k, v in runs.items() if "2 workers" not in k}, naive_key,
                "1 worker process; every ratio is against naive on the original shards in the same round")
    for label, sh in (("original", shards), (f"--max-side {args.max_side}", small_shards)):
        share, ms = decode_share(sh)
        print(f"simplejpeg decoding share of our per-image time ({label} shards): {100 * share:.0f}% of {ms:.2f} ms")
    if not args.quick:
        print_workers(runs, args)
    cpu, ratio, lo, hi = summary(runs[small_key], runs[naive_key], 1)
    _, wratio, _, _ = summary(runs[small_key], runs[naive_key], 0)
    print(f"--max-side {args.max_side} end-to-end (our loader on --max-side shards vs naive on original "
          f"shards, 1 worker): {ratio:.2f}x per worker CPU-second, median of {args.repeat} rounds "
          f"[{lo:.2f}-{hi:.2f}] ({wratio:.2f}x wall); load average now {os.getloadavg()[0]:.1f}")


def print_workers(runs: dict, args) -> None:
    best = {k: (max(r[0] for r in v), max(r[1] for r in v)) for k, v in runs.items()}
    one, two = best["ours, real loader, original shards"][0], best["ours, real loader, original shards, 2 workers"][0]
    print(f"\nworkers (wall clock, best round, needs 2 idle cores): 1 -> {one:.1f} img/s, 2 -> {two:.1f} img/s: "
          f"{two / one:.2f}x; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    (w1, c1), (w2, _), cpu_one = best[OLD_1], best[OLD_2], best["ours, real loader, original shards"][1]
    print(f"persistent spawn workers vs the old fork per pass, same run: 1 worker {one / w1:.2f}x wall, "
          f"{cpu_one / c1:.2f}x per worker CPU-second; 2 workers {two / w2:.2f}x wall")
    work = Path(args.workdir)
    make_images(work / "short_src", args.startup_images)  # the first images of src, again
    short = write_imagenet_shards(work / "short_src", work / "short", shard_size=args.startup_images // 4,
                                  max_side=args.max_side, workers=2, progress=False)
    times = startup_costs(str(short), args.startup_batch, args.startup_epochs)
    print_startup(times, args.startup_images, args.startup_images // args.startup_batch)


if __name__ == "__main__":
    main()
