"""Pruning-rate schedules: pure functions of the (fractional) epoch, so a resumed run recomputes
the same rate. Step-counted events (`every_steps`) ask at fractional epochs, e.g. 2.25.

S is `start_epoch` (default 0): SFP/ASFP's schedules are 0 before it and run from S to E, as if the
run had started at S (the epochs before S train dense).
E is the schedule's last epoch (`last_prune_epoch`; default the epoch before `freeze_epoch`, else
the run's last 0-based epoch, `total_epochs - 1`); after E every schedule stays at the goal rate P.
- constant (SFP): P from epoch 0.
- asymptotic (ASFP): P(t) = a*exp(-k t) + b through P(0) = 0, P(D*E) = 3/4 P, P(E) = P.
- linear: P * t/E.  cubic: P * (1 - (1 - t/E)^3) (Zhu & Gupta's gradual pruning).
- one_shot (PFEC): 0 before `prune_epoch`, P from it on.
With a preset the goal is 1.0: the fraction of each layer's preset rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .config import PruningConfig

Schedule = Callable[[float], float]


def constant(goal: float) -> Schedule:
    return lambda epoch: goal


def linear(goal: float, last: int) -> Schedule:
    return lambda epoch: goal * min(max(epoch, 0) / max(last, 1), 1.0)


def cubic(goal: float, last: int) -> Schedule:
    return lambda epoch: goal * (1.0 - (1.0 - min(max(epoch, 0) / max(last, 1), 1.0)) ** 3)


def one_shot(goal: float, at: int) -> Schedule:
    return lambda epoch: goal if epoch >= at else 0.0


def asymptotic_params(goal: float, last: int, d: float = 0.125) -> tuple[float, float, float]:
    """(a, k, b) of a*exp(-k t) + b through (0, 0), (d*last, 3/4 goal), (last, goal).

    With b = -a the curve is b*(1 - x^(t/(d*last))), x = exp(-k*d*last); the two other points
    give (1 - x) / (1 - x^(1/d)) = 3/4. The left side falls monotonically from 1 (x -> 0) to d
    (x -> 1), so a root exists iff d < 3/4; bisection finds it."""
    if last < 1:
        raise ValueError(f"asymptotic schedule needs at least 2 epochs (E >= 1), got E={last}")
    if not 0.0 < d < 0.75:
        raise ValueError(f"asymptotic_d must be in (0, 0.75) (3/4 of the goal at D*E), got {d}")
    lo, hi = 1e-12, 1.0 - 1e-12
    f = lambda x: (1.0 - x) / (1.0 - x ** (1.0 / d)) - 0.75  # noqa: E731
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:  # f decreases in x
            lo = mid
        else:
            hi = mid
    x = 0.5 * (lo + hi)
    k = -math.log(x) / (d * last)
    b = goal / (1.0 - math.exp(-k * last))
    return -b, k, b


def asymptotic(goal: float, last: int, d: float = 0.125) -> Schedule:
    a, k, b = asymptotic_params(goal, last, d)
    return lambda epoch: goal if epoch >= last else max(0.0, a * math.exp(-k * max(epoch, 0)) + b)


def make_schedule(cfg: PruningConfig, total_epochs: int) -> Schedule:
    """The rate to prune at, as a function of the 0-based (fractional) epoch, for `cfg` over
    `total_epochs`."""
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    goal = 1.0 if cfg.preset is not None else cfg.rate
    if cfg.method == "none":
        return constant(0.0)
    kind = cfg.resolved_schedule
    if kind == "one_shot":
        return one_shot(goal, cfg.prune_epoch)
    last = cfg.last_prune_epoch if cfg.last_prune_epoch is not None else default_last_epoch(cfg, total_epochs)
    start = cfg.start_epoch  # the config checked start < E where E is explicit; asymptotic checks its span
    shape = _soft_shape(kind, goal, last - start, cfg.asymptotic_d)
    return shape if not start else (lambda epoch: 0.0 if epoch < start else shape(epoch - start))


def _soft_shape(kind: str, goal: float, last: int, d: float) -> Schedule:
    if kind == "constant":
        return constant(goal)
    if kind == "linear":
        return linear(goal, last)
    if kind == "cubic":
        return cubic(goal, last)
    return asymptotic(goal, last, d)


def default_last_epoch(cfg: PruningConfig, total_epochs: int) -> int:
    """E when `last_prune_epoch` is unset: the last epoch with soft events, i.e. the one before
    `freeze_epoch` (so the goal rate is reached before the masks freeze), else the run's last."""
    if cfg.freeze_epoch is not None and 1 <= cfg.freeze_epoch - 1 < total_epochs - 1:
        return cfg.freeze_epoch - 1
    return total_epochs - 1


def is_prune_epoch(cfg: PruningConfig, epoch: int) -> bool:
    """Whether masks are recomputed at `epoch` (every `cfg.every` epochs from `start_epoch`;
    one-shot: only at its epoch; frozen from `freeze_epoch` on)."""
    if cfg.method == "none" or (cfg.freeze_epoch is not None and epoch >= cfg.freeze_epoch):
        return False
    if cfg.resolved_schedule == "one_shot":
        return epoch == cfg.prune_epoch
    return epoch >= cfg.start_epoch and (epoch - cfg.start_epoch) % cfg.every == 0
