"""The streaming loader on real tar shards in a tmp dir (labels carry sample ids)."""

from __future__ import annotations

import json

import pytest
import torch

from data import CorruptShardError, DataConfig, make_train_loader, make_val_loader
from data.testing import write_indexed_shards

COUNTS = {"train": [23, 4, 31, 9], "val": [11, 6]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_indexed_shards(tmp_path_factory.mktemp("idx"), COUNTS).parent


def _cfg(src, **kw):
    base = dict(train=str(src), val=str(src), image_size=8, transform="cifar", batch_size=4,
                num_workers=0, shuffle_buffer=8, seed=5)
    return DataConfig(**{**base, **kw})


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [labels.tolist() for _, labels in loader]


def test_batches_are_uint8_full_and_distinct(shards):
    loader = make_train_loader(_cfg(shards), rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) == sum(COUNTS["train"]) // 4
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert labels.dtype == torch.int64
    ids = [i for _, labels in batches for i in labels.tolist()]
    assert len(ids) == len(set(ids)) == len(loader) * 4


def test_epochs_reshuffle_and_runs_repeat(shards):
    a = make_train_loader(_cfg(shards), 0, 1)
    b = make_train_loader(_cfg(shards), 0, 1)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 1) != _epoch(make_train_loader(_cfg(shards, seed=6), 0, 1), 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_yields_what_an_uninterrupted_run_would(shards, workers):
    cfg = _cfg(shards, num_workers=workers, transform="imagenet")
    run = make_train_loader(cfg, 0, 1)
    resumed = make_train_loader(cfg, 0, 1)  # a new run; its second resume finds its workers running
    try:
        run.set_epoch(2)
        expected = list(run)
        for stop_after in (1, 5):
            run.set_epoch(2)
            for step, _ in enumerate(run, 1):
                if step == stop_after:
                    break
            state = json.loads(json.dumps(run.state_dict()))  # must survive JSON
            assert state["phases"][-1]["batches"] == stop_after and state["epoch"] == 2
            resumed.load_state_dict(state)
            resumed.set_epoch(2)
            rest = list(resumed)
            assert len(rest) == len(expected) - stop_after
            for (xa, ya), (xb, yb) in zip(expected[stop_after:], rest):
                assert torch.equal(ya, yb) and torch.equal(xa, xb)
        resumed.set_epoch(3)  # the next epoch starts from its first batch
        assert len(list(resumed)) == len(expected)
    finally:
        run.close()
        resumed.close()


def test_resume_refuses_another_seed_but_not_another_batch_size(shards):
    state = make_train_loader(_cfg(shards), 0, 1).state_dict()
    make_train_loader(_cfg(shards, batch_size=2), 0, 1).load_state_dict(state)  # the rest of the epoch
    with pytest.raises(ValueError, match="seed"):
        make_train_loader(_cfg(shards, seed=9), 0, 1).load_state_dict(state)


def test_iterating_again_without_a_loaded_state_restarts_the_epoch(shards):
    loader = make_train_loader(_cfg(shards), 0, 1)
    first = next(iter(loader))[1].tolist()
    assert next(iter(loader))[1].tolist() == first


def test_val_sees_every_sample_once_and_flags_padding(shards):
    total = sum(COUNTS["val"])
    seen, counts = [], set()
    for rank in range(3):
        loader = make_val_loader(_cfg(shards, num_workers=2), rank, 3)
        batches = list(loader)
        loader.close()
        counts.add(len(batches))
        for _, labels, valid in batches:
            seen += labels[valid].tolist()
    assert counts == {len(loader)}
    assert sorted(seen) == list(range(total))


def test_corrupt_samples_are_skipped_counted_and_replaced(tmp_path):
    broken = {3, 17, 40}
    src = write_indexed_shards(tmp_path, {"train": [25, 25], "val": [25, 25]}, broken=broken).parent
    loader = make_train_loader(_cfg(src, shuffle_buffer=1, max_bad_fraction=0.2), 0, 1)
    ids = [i for _, labels in loader for i in labels.tolist()]
    assert loader.bad_samples == len(broken) and len(ids) == len(loader) * 4
    assert not broken & set(ids)
    val = make_val_loader(_cfg(src, max_bad_fraction=0.2), 0, 1)
    valid_ids = [i for _, labels, valid in val for i in labels[valid].tolist()]
    assert sorted(valid_ids) == sorted(set(range(50)) - broken) and val.bad_samples == 3


def test_too_many_bad_samples_raise_naming_the_shard(tmp_path):
    src = write_indexed_shards(tmp_path, {"train": [20, 20]}, broken={21, 22, 23}).parent
    loader = make_train_loader(_cfg(src, max_bad_fraction=0.1), 0, 1)
    with pytest.raises(CorruptShardError, match="train-000001.tar"):
        list(loader)


def test_truncated_shard_counts_the_missing_samples(tmp_path):
    src = write_indexed_shards(tmp_path, {"train": [30, 30]}).parent
    shard = src / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # cuts it mid-sample
    loader = make_train_loader(_cfg(src, max_bad_fraction=0.9, shuffle_buffer=4), 0, 1)
    ids = {i for _, labels in loader for i in labels.tolist()}
    assert 10 <= loader.bad_samples <= 20  # the lost half of the shard
    assert max(ids) < 30 + (30 - loader.bad_samples)
    strict = make_train_loader(_cfg(src, max_bad_fraction=0.1), 0, 1)
    with pytest.raises(CorruptShardError, match="train-000001.tar"):
        list(strict)


def test_missing_shard_is_an_error_at_start(tmp_path):
    src = write_indexed_shards(tmp_path, {"train": [8, 8]}).parent
    (src / "train-000001.tar").unlink()
    with pytest.raises(ValueError, match="train-000001.tar"):
        make_train_loader(_cfg(src), 0, 1)
    with pytest.raises(ValueError, match="no manifest"):
        make_train_loader(_cfg(tmp_path / "nowhere" / "manifest.json"), 0, 1)


def test_brace_urls_without_manifest(shards):
    pattern = str(shards / "train-{000000..000003}.tar")
    loader = make_train_loader(_cfg(shards, train=pattern), 0, 1)
    assert loader.num_classes is None
    assert len(loader) == sum(COUNTS["train"]) // 4
    assert len({i for _, labels in loader for i in labels.tolist()}) == len(loader) * 4


def test_too_small_for_the_world_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="batch_size"):
        make_train_loader(_cfg(shards, batch_size=64), 0, 2)
