"""The epoch planning rule: equal batch counts, disjoint ranks, worker round-robin, shuffle buffer."""

from __future__ import annotations

import numpy as np
import pytest

from data.plan import (batches_done, buffer_order, plan_train, plan_val, shard_order,
                       train_batches, val_batches)
from data.position import Phase, remaining


def _positions(plans, urls, counts):
    """Global sample ids (shard offset + index) covered by a list of worker plans."""
    offset = dict(zip(urls, np.concatenate([[0], np.cumsum(counts)[:-1]])))
    return [int(offset[p.url]) + int(i) for plan in plans for p in plan.pieces for i in p.indices()]


def _epoch_positions(plans, urls, counts, seed, epoch):
    """The same, as positions in the epoch's permuted sequence of shards."""
    order = shard_order(len(urls), seed, epoch)
    offset = dict(zip([urls[i] for i in order], np.concatenate([[0], np.cumsum([counts[i] for i in order])])))
    return [int(offset[p.url]) + int(i) for plan in plans for p in plan.pieces for i in p.indices()]


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


@pytest.mark.parametrize("n,size,steps", [(50, 8, 0), (50, 8, 17), (50, 8, 50), (9, 1, 4), (300, 64, 299)])
def test_buffer_order_prefix_is_the_start_of_the_full_order(n, size, steps):
    full = buffer_order(n, size, np.random.default_rng(4))
    assert buffer_order(n, size, np.random.default_rng(4), steps=steps).tolist() == full[:steps].tolist()


COUNTS = [13, 0, 29, 7, 7, 41, 2, 30]
URLS = [f"s{i}.tar" for i in range(len(COUNTS))]


def test_a_pool_of_every_position_plans_what_the_plain_rule_plans():
    total = sum(COUNTS)
    for rank in range(3):
        plain = plan_train(URLS, COUNTS, rank, 3, 2, 4, seed=1, epoch=2)
        pooled = plan_train(URLS, COUNTS, rank, 3, 2, 4, seed=1, epoch=2, pool=np.arange(total))
        assert [(p.worker, p.batches) for p in plain] == [(p.worker, p.batches) for p in pooled]
        for a, b in zip(plain, pooled):
            assert [(x.url, x.start, x.stop) for x in a.pieces] == [(x.url, x.start, x.stop) for x in b.pieces]
            assert all(x.index is None for x in b.pieces)


@pytest.mark.parametrize("world,workers,batch", [(2, 2, 4), (3, 1, 5), (1, 3, 2)])
def test_a_pool_with_holes_is_cut_like_an_epoch_and_read_one_piece_per_shard(world, workers, batch):
    total = sum(COUNTS)
    pool = np.array([p for p in range(total) if p % 3 and p not in range(40, 60)])
    seen, per_rank = [], len(pool) // world
    for rank in range(world):
        plans = plan_train(URLS, COUNTS, rank, world, workers, batch, seed=1, epoch=2, pool=pool)
        assert sum(p.batches for p in plans) == per_rank // batch
        mine = _epoch_positions(plans, URLS, COUNTS, 1, 2)
        assert mine == pool[rank * per_rank: rank * per_rank + per_rank // batch * batch].tolist()
        for plan in plans:
            assert plan.samples == plan.batches * batch
            assert len({p.url for p in plan.pieces}) == len(plan.pieces)  # one sequential read per shard
        seen += mine
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("world,workers,batch,buffer", [(2, 2, 4, 8), (3, 3, 2, 1), (1, 2, 5, 30)])
def test_remaining_after_a_whole_phase_is_what_its_plan_left_out(world, workers, batch, buffer):
    total, seed, epoch = sum(COUNTS), 1, 2
    full = Phase(world_size=world, num_workers=workers, batch_size=batch, shuffle_buffer=buffer,
                 batches=train_batches(total, world, batch))
    planned = [p for r in range(world) for p in _epoch_positions(
        plan_train(URLS, COUNTS, r, world, workers, batch, seed, epoch), URLS, COUNTS, seed, epoch)]
    left = remaining(total, seed, epoch, (full,))
    assert sorted(set(range(total)) - set(planned)) == left.tolist()
    assert len(left) == total % world + world * ((total // world) % batch)  # the documented drop
    # a stopped phase consumed exactly its batches' samples, the rest stays in play
    part = full.model_copy(update={"batches": 3})
    assert len(remaining(total, seed, epoch, (part,))) == total - part.samples
