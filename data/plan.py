"""Who reads which samples in an epoch: pure functions of (shards, rank, world, workers, seed, epoch)
and, after a resume on another layout, of the epoch's earlier phases.

The rule (train), chosen so that every rank yields the same number of batches however uneven the
shards are, and so that no sample is read by two ranks:

1. The shard list is permuted with a generator seeded by (seed, epoch).
2. The permuted shards are laid end to end as one sequence of N samples; a sample's index in it
   is its epoch position. The positions are cut into `world` consecutive parts of
   n = N // world; the last N % world positions are dropped.
   A shard normally belongs to one rank; a shard that straddles a cut is read by the two
   neighbouring ranks, each taking its own sample range of it.
3. Each rank yields K = n // batch_size batches (the last n % batch_size positions of its part are
   dropped, like drop_last). Fewer samples per epoch are lost than one batch per rank, and a
   different set each epoch because the shard order changes.
4. Loader worker w of W takes K // W + (w < K % W) of those batches, as one consecutive range of
   the rank's part, and the loader interleaves the workers round-robin: batch j comes from worker
   j % W. Fewer shards than ranks x workers is fine: workers then read parts of the same shard.
   Each worker emits its range through a shuffle buffer whose order (`buffer_order`) is fixed by
   (seed, epoch, phase, rank, worker), so the positions it consumed after e emissions are known.

Phases (a resume on another layout, data.position). An epoch is played in one or more phases; a
phase is a layout (world, workers, batch size, shuffle buffer) and the number of batches every
rank yielded in it. Phase 0 plays all N positions as above. When a run stops after b batches per
rank and resumes with another layout, the positions phase 0 consumed are known exactly (each
worker's first batches_done(b, W, w) x batch_size emissions), and phase 1 plays the REMAINING
positions: in increasing epoch position (the permuted shard order, so reads stay sequential),
cut into the new world's equal parts, batches and worker ranges by rules 2 to 4, with the list of
remaining positions in place of 0..N-1. A further resume starts phase 2 over what phases 0 and 1
left, and so on. Positions a stopped phase had not consumed, its cut-off tails included, stay in
the pool, so nothing is lost at a stop: the only samples an epoch drops are those its LAST phase
cannot place: with R remaining positions at that phase's start on M ranks of batch B,
R % M + M x ((R // M) % B) of them (fewer than M x (B + 1)), the tails of rules 2 and 3 applied to
the remaining list. A resume on the same layout continues the stopped phase exactly instead.

Validation: shards in manifest order, rank r gets samples [r N / world, (r+1) N / world), every
rank yields ceil(ceil(N / world) / batch_size) batches, and missing slots are padding (valid=False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard (indices within the shard), or, when `index` is given,
    only those of its indices (ascending, within [start, stop)): a piece of what remains of an
    epoch after a resume, with holes where earlier phases consumed samples."""

    url: str
    start: int
    stop: int
    index: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return self.stop - self.start if self.index is None else len(self.index)

    def indices(self) -> np.ndarray:
        """The in-shard indices this piece serves, in read order."""
        return np.arange(self.start, self.stop, dtype=np.int64) if self.index is None else self.index


@dataclass(frozen=True)
class WorkerPlan:
    """One loader worker's share of an epoch: its pieces in read order and its batch count."""

    worker: int
    pieces: tuple[Piece, ...]
    batches: int

    @property
    def samples(self) -> int:
        return sum(p.size for p in self.pieces)


PHASE_TAG = 0x9A5E  # marks the seeds of phases after the first


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation: identical on every rank, different every epoch."""
    rng = np.random.default_rng([seed, epoch, 0x5A4D])
    return [int(i) for i in rng.permutation(num_shards)]


def stream_seed(seed: int, epoch: int, phase: int, rank: int, worker: int, *extra: int) -> list[int]:
    """Seed of one worker's generators (shuffle order: extra (0, 0); augmentation of its batch b:
    (1, b); stand-ins for bad samples: (2, b)). Phase 0 keeps the seeds of the code before phases
    existed, so a state it wrote resumes exactly."""
    base = [seed, epoch, rank, worker, *extra]
    return base if phase == 0 else base + [PHASE_TAG, phase]


def shuffle_rng(seed: int, epoch: int, phase: int, rank: int, worker: int) -> np.random.Generator:
    return np.random.default_rng(stream_seed(seed, epoch, phase, rank, worker, 0, 0))


def train_batches(total: int, world_size: int, batch_size: int) -> int:
    return (total // world_size) // batch_size


def val_batches(total: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(total / world_size) / batch_size)


def worker_batches(batches: int, num_workers: int, worker: int) -> int:
    """Batches of `batches` that worker `worker` produces (round-robin assignment)."""
    return batches // num_workers + (worker < batches % num_workers)


def batches_done(position: int, num_workers: int, worker: int) -> int:
    """How many of the first `position` batches came from `worker` (batch j from worker j % W)."""
    return max(0, -(-(position - worker) // num_workers))


def take_range(urls: list[str], counts: list[int], lo: int, hi: int) -> tuple[Piece, ...]:
    """Pieces covering positions [lo, hi) of the shards laid end to end in the given order."""
    pieces, offset = [], 0
    for url, count in zip(urls, counts):
        start, stop = max(lo - offset, 0), min(hi - offset, count)
        if start < stop:
            pieces.append(Piece(url, start, stop))
        offset += count
        if offset >= hi:
            break
    return tuple(pieces)


def take_positions(urls: list[str], counts: list[int], positions: np.ndarray) -> tuple[Piece, ...]:
    """Pieces holding the given ascending positions of the shards laid end to end: one piece per
    shard touched (read in one sequential pass), with an `index` where the positions have holes."""
    if len(positions) == 0:
        return ()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shard = np.searchsorted(offsets, positions, side="right") - 1
    pieces = []
    for group in np.split(np.arange(len(positions)), np.flatnonzero(np.diff(shard)) + 1):
        s = int(shard[group[0]])
        index = positions[group] - offsets[s]
        first, stop = int(index[0]), int(index[-1]) + 1
        pieces.append(Piece(urls[s], first, stop, None if stop - first == len(index) else index))
    return tuple(pieces)


def worker_spans(total: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int) -> list[tuple[int, int, int]]:
    """(lo, hi, batches) of each worker of `rank`: its range of the `total` positions in play."""
    per_rank = total // world_size
    batches = per_rank // batch_size
    spans, lo = [], rank * per_rank
    for w in range(num_workers):
        k = worker_batches(batches, num_workers, w)
        spans.append((lo, lo + k * batch_size, k))
        lo += k * batch_size
    return spans


def plan_train(urls: list[str], counts: list[int], rank: int, world_size: int, num_workers: int,
               batch_size: int, seed: int, epoch: int, pool: np.ndarray | None = None) -> list[WorkerPlan]:
    """Every worker's share of the rank's training samples for `epoch` (see module docstring).

    `pool`: the epoch positions still to play, ascending (a later phase); None: all of them."""
    order = shard_order(len(urls), seed, epoch)
    urls, counts = [urls[i] for i in order], [counts[i] for i in order]
    total = sum(counts) if pool is None else len(pool)
    plans = []
    for w, (lo, hi, k) in enumerate(worker_spans(total, rank, world_size, num_workers, batch_size)):
        pieces = take_range(urls, counts, lo, hi) if pool is None else take_positions(urls, counts, pool[lo:hi])
        plans.append(WorkerPlan(w, pieces, k))
    return plans


def plan_val(urls: list[str], counts: list[int], rank: int, world_size: int, num_workers: int,
             batch_size: int) -> list[WorkerPlan]:
    """Every worker's share of the rank's validation samples; the tail batches may be padded."""
    total = sum(counts)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    batches = val_batches(total, world_size, batch_size)
    plans, first = [], 0
    for w in range(num_workers):
        k = worker_batches(batches, num_workers, w)
        a, b = min(lo + first * batch_size, hi), min(lo + (first + k) * batch_size, hi)
        plans.append(WorkerPlan(w, take_range(urls, counts, a, b), k))
        first += k
    return plans


def buffer_order(n: int, size: int, rng: np.random.Generator, steps: int | None = None) -> np.ndarray:
    """Emission order of a shuffle buffer of `size` fed positions 0..n-1 (its first `steps` only,
    when given: the same prefix, for what a stopped worker consumed).

    The buffer fills to `size`, then each step emits a random buffered item and refills the slot
    with the next position. Computing it up front over indices (not samples) is what makes
    resuming cheap: the reader knows which positions are still needed after any step, so it
    skips everything else instead of replaying the epoch. At most `size` items are held.
    """
    steps = n if steps is None else min(steps, n)
    if size <= 1 or n <= 1:
        return np.arange(steps, dtype=np.int64)
    buf = list(range(min(size, n)))
    following = len(buf)
    draws = rng.random(n)  # all n drawn, whatever `steps`: the prefix must not depend on it
    out = np.empty(steps, dtype=np.int64)
    for step in range(steps):
        slot = int(draws[step] * len(buf))
        out[step] = buf[slot]
        if following < n:
            buf[slot] = following
            following += 1
        else:
            buf[slot] = buf[-1]
            buf.pop()
    return out
