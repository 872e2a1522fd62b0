"""The epoch planning rule: equal batch counts, disjoint ranks, worker round-robin, shuffle buffer."""

from __future__ import annotations

import numpy as np
import pytest

from data.plan import (batches_done, buffer_order, plan_train, plan_val, shard_order,
                       train_batches, val_batches)


def _positions(plans, urls, counts):
    """Global sample ids (shard offset + index) covered by a list of worker plans."""
    offset = dict(zip(urls, np.concatenate([[0], np.cumsum(counts)[:-1]])))
    return [int(offset[p.url]) + i for plan in plans for p in plan.pieces for i in range(p.start, p.stop)]


@pytest.mark.parametrize("counts,world,workers,batch", [
    ([37, 5, 61, 1, 20], 2, 2, 8),
    ([100], 4, 3, 5),           # one shard, fewer shards than ranks x workers
    ([3, 3, 3], 3, 4, 1),
    ([13, 0, 29, 7, 7, 41, 2], 3, 2, 4),
])
def test_train_plan_is_equal_disjoint_and_nearly_complete(counts, world, workers, batch):
    urls = [f"s{i}.tar" for i in range(len(counts))]
    seen = []
    for rank in range(world):
        plans = plan_train(urls, counts, rank, world, workers, batch, seed=3, epoch=1)
        assert sum(p.batches for p in plans) == train_batches(sum(counts), world, batch)
        for plan in plans:
            assert plan.samples == plan.batches * batch
        seen += _positions(plans, urls, counts)
    assert len(seen) == len(set(seen)), "a sample was planned on two ranks or workers"
    dropped = sum(counts) - len(seen)
    assert 0 <= dropped < world * batch + world


def test_shard_order_same_on_all_ranks_and_changes_with_epoch():
    assert shard_order(50, 1, 0) == shard_order(50, 1, 0)
    assert shard_order(50, 1, 0) != shard_order(50, 1, 1)
    assert sorted(shard_order(50, 1, 7)) == list(range(50))


def test_worker_batches_round_robin():
    for total in range(0, 11):
        per_worker = [batches_done(total, 3, w) for w in range(3)]
        assert sum(per_worker) == total
        assert per_worker == [sum(1 for j in range(total) if j % 3 == w) for w in range(3)]


@pytest.mark.parametrize("total,world,batch", [(10, 3, 4), (1, 2, 8), (64, 2, 32), (65, 2, 32)])
def test_val_plan_covers_every_sample_once(total, world, batch):
    counts = [total // 2, total - total // 2]
    urls = ["a.tar", "b.tar"]
    seen = []
    for rank in range(world):
        plans = plan_val(urls, counts, rank, world, 2, batch)
        assert sum(p.batches for p in plans) == val_batches(total, world, batch)
        for plan in plans:
            assert plan.samples <= plan.batches * batch
        seen += _positions(plans, urls, counts)
    assert sorted(seen) == list(range(total))


@pytest.mark.parametrize("n,size", [(1, 5), (10, 1), (100, 7), (1000, 64)])
def test_buffer_order_is_a_permutation_with_bounded_lookahead(n, size):
    order = buffer_order(n, size, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(n))
    # A buffer of `size` can only emit position p after reading it: p <= step + size - 1.
    assert all(int(p) <= step + size - 1 for step, p in enumerate(order))
    if size > 1 and n > 10:
        assert order.tolist() != list(range(n))
