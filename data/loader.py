"""`StreamingLoader`: one rank's view of a shard set, with an exact, resumable position.

The rank and world size are passed in (the trainer reads them from torch.distributed); this
module never talks to other ranks. Equal batch counts on every rank follow from the planning
rule in `data.plan`, which every rank evaluates identically. The train position is the same on
every rank and does not depend on the world size (`data.position`): a run stopped on N ranks
resumes on M ranks within the same epoch, every sample of the epoch read once.

Worker processes are started once per loader, on its first pass, and kept until `close()`: a
training process holds many threads (Ray, wandb, gloo), and starting workers per pass, by fork,
once hung a run (the child deadlocked inside fork on a lock another thread held).
"""

from __future__ import annotations

from typing import Any

import torch.multiprocessing
from torch.utils.data import DataLoader

from data.config import DataConfig
from data.plan import train_batches, val_batches
from data.position import MAX_PHASES, Fingerprint, LoaderState, Phase, parse_state, pool_sizes
from data.sources import ShardSet, resolve_source
from data.stream import EpochCursor, EpochPlanner, RunStream, StreamSpec


class StreamingLoader:
    """Batches of one rank for one epoch at a time.

    Use: `loader.set_epoch(e)`, then iterate. Train batches are `(images, labels)`, val batches
    `(images, labels, valid)`; images are uint8 [B, 3, S, S] (normalise them on the device with
    `data.normalize`), labels int64 [B], and `valid` marks the padding that evens out the ranks
    (exclude valid=False items from metrics). Every batch has exactly `batch_size` items.

    Position. An epoch is played in phases (data.plan): a fresh epoch is one phase; loading a
    state written under another layout (world size, workers, batch size or shuffle buffer) starts
    a new phase over the samples the epoch has not read yet.
    - `len(loader)`: batches per rank in the current phase, counted from the phase's start (the
      whole epoch unless resumed on another layout); the same on every rank.
    - `position`: batches of the current phase yielded so far (a pass yields len - position
      after a resume, len otherwise).
    - `samples_done()`: samples consumed in this epoch over all ranks and phases, the batch just
      yielded included; `epoch_samples()`: what it reaches at the epoch's end. Their ratio is the
      fraction of the epoch done, whatever the world size history.
    `state_dict()` is that position: JSON-able, small, identical on every rank (so any rank's
    state resumes every rank, at any world size). After `load_state_dict`, the next iteration of
    that epoch goes on from there: on the same layout it yields exactly what an uninterrupted run
    would have yielded next; on another one it plays the rest of the epoch (see data.plan for the
    few samples the last phase drops). Later iterations of the same epoch replay the current
    phase from its start, like a DataLoader; `set_epoch` to another epoch starts that epoch whole.

    `bad_samples` counts unreadable samples this rank met (a metric, not in the state: it differs
    per rank): in training their slot is filled by another sample of the same batch; in
    validation it is marked valid=False.

    With `num_workers` > 0 the worker processes start on the first iteration and serve every
    later one (`cfg.mp_context`, spawn by default); `close()` stops them (the training code calls
    it at the end of a run; garbage collection does it too). One iteration at a time: starting a
    new one abandons the previous, whose generator then raises if resumed.
    """

    def __init__(self, shards: ShardSet, cfg: DataConfig, rank: int, world_size: int, train: bool):
        _check_rank(rank, world_size)
        self.shards, self.cfg, self.rank, self.world_size, self.train = shards, cfg, rank, world_size, train
        self.num_workers = max(1, cfg.num_workers)  # logical workers; 0 means one, in-process
        self.epoch, self.position, self.bad_samples = 0, 0, 0
        self.prior: tuple[Phase, ...] = ()  # the epoch's earlier phases (after a resume elsewhere)
        self._resume_at: int | None = None
        self._planner = self._make_planner()
        self._workers: _WorkerPool | None = None  # started by the first pass with num_workers > 0
        self._pass = 0  # counts iterations; an abandoned one must not be resumed
        self._count = train_batches if train else val_batches
        self.batches = self._count(shards.total, world_size, cfg.batch_size)  # in the current phase
        if self.batches == 0:
            raise ValueError(
                f"{shards.source}: {shards.total} {'train' if train else 'val'} samples are fewer than "
                f"world_size x batch_size = {world_size} x {cfg.batch_size}; lower data.batch_size")

    @property
    def classes(self) -> list[str] | None:
        return self.shards.classes

    @property
    def num_classes(self) -> int | None:
        return None if self.shards.classes is None else len(self.shards.classes)

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration plays (shard order and augmentation depend on it).
        Another epoch than the current one starts whole, at this loader's layout."""
        if epoch != self.epoch:
            self._resume_at, self.position = None, 0
            self._set_prior(())
        self.epoch = int(epoch)

    @property
    def next_start(self) -> int:
        """Batch position the next iteration starts at: a restored position, else 0 (a new pass
        replays the current phase from its start)."""
        return self._resume_at or 0

    def samples_done(self) -> int:
        """Samples consumed so far in this epoch, over all ranks and phases."""
        return sum(p.samples for p in self.prior) + self._phase(self.position).samples

    def epoch_samples(self) -> int:
        """Samples the epoch consumes in all once its current phase ends (the total minus the
        samples its last phase cannot place, data.plan)."""
        return sum(p.samples for p in self.prior) + self._phase(self.batches).samples

    def _phase(self, batches: int) -> Phase:
        """This loader's layout, having yielded `batches` batches."""
        c = self.cfg
        return Phase(world_size=self.world_size, num_workers=self.num_workers, batch_size=c.batch_size,
                     shuffle_buffer=c.shuffle_buffer if self.train else None, batches=batches)

    def _set_prior(self, prior: tuple[Phase, ...]) -> None:
        left = pool_sizes(self.shards.total, list(prior))[-1]
        self.prior, self.batches = prior, self._count(left, self.world_size, self.cfg.batch_size)

    def _make_planner(self) -> EpochPlanner:
        c = self.cfg
        spec = StreamSpec(
            train=self.train, batch_size=c.batch_size, image_size=c.image_size, transform=c.transform,
            crop_fraction=c.val_crop_fraction, shuffle_buffer=c.shuffle_buffer, seed=c.seed,
            epoch=0, rank=self.rank, max_bad_fraction=c.max_bad_fraction,
            shard_counts=dict(zip(self.shards.urls, self.shards.counts)), num_classes=self.num_classes)
        return EpochPlanner(tuple(self.shards.urls), tuple(self.shards.counts), self.world_size,
                            self.num_workers, spec)

    def _batches(self, start: int):
        if self.cfg.num_workers == 0:
            return iter(self._planner.stream(self.epoch, start, self.prior))
        if self._workers is None:
            self._workers = _WorkerPool(self._planner, self.cfg)
        return self._workers.play(self.epoch, start, self.prior)

    def __iter__(self):
        start, self._resume_at = (self._resume_at or 0), None
        self._pass += 1
        this_pass, self.position = self._pass, start
        try:
            for images, labels, valid, (worker, index, bad) in self._batches(start):
                assert worker == self.position % self.num_workers and index == self.position // self.num_workers, \
                    f"batch order broken: got worker {worker} batch {index} at position {self.position}"
                self.position += 1
                self.bad_samples += bad
                yield (images, labels) if self.train else (images, labels, valid)
                if self._pass != this_pass:  # the workers now serve the newer pass
                    raise RuntimeError("this loader was iterated again; an abandoned iteration cannot go on")
        except Exception:
            if self._pass == this_pass:
                self.close()  # torch's iterator state is unknown after a failed pass: fresh workers next time
            raise

    def close(self) -> None:
        """Stop the worker processes (if any). Idempotent; a later iteration starts new ones."""
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.close()

    def _fingerprint(self) -> Fingerprint:
        return Fingerprint(split="train" if self.train else "val", shards=self.shards.digest(),
                           seed=self.cfg.seed if self.train else None)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position, the same on every rank: {"version", "epoch", "phases",
        "fingerprint"}; phases that yielded nothing are left out."""
        phases = [p for p in (*self.prior, self._phase(self.position)) if p.batches > 0]
        return LoaderState(epoch=self.epoch, phases=phases, fingerprint=self._fingerprint()).model_dump()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`'s position, written at any world size, worker count, batch size or
        shuffle buffer (older per-rank states too). ValueError in one line if it belongs to
        another shard set, split or seed, or does not fit its own layouts."""
        saved = parse_state(state)
        mine, theirs = self._fingerprint().model_dump(), saved.fingerprint.model_dump()
        changed = [f"{k}: {theirs[k]!r} -> {v!r}" for k, v in mine.items() if theirs[k] != v]
        if changed:
            raise ValueError("cannot resume the data position, the saved state differs in " + "; ".join(changed))
        phases = [p for p in saved.phases if p.batches > 0]
        here = self._phase(0)
        if phases and phases[-1].same_layout(here):  # the stopped phase goes on exactly
            prior, position = tuple(phases[:-1]), phases[-1].batches
        else:
            prior, position = tuple(phases), 0
        if prior and not self.train:
            raise ValueError("a validation position resumes only on the layout that wrote it: "
                             f"{phases[-1].model_dump(exclude={'batches'})} -> {here.model_dump(exclude={'batches'})}")
        if len(prior) > MAX_PHASES:
            raise ValueError(f"loader state: more than {MAX_PHASES} layout changes within epoch {saved.epoch}")
        if self.train:
            pool_sizes(self.shards.total, [*prior, here.model_copy(update={"batches": position})])
        elif position > self.batches:
            raise ValueError(f"loader state: {position} validation batches, but there are only {self.batches}")
        self.epoch, self.position, self._resume_at = saved.epoch, position, position
        self._set_prior(prior)


class _WorkerPool:
    """One loader's worker processes, started on the first pass and kept for the whole run.

    A single DataLoader with persistent workers over a `RunStream`: before each pass the main
    process writes (epoch, start, earlier phases) into the shared cursor, then `iter()` makes
    torch start the workers (first pass) or tell them that a new pass begins (every later one).
    """

    def __init__(self, planner: EpochPlanner, cfg: DataConfig):
        ctx = torch.multiprocessing.get_context(cfg.mp_context)
        self.cursor = EpochCursor(ctx)  # created before the workers start: they inherit it
        self.loader = DataLoader(RunStream(planner, self.cursor), batch_size=None, num_workers=cfg.num_workers,
                                 prefetch_factor=cfg.prefetch_factor, persistent_workers=True,
                                 pin_memory=cfg.pin_memory, multiprocessing_context=ctx)
        self.iterator = None

    def play(self, epoch: int, start: int, prior: tuple[Phase, ...] = ()):
        self.cursor.set(epoch, start, prior)
        self.iterator = iter(self.loader)  # the same torch iterator every pass (persistent workers)
        return self.iterator

    def close(self) -> None:
        iterator, self.iterator = self.iterator, None
        if iterator is None:
            return
        # torch's own shutdown (what the iterator's __del__ runs), made deterministic: stop the
        # workers, join them, kill any that do not exit. A worker can abort while exiting
        # ("terminate called without an active exception" from a native thread at teardown, seen
        # once in ~20 suite runs); torch's SIGCHLD handler then raises in the middle of the join.
        # That must not replace the error that made us close (a corrupt shard), so finish the
        # shutdown by hand instead.
        try:
            iterator._shutdown_workers()
        except RuntimeError:
            for worker in getattr(iterator, "_workers", []):
                if worker.is_alive():
                    worker.terminate()
                worker.join(timeout=5)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


def make_train_loader(cfg: DataConfig, rank: int, world_size: int) -> StreamingLoader:
    """The training loader of `rank` of `world_size` (shards checked at construction)."""
    _check_rank(rank, world_size)
    if cfg.train is None:
        raise ValueError("data.train: no training shard source configured")
    return StreamingLoader(resolve_source(cfg.train, "train", cfg.check_sources), cfg, rank, world_size, True)


def make_val_loader(cfg: DataConfig, rank: int, world_size: int) -> StreamingLoader:
    """The validation loader: every val sample once across ranks, padding flagged valid=False."""
    _check_rank(rank, world_size)
    if cfg.val is None:
        raise ValueError("data.val: no validation shard source configured")
    return StreamingLoader(resolve_source(cfg.val, "val", cfg.check_sources), cfg, rank, world_size, False)
