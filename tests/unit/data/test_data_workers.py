"""Loader worker processes: started once per loader, never forked from the training process, and
exact across epochs, partial passes and resumes (tiny real shards, 2 workers).

Workers are found as child processes of this test process that appeared after the loader was
made (the multiprocessing resource tracker left out).
"""

from __future__ import annotations

import json

import psutil
import pytest
import torch

from data import CorruptShardError, DataConfig, make_train_loader, make_val_loader
from data.testing import write_indexed_shards
from tests.unit.data.test_data_loader import _cfg as _in_process_cfg
from tests.unit.data.test_data_loader import shards  # noqa: F401  (the same tiny shard set)


def _cfg(src, **kw) -> DataConfig:
    return _in_process_cfg(src, **{"num_workers": 2, **kw})


def _children() -> dict[int, psutil.Process]:
    found = {}
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    return found


def _new_workers(before: dict) -> set[int]:
    return set(_children()) - set(before)


def _play(loader, epoch, stop=None) -> list[tuple]:
    loader.set_epoch(epoch)
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == stop:
            break
    return got


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


def _close(*loaders) -> None:
    for loader in loaders:
        loader.close()


def test_workers_start_once_per_loader_and_are_not_forks(shards):
    before = _children()
    train, val = make_train_loader(_cfg(shards), 0, 1), make_val_loader(_cfg(shards), 0, 1)
    try:
        during = []
        for epoch in range(3):
            for loader in (train, val):
                loader.set_epoch(epoch)
                it = iter(loader)
                next(it)  # mid-pass: the pass's workers are alive whatever their lifetime
                during.append(_new_workers(before))
                list(it)
        everyone = set().union(*during)
        assert len(everyone) == 4, f"{len(everyone)} worker processes for 2 loaders x 2 workers"
        assert all(seen == everyone for seen in during[1:]), "a pass started new workers"
        me = psutil.Process()
        for pid in everyone:
            worker = psutil.Process(pid)
            # A forked child runs the parent's command line; a spawned one a fresh interpreter's.
            assert worker.cmdline() != me.cmdline(), f"worker {pid} is a fork of the training process"
            assert worker.ppid() == me.pid  # a direct child: it notices when the trainer dies
    finally:
        _close(train, val)


def test_resume_on_a_running_loader_is_exact_and_keeps_its_workers(shards):
    before = _children()
    loader = make_train_loader(_cfg(shards, transform="imagenet"), 0, 1)
    try:
        expected = _play(loader, 2)
        workers = _new_workers(before)
        assert len(workers) == 2, "workers do not outlive a pass"
        _play(loader, 2, stop=5)
        state = json.loads(json.dumps(loader.state_dict()))
        assert (state["epoch"], state["phases"][-1]["batches"]) == (2, 5)
        _play(loader, 3, stop=2)  # the workers move on (stale prefetched batches in flight) ...
        loader.load_state_dict(state)  # ... and are sent back to epoch 2, batch 5
        loader.set_epoch(2)
        assert _same(list(loader), expected[5:])
        assert len(_play(loader, 2)) == len(expected)  # the next pass starts the epoch from batch 0
        assert _new_workers(before) == workers
    finally:
        loader.close()


def test_partial_epoch_then_next_epoch_is_exact(shards):
    before = _children()
    loader = make_train_loader(_cfg(shards), 0, 1)
    val = make_val_loader(_cfg(shards), 0, 1)
    try:
        epoch1 = _play(loader, 1)
        epoch2 = _play(loader, 2)
        validation = _play(val, 0)
        workers = _new_workers(before)
        # BN recalibration: a few batches of epoch 2, validation, then the whole of epoch 2
        assert _same(_play(loader, 2, stop=2), epoch2[:2])
        assert _same(_play(val, 0, stop=1), validation[:1])
        assert _same(_play(val, 0), validation)
        assert _same(_play(loader, 2), epoch2)
        # a partial epoch followed by the next epoch, and by an earlier one
        assert _same(_play(loader, 1, stop=3), epoch1[:3])
        assert _same(_play(loader, 2), epoch2)
        assert _same(_play(loader, 2, stop=1), epoch2[:1])
        assert _same(_play(loader, 1), epoch1)
        assert _new_workers(before) == workers and len(workers) == 4
    finally:
        _close(loader, val)


def test_worker_errors_surface_and_the_loader_recovers(tmp_path):
    src = write_indexed_shards(tmp_path, {"train": [20, 20]}, broken={21, 22, 23}).parent
    before = _children()
    loader = make_train_loader(_cfg(src, max_bad_fraction=0.1), 0, 1)
    try:
        with pytest.raises(CorruptShardError, match="train-000001.tar"):
            _play(loader, 0)
        assert not _new_workers(before)  # a failed pass stops its workers ...
        with pytest.raises(CorruptShardError, match="max_bad_fraction=0.1"):
            _play(loader, 1)  # ... and the next pass starts fresh ones that fail the same way
    finally:
        loader.close()


def test_close_is_idempotent_and_garbage_collection_stops_workers(shards):
    before = _children()
    loader = make_train_loader(_cfg(shards), 0, 1)
    first = _play(loader, 0)
    workers = [psutil.Process(pid) for pid in _new_workers(before)]
    assert len(workers) == 2
    loader.close()
    loader.close()
    assert not _new_workers(before)
    assert _same(_play(loader, 0), first)  # a closed loader starts workers again when iterated
    workers = [psutil.Process(pid) for pid in _new_workers(before)]
    assert len(workers) == 2
    del loader  # no close(): dropping the last reference stops them too
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers {[p.pid for p in alive]} outlived their loader"


def test_an_abandoned_iteration_cannot_be_resumed(shards):
    loader = make_train_loader(_cfg(shards, num_workers=0), 0, 1)
    old = iter(loader)
    next(old)
    assert len(list(loader)) == len(loader)
    with pytest.raises(RuntimeError, match="iterated again"):
        next(old)


def test_mp_context_defaults_to_spawn_and_fork_needs_asking():
    assert DataConfig().mp_context == "spawn"
    assert DataConfig(mp_context=None).mp_context == "spawn"  # configs written when null meant fork
    assert DataConfig(mp_context="fork").mp_context == "fork"
    with pytest.raises(ValueError, match="mp_context"):
        DataConfig(mp_context="threads")


def _sleep_long() -> None:
    import time

    time.sleep(60)


def test_close_survives_a_worker_that_aborts_while_exiting():
    """torch raises from its SIGCHLD handler when a worker dies by a signal during the join (a
    native thread aborting at teardown, seen in a suite run); close() must still stop every worker
    and raise nothing, so the error that made the loader close is the one the user sees."""
    import multiprocessing

    from data.loader import _WorkerPool

    worker = multiprocessing.get_context("spawn").Process(target=_sleep_long)
    worker.start()

    class AbortingShutdown:  # torch's iterator at the moment its join is interrupted
        _workers = [worker]

        def _shutdown_workers(self):
            raise RuntimeError(f"DataLoader worker (pid {worker.pid}) is killed by signal: Aborted.")

    pool = _WorkerPool.__new__(_WorkerPool)
    pool.iterator = AbortingShutdown()
    pool.close()
    assert not worker.is_alive() and pool.iterator is None
