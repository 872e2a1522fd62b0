"""The train loader's position in an epoch, independent of the rank and of the world size.

A position is the epoch and its phases (data.plan's docstring has the rule): each phase is the
layout that ran (world size, logical workers, batch size, shuffle buffer) and the batches every
rank yielded in it. That is the same on every rank and small; which epoch positions were consumed
is recomputed from it (`remaining`) by replaying each stopped worker's shuffle order up to the
emissions it made: O(samples consumed) in a Python loop, about 1.7 us a sample (2.3 s for the
1.28M of an ImageNet epoch, measured on a busy 2-core machine), once per loader worker process
and resumed epoch (cached for its later passes). Nothing per step depends on it.

States are JSON dicts: {"version": 2, "epoch", "phases": [...], "fingerprint": {"split",
"shards", "seed"}}. Version 1 states (one per-rank position and a fingerprint holding the layout)
migrate to one phase.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data.plan import batches_done, buffer_order, shuffle_rng, train_batches, worker_spans

STATE_VERSION = 2
MAX_PHASES = 64  # layout changes within one epoch (the worker cursor has room for this many)


class Phase(BaseModel):
    """One layout that played part of an epoch, and the batches every rank yielded in it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    world_size: int = Field(ge=1)
    num_workers: int = Field(ge=1, description="logical workers (num_workers 0 plays as 1)")
    batch_size: int = Field(ge=1)
    shuffle_buffer: int | None = Field(ge=1, description="None for validation (not shuffled)")
    batches: int = Field(ge=0)

    @property
    def samples(self) -> int:
        """Samples this phase consumed, over all ranks."""
        return self.world_size * self.batches * self.batch_size

    def same_layout(self, other: Phase) -> bool:
        return self.model_dump(exclude={"batches"}) == other.model_dump(exclude={"batches"})


class Fingerprint(BaseModel):
    """What must not change for a position to mean the same samples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: Literal["train", "val"]
    shards: str
    seed: int | None = None  # train only


class LoaderState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[2] = STATE_VERSION
    epoch: int = Field(ge=0)
    phases: list[Phase] = Field(default_factory=list)
    fingerprint: Fingerprint


def parse_state(state: Any) -> LoaderState:
    """A loader state (either version) as a `LoaderState`; ValueError in one line otherwise."""
    if isinstance(state, dict) and state.get("version") == 1:
        state = _migrate_v1(state)
    try:
        return LoaderState.model_validate(state)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "state"
        raise ValueError(f"loader state: {where}: {err['msg']}") from None


def _migrate_v1(old: dict) -> dict:
    """Version 1: {"epoch", "position" (batches per rank), "bad_samples", "fingerprint" with the
    layout}. The layout becomes the one phase; the per-rank bad-sample count is not kept."""
    fp = old.get("fingerprint", {})
    layout = {k: fp.get(k) for k in ("world_size", "num_workers", "batch_size", "shuffle_buffer")}
    phase = {**layout, "batches": old.get("position")}
    return {"version": STATE_VERSION, "epoch": old.get("epoch"),
            "phases": [phase] if phase["batches"] else [],
            "fingerprint": {k: fp.get(k) for k in ("split", "shards", "seed")}}


def pool_sizes(total: int, phases: list[Phase]) -> list[int]:
    """Positions in play at the start of each phase, and after the last one; ValueError naming
    the phase if one claims more batches than its layout had."""
    sizes = [total]
    for i, p in enumerate(phases):
        if p.shuffle_buffer is None:
            raise ValueError(f"loader state: phase {i} has no shuffle_buffer (a validation position?)")
        most = train_batches(sizes[-1], p.world_size, p.batch_size)
        if p.batches > most:
            raise ValueError(f"loader state: phase {i} ({p.world_size} ranks of batch {p.batch_size}) says "
                             f"{p.batches} batches per rank, but only {most} fit its {sizes[-1]} samples")
        sizes.append(sizes[-1] - p.samples)
    return sizes


def consumed(pool: np.ndarray, phase: Phase, index: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch positions that phase number `index`, played over `pool`, consumed (all ranks)."""
    out = []
    for rank in range(phase.world_size):
        spans = worker_spans(len(pool), rank, phase.world_size, phase.num_workers, phase.batch_size)
        for w, (lo, hi, _) in enumerate(spans):
            done = batches_done(phase.batches, phase.num_workers, w) * phase.batch_size
            rng = shuffle_rng(seed, epoch, index, rank, w)
            out.append(pool[lo:hi][buffer_order(hi - lo, phase.shuffle_buffer, rng, steps=done)])
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


@functools.lru_cache(maxsize=2)
def remaining(total: int, seed: int, epoch: int, phases: tuple[Phase, ...]) -> np.ndarray:
    """The ascending epoch positions that `phases` left unread (read-only; cached because every
    pass of a resumed epoch in a worker needs it again)."""
    pool_sizes(total, list(phases))
    pool = np.arange(total, dtype=np.int64)
    for index, phase in enumerate(phases):
        taken = np.zeros(total, dtype=bool)
        taken[consumed(pool, phase, index, seed, epoch)] = True
        pool = pool[~taken[pool]]
    pool.flags.writeable = False
    return pool
