"""CheckpointPolicy: time-based and just-in-time checkpoints, decided the same on every rank.

The clock is a parameter so that ten minutes of training take no time here; the agreement runs
through a real 2-process gloo group whose ranks have clocks that disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.multiprocessing as mp

from orchestrator.checkpoint_policy import CheckpointPolicy
from orchestrator.config import CheckpointConfig


class Clock:
    def __init__(self, step_s: float):
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step_s


@dataclass(frozen=True)
class Notice:
    preempted_node_ids: list = field(default_factory=lambda: ["node-a"])


def _drive(policy: CheckpointPolicy, clock: Clock, steps: int, notice_at: dict | None = None) -> list:
    decisions = []
    for step in range(1, steps + 1):
        clock.tick()
        reason = policy.due(step, step, steps + 1)
        if reason:
            decisions.append((step, reason))
            policy.reset()
    return decisions


def test_time_based_checkpoints_follow_the_clock_not_a_step_count():
    for step_s in (0.5, 3.0):  # fast and slow steps: the interval stays ~10 minutes
        clock = Clock(step_s)
        policy = CheckpointPolicy(CheckpointConfig(every_minutes=10, poll_s=10), 0, clock=clock)
        decisions = _drive(policy, clock, int(3600 / step_s))
        times = [step * step_s for step, _ in decisions]
        assert [r for _, r in decisions] == ["time"] * len(decisions)
        assert len(decisions) == 5 or len(decisions) == 6, times  # 60 minutes / 10 (+ the poll lag)
        gaps = [b - a for a, b in zip([0.0] + times, times)]
        assert all(600 <= g <= 600 + 10 + 2 * step_s for g in gaps), gaps
        assert policy.polls <= 1.2 * 3600 / 10  # polls every ~poll_s (whole steps below it), not every step


def test_no_time_checkpoints_when_turned_off_and_fixed_steps_still_work():
    clock = Clock(1.0)
    policy = CheckpointPolicy(CheckpointConfig(every_minutes=None, every_steps=250), 0, clock=clock)
    assert _drive(policy, clock, 1000) == [(250, "steps"), (500, "steps"), (750, "steps"), (1000, "steps")]


def test_a_preemption_notice_gives_one_checkpoint_per_drained_node():
    clock = Clock(1.0)
    notices = {"value": None}
    policy = CheckpointPolicy(CheckpointConfig(every_minutes=None, poll_s=5), 0, lambda: notices["value"], clock)
    decisions = []
    for step in range(1, 200):
        clock.tick()
        if step == 50:
            notices["value"] = Notice()
        if step == 120:
            notices["value"] = Notice(["node-a", "node-b"])
        reason = policy.due(step, step, 500)
        if reason:
            decisions.append((step, reason))
    assert [r for _, r in decisions] == ["preemption", "preemption"]
    first, second = decisions[0][0], decisions[1][0]
    assert 50 <= first <= 56 and 120 <= second <= 126  # at the next poll, ~poll_s later at most
    off = CheckpointPolicy(CheckpointConfig(every_minutes=None, on_preemption=False), 0, lambda: Notice(), clock)
    assert all(off.due(s, s, 500) is None for s in range(1, 100))


def test_nothing_is_due_at_the_last_step_of_an_epoch():
    clock = Clock(1000.0)
    policy = CheckpointPolicy(CheckpointConfig(every_minutes=1, every_steps=1), 0, clock=clock)
    assert policy.due(10, 10, 10) is None


def _rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    # rank 1's clock runs 100x faster: were it consulted, it would checkpoint far more often
    clock = Clock(1.0 if rank == 0 else 100.0)
    policy = CheckpointPolicy(CheckpointConfig(every_minutes=1, poll_s=5), rank, clock=clock)
    decisions = _drive(policy, clock, 400)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(repr(decisions))
    dist.destroy_process_group()


def test_ranks_agree_on_rank_zeros_clock(tmp_path):
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    zero, one = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert zero == one
    steps = [s for s, _ in eval(zero)]  # noqa: S307 - our own repr of a list of tuples
    assert 5 <= len(steps) <= 7 and steps[0] >= 60  # every ~60 s of rank 0's clock
