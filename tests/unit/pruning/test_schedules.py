"""Schedules are pure functions of the epoch with the papers' shapes."""

from __future__ import annotations

import math

import pytest

from pruning import PruningConfig, is_prune_epoch, make_schedule


def _cfg(**kw):
    return PruningConfig(method="sfp", rate=0.4, **kw)


def test_constant_is_sfp():
    f = make_schedule(_cfg(), 100)
    assert [f(e) for e in (0, 50, 99, 150)] == [0.4] * 4


@pytest.mark.parametrize("d", [0.125, 0.25, 0.5])
def test_asymptotic_passes_through_the_three_points(d):
    """P(t) = a*exp(-k t) + b through P(0) = 0, P(D*E) = 3/4 P, P(E) = P (three points fix the
    three parameters), close to P*(1 - 4^(-t/(D*E))): that form reaches 3/4 P at D*E too, but
    only P*(1 - 4^(-1/D)) at E, so it is off by at most P*4^(-1/D) (1.5e-5 P at D = 1/8)."""
    f = make_schedule(PruningConfig(method="asfp", rate=0.4, asymptotic_d=d), 81)
    E = 80
    assert f(0) == pytest.approx(0.0, abs=1e-12)
    assert f(d * E) == pytest.approx(0.3, rel=1e-9)
    assert f(E) == pytest.approx(0.4, rel=1e-9) and f(E + 10) == 0.4
    values = [f(e) for e in range(E + 1)]
    assert all(a < b for a, b in zip(values, values[1:]))
    # a*exp(-k t) + b: successive increments shrink by the same factor exp(-k) < 1
    steps = [b - a for a, b in zip(values, values[1:])]
    ratios = [b / a for a, b in zip(steps, steps[1:])]
    assert ratios[0] < 1 and ratios == pytest.approx([ratios[0]] * len(ratios), rel=1e-6)
    bound = 0.4 * 4 ** (-1 / d) * (1 + 1e-6)
    assert values == pytest.approx([0.4 * (1 - 4 ** (-t / (d * E))) for t in range(E + 1)], abs=bound)


def test_asymptotic_is_close_to_the_power_of_four_form():
    f = make_schedule(PruningConfig(method="asfp", rate=0.3, last_prune_epoch=64), 100)
    for t in (4, 16, 32):
        assert f(t) == pytest.approx(0.3 * (1 - 4 ** (-t / 8)), abs=2e-3)


def test_linear_cubic_one_shot_and_none():
    lin = make_schedule(_cfg(schedule="linear"), 11)
    assert lin(0) == 0 and lin(5) == pytest.approx(0.2) and lin(10) == pytest.approx(0.4)
    cub = make_schedule(_cfg(schedule="cubic"), 11)
    assert cub(5) == pytest.approx(0.4 * (1 - 0.5**3)) and cub(20) == pytest.approx(0.4)
    one = make_schedule(PruningConfig(method="pfec", rate=0.5, prune_epoch=3), 10)
    assert [one(e) for e in range(5)] == [0, 0, 0, 0.5, 0.5]
    assert make_schedule(PruningConfig(), 10)(5) == 0.0
    preset = make_schedule(PruningConfig(method="pfec", policy="pfec", preset="resnet56-A"), 10)
    assert preset(0) == 1.0  # the preset's own per-layer rates in full


def test_prune_epochs():
    cfg = _cfg(every=3, freeze_epoch=7)
    assert [e for e in range(10) if is_prune_epoch(cfg, e)] == [0, 3, 6]
    pfec = PruningConfig(method="pfec", prune_epoch=2)
    assert [e for e in range(5) if is_prune_epoch(pfec, e)] == [2]


def test_too_short_runs_are_rejected():
    with pytest.raises(ValueError, match="total_epochs"):
        make_schedule(_cfg(), 0)
    with pytest.raises(ValueError, match="E >= 1"):
        make_schedule(PruningConfig(method="asfp"), 1)
    assert not math.isnan(make_schedule(PruningConfig(method="asfp"), 2)(1))


def test_schedules_read_fractional_epochs():
    """Step-counted events ask for the rate part-way through an epoch: the ASFP curve rises
    between integer epochs and meets them there."""
    f = make_schedule(PruningConfig(method="asfp", rate=0.4), 10)
    points = [f(t / 4) for t in range(0, 37)]
    assert all(a < b for a, b in zip(points, points[1:]))
    assert f(2.0) == pytest.approx(f(2)) and f(1.0) < f(1.5) < f(2.0)


def test_the_goal_is_reached_before_the_masks_freeze():
    """With freeze_epoch=15 and no last_prune_epoch, the last soft event (end of epoch 14) is
    at the goal rate, not at the rate of a curve that would end at epoch 29."""
    cfg = PruningConfig(method="asfp", rate=0.4, freeze_epoch=15)
    f = make_schedule(cfg, 30)
    assert f(14) == pytest.approx(0.4)
    assert f(13) < 0.4
    explicit = make_schedule(PruningConfig(method="asfp", rate=0.4, freeze_epoch=15, last_prune_epoch=29), 30)
    assert explicit(14) < 0.4  # an explicit E wins


def test_a_start_epoch_delays_the_events_and_shifts_the_curve():
    """start_epoch=S: dense before S, then the schedule as if the run had started at S."""
    sfp = _cfg(start_epoch=5, every=2, freeze_epoch=12)
    f = make_schedule(sfp, 30)
    assert [f(e) for e in (0, 4, 4.9, 5, 11)] == [0.0, 0.0, 0.0, 0.4, 0.4]
    assert [e for e in range(15) if is_prune_epoch(sfp, e)] == [5, 7, 9, 11]
    asfp = PruningConfig(method="asfp", rate=0.4, start_epoch=6, freeze_epoch=23)  # E = 22: 16 epochs from S
    g, ref = make_schedule(asfp, 30), make_schedule(PruningConfig(method="asfp", rate=0.4, last_prune_epoch=16), 30)
    assert g(3) == 0.0 and g(6) == pytest.approx(0.0, abs=1e-12) and g(22) == pytest.approx(0.4)
    assert [g(6 + t / 2) for t in range(40)] == pytest.approx([ref(t / 2) for t in range(40)])
    assert [e for e in range(30) if is_prune_epoch(asfp, e)] == list(range(6, 23))


def test_sfp_may_start_at_its_last_soft_epoch():
    """start_epoch = freeze_epoch - 1: one soft event at the goal rate, then the freeze (the
    constant schedule needs no span; only ASFP's curve does)."""
    cfg = _cfg(start_epoch=14, freeze_epoch=15)
    f = make_schedule(cfg, 30)
    assert (f(13), f(14)) == (0.0, 0.4) and [e for e in range(30) if is_prune_epoch(cfg, e)] == [14]
    with pytest.raises(ValueError, match="E >= 1"):
        make_schedule(PruningConfig(method="asfp", rate=0.4, start_epoch=14, freeze_epoch=15), 30)
