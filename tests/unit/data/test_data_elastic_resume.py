"""A train loader stopped on N ranks resumes on M ranks within the same epoch (real tar shards whose
labels are sample ids): every sample of the epoch is read once, none twice, and exactly the
documented remainder is dropped.

The expected remainder is computed here from what the loaders delivered, not from the loader's own
bookkeeping: the samples not yet read, in epoch order (the shard permutation of `shard_order`), are
cut into M equal parts; what does not fill a batch on every rank is dropped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from data import DataConfig, make_train_loader
from data.plan import shard_order
from data.sources import resolve_source
from data.testing import write_indexed_shards

COUNTS = [37, 5, 61, 1, 20, 26, 0, 9]  # uneven, a one-sample shard and an empty one
TOTAL = sum(COUNTS)
EPOCH = 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_indexed_shards(tmp_path_factory.mktemp("elastic"), {"train": COUNTS, "val": [4]}).parent


def _cfg(src, **kw) -> DataConfig:
    base = dict(train=str(src), image_size=8, transform="cifar", batch_size=4, num_workers=0,
                shuffle_buffer=8, seed=5)
    return DataConfig(**{**base, **kw})


def _play(loader, stop=None) -> list[int]:
    """Sample ids of the batches one pass yields (all of them, or the first `stop` batches)."""
    loader.set_epoch(EPOCH)
    ids, batches = [], 0
    for _, labels in loader:
        ids += labels.tolist()
        batches += 1
        if batches == stop:
            break
    return ids


def _ranks(cfg, world, stop=None, state=None):
    """Every rank of a `world`-rank run: (ids per rank, state per rank, a loader to inspect)."""
    ids, states, loaders = [], [], []
    for rank in range(world):
        loader = make_train_loader(cfg, rank, world)
        try:
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))
            ids.append(_play(loader, stop))
            states.append(json.loads(json.dumps(loader.state_dict())))
            loaders.append(loader)
        finally:
            loader.close()
    assert all(s == states[0] for s in states), "ranks wrote different loader states"
    return ids, states[0], loaders


def _epoch_position(seed: int, epoch: int) -> dict[int, int]:
    """Sample id -> index in the epoch's sequence of permuted shards laid end to end."""
    starts = np.concatenate([[0], np.cumsum(COUNTS)])
    sequence = [i for s in shard_order(len(COUNTS), seed, epoch) for i in range(starts[s], starts[s + 1])]
    return {sample: index for index, sample in enumerate(sequence)}


def _expected_drop(read: set[int], world: int, batch: int, seed: int) -> set[int]:
    """The documented remainder: unread samples in epoch order, cut into `world` equal parts, each
    part's tail that does not fill a batch, and the last len % world samples."""
    position = _epoch_position(seed, EPOCH)
    pool = sorted((i for i in range(TOTAL) if i not in read), key=position.__getitem__)
    part = len(pool) // world
    placed = {i for r in range(world) for i in pool[r * part: r * part + part // batch * batch]}
    return set(pool) - placed


def _check_epoch(phases: list[list[list[int]]], last_loaders, batch: int, seed: int = 5) -> None:
    everything = [i for phase in phases for rank in phase for i in rank]
    assert len(everything) == len(set(everything)), "a sample was read twice in the epoch"
    before = {i for phase in phases[:-1] for rank in phase for i in rank}
    dropped = set(range(TOTAL)) - set(everything)
    assert dropped == _expected_drop(before, len(last_loaders), batch, seed)
    for loader in last_loaders:
        assert loader.samples_done() == loader.epoch_samples() == len(everything)
        assert TOTAL - loader.epoch_samples() == len(dropped) < len(last_loaders) * (batch + 1)
    counts = {len(rank) for rank in phases[-1]}
    assert counts == {len(last_loaders[0]) * batch}, "ranks yielded different batch counts"


@pytest.mark.parametrize("before,after,k,buffer", [
    ((2, 0, 4), (1, 2, 4), 3, 8),    # (world, num_workers, batch) stopped -> resumed
    ((1, 2, 4), (2, 0, 3), 7, 16),
    ((4, 0, 3), (2, 0, 5), 2, 1),     # no shuffle buffer, batch size changes
    ((3, 2, 4), (2, 0, 4), 4, 32),
])
def test_resume_on_another_world_reads_every_sample_once(shards, before, after, k, buffer):
    (n, wa, ba), (m, wb, bb) = before, after
    first, state, stopped = _ranks(_cfg(shards, num_workers=wa, batch_size=ba, shuffle_buffer=buffer), n, stop=k)
    assert all(len(ids) == k * ba for ids in first)
    assert stopped[0].samples_done() == n * k * ba
    rest, _, resumed = _ranks(_cfg(shards, num_workers=wb, batch_size=bb, shuffle_buffer=buffer), m, state=state)
    assert resumed[0].position == len(resumed[0])  # the pass ran to the end of the resumed phase
    _check_epoch([first, rest], resumed, bb)


def test_chained_resume_two_three_one(shards):
    cfg = _cfg(shards, shuffle_buffer=12)
    first, state, _ = _ranks(cfg, 2, stop=4)
    second, state2, middle = _ranks(cfg, 3, stop=2, state=state)
    assert [p["world_size"] for p in state2["phases"]] == [2, 3]
    assert middle[0].samples_done() == 2 * 4 * 4 + 3 * 2 * 4
    third, _, last = _ranks(_cfg(shards, batch_size=5, num_workers=2), 1, state=state2)
    _check_epoch([first, second, third], last, 5)


def test_resume_on_the_same_layout_continues_the_phase_exactly(shards):
    cfg = _cfg(shards)
    whole, _, _ = _ranks(cfg, 2)
    first, state, _ = _ranks(cfg, 2, stop=3)
    rest, state_after, loaders = _ranks(cfg, 2, state=state)
    assert [a + b for a, b in zip(first, rest)] == whole  # same batches, same order, same ranks
    assert len(state_after["phases"]) == 1 and len(loaders[0]) == state_after["phases"][0]["batches"]


def test_next_epoch_is_planned_normally_at_the_new_world(shards):
    _, state, _ = _ranks(_cfg(shards), 2, stop=3)
    loader = make_train_loader(_cfg(shards), 0, 1)
    loader.load_state_dict(state)
    loader.set_epoch(EPOCH)
    assert len(loader) < TOTAL // 4 and loader.samples_done() == 2 * 3 * 4
    loader.set_epoch(EPOCH + 1)
    assert len(loader) == TOTAL // 4 and loader.samples_done() == 0
    ids = [i for _, labels in loader for i in labels.tolist()]
    fresh = make_train_loader(_cfg(shards), 0, 1)
    fresh.set_epoch(EPOCH + 1)
    assert ids == [i for _, labels in fresh for i in labels.tolist()]


def test_state_is_identical_on_every_rank_small_and_json(tmp_path):
    # a broken sample on one rank only: each rank counts different bad samples, the state must not
    src = write_indexed_shards(tmp_path, {"train": [40, 40, 40]}, broken={2}).parent
    cfg = _cfg(src, max_bad_fraction=0.5, shuffle_buffer=1)
    states, bad = [], []
    for rank in range(3):
        loader = make_train_loader(cfg, rank, 3)
        _play(loader, stop=2)
        states.append(loader.state_dict())
        bad.append(loader.bad_samples)
    assert sorted(bad) == [0, 0, 1]
    assert states[0] == states[1] == states[2]
    assert json.loads(json.dumps(states[0])) == states[0] and len(json.dumps(states[0])) < 400
    assert states[0]["phases"] == [{"world_size": 3, "num_workers": 1, "batch_size": 4,
                                    "shuffle_buffer": 1, "batches": 2}]


def test_a_state_written_before_phases_still_loads(shards):
    cfg = _cfg(shards)
    digest = resolve_source(str(shards), "train").digest()
    old = {"version": 1, "epoch": EPOCH, "position": 3, "bad_samples": 2,  # what the old code wrote
           "fingerprint": {"split": "train", "shards": digest, "world_size": 2, "num_workers": 1,
                           "batch_size": 4, "seed": 5, "shuffle_buffer": 8}}
    whole, _, _ = _ranks(cfg, 2)
    rest, _, _ = _ranks(cfg, 2, state=old)  # same layout: the exact continuation
    assert rest == [ids[3 * 4:] for ids in whole]
    first = [ids[: 3 * 4] for ids in whole]
    elsewhere, _, loaders = _ranks(_cfg(shards, batch_size=6), 1, state=old)
    _check_epoch([first, elsewhere], loaders, 6)


def test_another_shard_set_or_seed_is_refused_naming_it(shards, tmp_path):
    loader = make_train_loader(_cfg(shards, batch_size=2), 0, 1)
    _play(loader, stop=2)
    state = loader.state_dict()
    make_train_loader(_cfg(shards, batch_size=3), 0, 2).load_state_dict(state)  # layouts may change
    other = write_indexed_shards(tmp_path, {"train": [37, 5, 61, 1, 20, 26, 9]}).parent
    with pytest.raises(ValueError, match="shards") as err:
        make_train_loader(_cfg(other), 0, 1).load_state_dict(state)
    assert "\n" not in str(err.value) and "seed" not in str(err.value)
    with pytest.raises(ValueError, match=r"seed: 5 -> 6"):
        make_train_loader(_cfg(shards, seed=6), 0, 1).load_state_dict(state)


def test_a_state_beyond_its_own_layout_is_refused(shards):
    state = make_train_loader(_cfg(shards), 0, 2).state_dict()
    state["phases"] = [{"world_size": 2, "num_workers": 1, "batch_size": 4, "shuffle_buffer": 8,
                        "batches": TOTAL}]
    with pytest.raises(ValueError, match="phase 0"):
        make_train_loader(_cfg(shards), 0, 1).load_state_dict(state)
