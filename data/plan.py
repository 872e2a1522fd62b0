"""Who reads which samples in an epoch: pure functions of (shards, rank, world, workers, seed, epoch).

The rule (train), chosen so that every rank yields the same number of batches however uneven the
shards are, and so that no sample is read by two ranks:

1. The shard list is permuted with a generator seeded by (seed, epoch).
2. The permuted shards are laid end to end as one sequence of N samples, and cut into `world`
   consecutive parts of n = N // world samples; the last N % world samples are dropped.
   A shard normally belongs to one rank; a shard that straddles a cut is read by the two
   neighbouring ranks, each taking its own sample range of it.
3. Each rank yields K = n // batch_size batches (the last n % batch_size samples of its part are
   dropped, like drop_last). Fewer samples per epoch are lost than one batch per rank, and a
   different set each epoch because the shard order changes.
4. Loader worker w of W takes K // W + (w < K % W) of those batches, as one consecutive range of
   the rank's part, and the loader interleaves the workers round-robin: batch j comes from worker
   j % W. Fewer shards than ranks x workers is fine: workers then read parts of the same shard.

Validation: shards in manifest order, rank r gets samples [r N / world, (r+1) N / world), every
rank yields ceil(ceil(N / world) / batch_size) batches, and missing slots are padding (valid=False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard (indices within the shard)."""

    url: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class WorkerPlan:
    """One loader worker's share of an epoch: its pieces in read order and its batch count."""

    worker: int
    pieces: tuple[Piece, ...]
    batches: int

    @property
    def samples(self) -> int:
        return sum(p.size for p in self.pieces)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation: identical on every rank, different every epoch."""
    rng = np.random.default_rng([seed, epoch, 0x5A4D])
    return [int(i) for i in rng.permutation(num_shards)]


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


def _split_workers(urls, counts, lo, hi, batches, num_workers, batch_size) -> list[WorkerPlan]:
    plans, first = [], 0
    for w in range(num_workers):
        k = worker_batches(batches, num_workers, w)
        a, b = min(lo + first * batch_size, hi), min(lo + (first + k) * batch_size, hi)
        plans.append(WorkerPlan(w, take_range(urls, counts, a, b), k))
        first += k
    return plans


def plan_train(urls: list[str], counts: list[int], rank: int, world_size: int, num_workers: int,
               batch_size: int, seed: int, epoch: int) -> list[WorkerPlan]:
    """Every worker's share of the rank's training samples for `epoch` (see module docstring)."""
    order = shard_order(len(urls), seed, epoch)
    urls, counts = [urls[i] for i in order], [counts[i] for i in order]
    per_rank = sum(counts) // world_size
    batches = train_batches(sum(counts), world_size, batch_size)
    lo = rank * per_rank
    return _split_workers(urls, counts, lo, lo + batches * batch_size, batches, num_workers, batch_size)


def plan_val(urls: list[str], counts: list[int], rank: int, world_size: int, num_workers: int,
             batch_size: int) -> list[WorkerPlan]:
    """Every worker's share of the rank's validation samples; the tail batches may be padded."""
    total = sum(counts)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    batches = val_batches(total, world_size, batch_size)
    return _split_workers(urls, counts, lo, hi, batches, num_workers, batch_size)


def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer of `size` fed positions 0..n-1.

    The buffer fills to `size`, then each step emits a random buffered item and refills the slot
    with the next position. Computing it up front over indices (not samples) is what makes
    resuming cheap: the reader knows which positions are still needed after any step, so it
    skips everything else instead of replaying the epoch. At most `size` items are held.
    """
    if size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    buf = list(range(min(size, n)))
    following = len(buf)
    draws = rng.random(n)
    out = np.empty(n, dtype=np.int64)
    for step in range(n):
        slot = int(draws[step] * len(buf))
        out[step] = buf[slot]
        if following < n:
            buf[slot] = following
            following += 1
        else:
            buf[slot] = buf[-1]
            buf.pop()
    return out
