"""When a checkpoint is due within an epoch: the same answer on every rank, from one rank's clock.

Spot capacity wants checkpoints stated in time (a reclaimed node costs at most N minutes of
work) and one right after a preemption notice. Clocks and notices are per process, while a
checkpoint is collective, so the ranks agree at *polls*: every rank calls `due()` after each
optimizer step; at a poll step every rank asks Ray for the preemption state (a barrier Ray
answers identically on every rank) and joins one all-reduce in which rank 0 contributes
"time's up" and the number of steps until the next poll (its measured step time turns `poll_s`
into steps). Between polls `due()` costs nothing. Fixed `every_steps` checkpoints need no poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .collectives import all_reduce_sum
from .config import CheckpointConfig


class CheckpointPolicy:
    """Tells the loop, identically on every rank, whether to checkpoint after this step."""

    def __init__(self, cfg: CheckpointConfig, rank: int, preemption_fn: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.rank = rank
        self._preemption = preemption_fn if cfg.on_preemption else None
        self._clock = clock
        self._last_checkpoint = clock()
        self._last_poll = (clock(), 0)  # (time, global step) of the previous poll
        self._next_poll = None  # global step of the next poll; None: the step after the first
        self._handled: set[str] = set()  # preempted nodes already answered with a checkpoint
        self.polls = 0

    def reset(self) -> None:
        """A checkpoint was written (by any path): the time interval starts again."""
        self._last_checkpoint = self._clock()

    def due(self, global_step: int, step_in_epoch: int, steps_in_epoch: int) -> str | None:
        """"preemption", "time", "steps" or None. Every rank must call it after every step."""
        if step_in_epoch >= steps_in_epoch:
            return None  # the epoch-end checkpoint follows anyway
        if self.cfg.every_steps and global_step % self.cfg.every_steps == 0:
            return "steps"
        if self._next_poll is None:
            self._next_poll = global_step + 1
        if global_step < self._next_poll:
            return None
        return self._poll(global_step)

    def _poll(self, global_step: int) -> str | None:
        self.polls += 1
        notice = self._preemption() if self._preemption is not None else None  # Ray's barrier
        now = self._clock()
        flags = torch.zeros(2, dtype=torch.float64)
        if self.rank == 0:  # rank-dependent: one clock decides for all
            minutes = self.cfg.every_minutes
            flags[0] = float(minutes is not None and now - self._last_checkpoint >= minutes * 60)
            flags[1] = self._steps_until_next_poll(now, global_step)
        flags = all_reduce_sum(flags)  # sync point
        self._last_poll = (now, global_step)
        self._next_poll = global_step + max(1, int(flags[1]))
        if notice is not None and self._new_notice(notice):
            return "preemption"
        return "time" if flags[0] > 0 else None

    def _steps_until_next_poll(self, now: float, global_step: int) -> int:
        then, step = self._last_poll
        per_step = (now - then) / max(global_step - step, 1)
        return max(1, int(self.cfg.poll_s / max(per_step, 1e-6)))

    def _new_notice(self, notice) -> bool:
        nodes = set(getattr(notice, "preempted_node_ids", None) or ["?"])
        if nodes <= self._handled:
            return False  # this drain was answered already; training goes on until the node goes
        self._handled |= nodes
        return True
