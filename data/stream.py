"""What runs inside a loader worker: read its pieces, shuffle, decode, and emit uint8 batches.

Everything a worker does is a function of (plan, seed, epoch, rank, batch index), never of how
long it has been running, so a resumed worker produces exactly the batches an uninterrupted one
would have: the shuffle order is precomputed over positions (`plan.buffer_order`), and every
batch draws its augmentation from a generator seeded by its own index.

Workers live for the whole run (`RunStream`): each pass they rebuild their plan from the
(epoch, start, earlier phases) that the main process wrote into an `EpochCursor` just before the
pass began. After a resume on another layout the plan covers only what the earlier phases of the
epoch left (data.plan, data.position): pieces with holes, read sequentially, holes skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

# read_range's webdataset pieces, imported here with torch (they then cost little more) so that
# loader workers have them loaded before their first read.
import webdataset.tariterators  # noqa: F401
from torch.utils.data import IterableDataset, get_worker_info

from data import fastdecode
from data.decode import decode_crop, decode_full
from data.plan import WorkerPlan, batches_done, buffer_order, plan_train, plan_val, stream_seed
from data.position import MAX_PHASES, Phase, remaining
from data.tario import read_range
from data.transforms import centre_crop_box, pad_crop, pad_crop_offsets, random_resized_crop_box

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class CorruptShardError(RuntimeError):
    """Too many unreadable samples in one shard (more than `max_bad_fraction` of it)."""


@dataclass(frozen=True)
class StreamSpec:
    """Settings shared by every worker of one loader."""

    train: bool
    batch_size: int
    image_size: int
    transform: str
    crop_fraction: float
    shuffle_buffer: int
    seed: int
    epoch: int
    rank: int
    max_bad_fraction: float
    shard_counts: dict  # url -> samples in the whole shard (denominator of the bad fraction)
    num_classes: int | None
    phase: int = 0  # which phase of the epoch this pass plays (seeds; data.plan.stream_seed)
    fast_decode: bool = True  # JPEGs through data.fastdecode when simplejpeg is installed (else PIL)


class ImageTransform:
    """bytes -> uint8 3xSxS array of side `size`, with the augmentation of the spec.

    JPEGs go through `data.fastdecode` (simplejpeg) when it is installed and takes the file, else
    through PIL (`data.decode`); both sample the same crop and flip from `rng`.
    """

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.fast = spec.fast_decode and fastdecode.available()

    def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        s = self.spec
        if s.transform == "cifar":
            image = decode_full(data, s.image_size)
            if s.train:
                image = pad_crop(image, pad_crop_offsets(rng))
                image = image[:, ::-1] if rng.random() < 0.5 else image
            return image.transpose(2, 0, 1)
        flip = s.train and bool(rng.random() < 0.5)  # drawn before the box, as it always was
        boxes: dict = {}

        def box_fn(w: int, h: int):
            # Sampled once per image: a file simplejpeg gives up on after sampling goes to PIL
            # with the same box, and the generator advances the same way on either path.
            if (w, h) not in boxes:
                boxes[w, h] = (random_resized_crop_box(w, h, rng) if s.train
                               else centre_crop_box(w, h, s.crop_fraction))
            return boxes[w, h]

        image = fastdecode.decode_crop_chw(data, box_fn, s.image_size, flip) if self.fast else None
        if image is None:  # no simplejpeg, or a file it does not take: PIL
            image = decode_crop(data, box_fn, s.image_size, flip=flip).transpose(2, 0, 1)
        return image


class _SampleSource:
    """Serves the samples of a worker's pieces in emission order, starting at emission `cursor`.

    Positions already emitted before `cursor` are skipped without decoding; positions before the
    first one still needed are not even read (seeked over on local files).
    """

    def __init__(self, plan: WorkerPlan, order: np.ndarray, cursor: int):
        self.plan, self.order = plan, order
        sizes = [p.size for p in plan.pieces]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.emitted = np.zeros(len(order), dtype=bool)
        self.emitted[order[:cursor]] = True
        first = int(order[cursor:].min()) if cursor < len(order) else len(order)
        self.reader = self._read_from(first)
        self.store: dict[int, object] = {}

    def url_of(self, pos: int) -> str:
        return self.plan.pieces[int(np.searchsorted(self.offsets, pos, side="right")) - 1].url

    def _read_from(self, first: int):
        for k, piece in enumerate(self.plan.pieces):
            base = int(self.offsets[k])
            if base + piece.size <= first:
                continue
            skip = max(first - base, 0)
            if piece.index is None:
                for index, entry in read_range(piece.url, piece.start + skip, piece.stop,
                                               want=lambda i, b=base - piece.start: not self.emitted[b + i]):
                    yield base + index - piece.start, entry
            else:
                yield from self._read_holed(piece, base, skip)

    def _read_holed(self, piece, base: int, skip: int):
        """A piece with holes (samples earlier phases of the epoch read): one sequential read of
        its shard range, the holes skipped like samples already emitted."""
        local = np.full(piece.stop - piece.start, -1, dtype=np.int64)  # in-shard index -> position
        local[piece.index - piece.start] = np.arange(base, base + piece.size)
        wanted = lambda i: (p := local[i - piece.start]) >= 0 and not self.emitted[p]
        for index, entry in read_range(piece.url, int(piece.index[skip]), piece.stop, want=wanted):
            pos = int(local[index - piece.start])
            if pos >= 0:
                yield pos, entry

    def get(self, emission: int):
        """(position, entry) of emission number `emission` (called in increasing order)."""
        pos = int(self.order[emission])
        while pos not in self.store:
            got, entry = next(self.reader)
            if not self.emitted[got]:
                self.store[got] = entry
        return pos, self.store.pop(pos)


class _BadCounter:
    """Counts unreadable samples per shard and raises past the allowed fraction."""

    def __init__(self, spec: StreamSpec):
        self.spec, self.per_shard, self.new = spec, {}, 0

    def add(self, url: str, reason: str) -> None:
        self.new += 1
        bad = self.per_shard[url] = self.per_shard.get(url, 0) + 1
        count = self.spec.shard_counts.get(url, 0)
        if bad > self.spec.max_bad_fraction * count:
            raise CorruptShardError(
                f"shard {url}: {bad} of its {count} samples are unreadable, more than "
                f"max_bad_fraction={self.spec.max_bad_fraction}; last problem: {reason}")

    def take(self) -> int:
        new, self.new = self.new, 0
        return new


def parse_sample(entry, num_classes: int | None) -> tuple[bytes, int]:
    """(image bytes, label) of a read sample; ValueError naming what is wrong."""
    if isinstance(entry, str):
        raise ValueError(entry)
    image = next((entry[e] for e in IMAGE_EXTS if e in entry), None)
    if image is None or "cls" not in entry:
        raise ValueError(f"sample {entry.get('__key__')} lacks an image or a .cls member")
    label = int(entry["cls"].decode().strip())
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise ValueError(f"sample {entry.get('__key__')} has label {label} outside the classes")
    return image, label


class EpochStream(IterableDataset):
    """One rank's epoch as an iterable of batches; each DataLoader worker serves one plan.

    Items are (images uint8 [B,3,H,W], labels int64 [B], valid bool [B], meta) with
    meta = (logical worker, batch index within that worker, newly counted bad samples).
    """

    def __init__(self, plans: list[WorkerPlan], spec: StreamSpec, start: int):
        self.plans, self.spec, self.start = plans, spec, start

    def __iter__(self):
        info = get_worker_info()
        return self.worker_batches(info.id if info is not None else 0)

    def worker_batches(self, physical: int):
        """The batches DataLoader worker `physical` serves (in-process: worker 0)."""
        # The DataLoader asks physical workers round-robin from worker 0; rotating the plans makes
        # physical worker 0 serve the plan that owns batch `start`, so a resumed epoch keeps order.
        plan = self.plans[(physical + self.start) % len(self.plans)]
        first = batches_done(self.start, len(self.plans), plan.worker)
        if self.spec.train:
            yield from self._train(plan, first)
        else:
            yield from self._val(plan, first)

    def _rng(self, plan: WorkerPlan, *extra: int) -> np.random.Generator:
        s = self.spec
        return np.random.default_rng(stream_seed(s.seed, s.epoch, s.phase, s.rank, plan.worker, *extra))

    def _train(self, plan: WorkerPlan, first: int):
        size = self.spec.batch_size
        order = buffer_order(plan.samples, self.spec.shuffle_buffer, self._rng(plan, 0, 0))
        source, bad = _SampleSource(plan, order, first * size), _BadCounter(self.spec)
        transform = ImageTransform(self.spec)
        reserve = _Reserve(plan, self.spec, transform)
        for b in range(first, plan.batches):
            items = [source.get(b * size + i) for i in range(size)]
            images, labels, valid = self._decode(items, transform, self._rng(plan, 1, b), source, bad)
            self._fill_bad(images, labels, valid, items, transform, self._rng(plan, 2, b), reserve)
            yield images, labels, torch.ones(size, dtype=torch.bool), (plan.worker, b, bad.take())

    def _val(self, plan: WorkerPlan, first: int):
        size = self.spec.batch_size
        order = np.arange(plan.samples, dtype=np.int64)
        source, bad = _SampleSource(plan, order, min(first * size, plan.samples)), _BadCounter(self.spec)
        transform, rng = ImageTransform(self.spec), np.random.default_rng(0)
        for b in range(first, plan.batches):
            items = [source.get(p) for p in range(b * size, min((b + 1) * size, plan.samples))]
            images, labels, valid = self._decode(items, transform, rng, source, bad)
            yield images, labels, valid, (plan.worker, b, bad.take())

    def _decode(self, items, transform, rng, source, bad):
        size, side = self.spec.batch_size, self.spec.image_size
        images = np.zeros((size, 3, side, side), dtype=np.uint8)
        labels = np.zeros(size, dtype=np.int64)
        valid = np.zeros(size, dtype=bool)
        for slot, (pos, entry) in enumerate(items):
            try:
                data, labels[slot] = parse_sample(entry, self.spec.num_classes)
                images[slot] = transform(data, rng)
                valid[slot] = True
            except Exception as exc:  # any decoder failure is a bad sample, counted below
                bad.add(source.url_of(pos), f"{type(exc).__name__}: {exc}")
        # The transforms hand back channels-first images: the batch is NCHW as filled.
        return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(valid)

    def _fill_bad(self, images, labels, valid, items, transform, rng, reserve) -> None:
        """Train only: a bad slot gets another readable sample of the same batch (or, if the whole
        batch is unreadable, one of the worker's reserve), freshly augmented. The batch stays full
        and which samples a batch holds never depends on history, so resuming stays exact."""
        holes = torch.nonzero(~valid).flatten().tolist()
        if not holes:
            return
        good = torch.nonzero(valid).flatten().tolist()
        donors = [parse_sample(items[i][1], self.spec.num_classes) for i in good] or reserve.samples()
        for k, slot in enumerate(holes):
            data, label = donors[k % len(donors)]
            images[slot] = torch.from_numpy(np.ascontiguousarray(transform(data, rng)))
            labels[slot] = label


class _Reserve:
    """The first readable samples of a worker's range, in read order: stand-ins for batches that
    are entirely unreadable (e.g. behind a truncated shard). Read lazily, only when needed."""

    def __init__(self, plan: WorkerPlan, spec: StreamSpec, transform: ImageTransform):
        self.plan, self.spec, self.transform, self.found = plan, spec, transform, None

    def samples(self) -> list[tuple[bytes, int]]:
        if self.found is None:
            self.found = self._collect()
        if not self.found:
            urls = ", ".join(p.url for p in self.plan.pieces[:3])
            raise CorruptShardError(f"no readable sample at all in this worker's shards ({urls})")
        return self.found

    def _collect(self) -> list[tuple[bytes, int]]:
        found, rng = [], np.random.default_rng(0)
        for piece in self.plan.pieces:
            for _, entry in read_range(piece.url, piece.start, piece.stop):
                try:
                    data, label = parse_sample(entry, self.spec.num_classes)
                    self.transform(data, rng)
                except Exception:
                    continue
                found.append((data, label))
                if len(found) == self.spec.batch_size:
                    return found
        return found


@dataclass(frozen=True)
class EpochPlanner:
    """What fixes every epoch of one rank's loader, small and picklable: turned into the epoch's
    `EpochStream` at the start of each pass, in each worker (or in-process with num_workers=0)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    world_size: int
    num_workers: int  # logical workers, i.e. plans per epoch
    spec: StreamSpec  # its `epoch` is replaced by the pass's epoch

    def plans(self, epoch: int, prior: tuple[Phase, ...] = ()) -> list[WorkerPlan]:
        """The workers' plans of the epoch's phase that follows `prior` (its earlier phases)."""
        s, urls, counts = self.spec, list(self.urls), list(self.counts)
        if s.train:
            pool = remaining(sum(counts), s.seed, epoch, tuple(prior)) if prior else None
            return plan_train(urls, counts, s.rank, self.world_size, self.num_workers, s.batch_size, s.seed,
                              epoch, pool)
        if prior:
            raise ValueError("a validation pass has no phases")
        return plan_val(urls, counts, s.rank, self.world_size, self.num_workers, s.batch_size)

    def stream(self, epoch: int, start: int, prior: tuple[Phase, ...] = ()) -> EpochStream:
        """Epoch `epoch` from batch `start` of the phase that follows `prior`."""
        return EpochStream(self.plans(epoch, prior), replace(self.spec, epoch=epoch, phase=len(prior)), start)


_PHASE_FIELDS = ("world_size", "num_workers", "batch_size", "shuffle_buffer", "batches")


class EpochCursor:
    """(epoch, first batch, earlier phases) of the next pass in shared memory: the main process
    writes it before each pass, the workers read it when the pass begins.

    Made from the DataLoader's own multiprocessing context: a lock created under one start method
    cannot be handed to processes started by another. Fixed size (shared memory cannot grow): room
    for `MAX_PHASES` earlier phases, five int64 each.
    """

    def __init__(self, ctx):
        # int64 epoch, start, number of phases, then the phases; the lock keeps them consistent
        self._values = ctx.Array("q", 3 + len(_PHASE_FIELDS) * MAX_PHASES)

    def set(self, epoch: int, start: int, prior: tuple[Phase, ...] = ()) -> None:
        if len(prior) > MAX_PHASES:
            raise ValueError(f"more than {MAX_PHASES} layout changes within one epoch")
        flat = [getattr(p, f) for p in prior for f in _PHASE_FIELDS]
        with self._values.get_lock():
            self._values[0:3 + len(flat)] = [epoch, start, len(prior), *flat]

    def get(self) -> tuple[int, int, tuple[Phase, ...]]:
        with self._values.get_lock():
            epoch, start, count = self._values[0:3]
            flat = self._values[3:3 + len(_PHASE_FIELDS) * count]
        n = len(_PHASE_FIELDS)
        prior = tuple(Phase(**dict(zip(_PHASE_FIELDS, flat[i:i + n]))) for i in range(0, len(flat), n))
        return int(epoch), int(start), prior


class RunStream(IterableDataset):
    """The dataset that persistent workers hold for the whole run.

    torch calls `iter()` on it in each worker when the worker starts, and again when a new pass
    begins (`iter(loader)` sends every worker a `_ResumeIteration`, after the main process set the
    cursor). The cursor is read right there, not lazily, so each pass plays its own (epoch, start,
    earlier phases).
    Batches of an abandoned pass that were still prefetched are dropped by torch before the new
    pass yields anything (`_MultiProcessingDataLoaderIter._reset` waits for every worker's
    acknowledgement and discards what arrives before it).
    """

    def __init__(self, planner: EpochPlanner, cursor: EpochCursor):
        self.planner, self.cursor = planner, cursor

    def __iter__(self):
        epoch, start, prior = self.cursor.get()
        return iter(self.planner.stream(epoch, start, prior))
