"""Elastic worker groups: the [min, max] range, and the accumulation/LR rule that keeps the
global batch when fewer workers run."""

from __future__ import annotations

import pytest

from orchestrator.config import load_config
from orchestrator.deepspeed_config import deepspeed_config


def _cfg(workers, grad_accum=1, batch=32):
    return load_config({"data": {"train": "x", "batch_size": batch},
                        "scaling": {"workers": workers, "grad_accum": grad_accum}})


def test_a_range_is_accepted_and_a_bad_one_named():
    cfg = _cfg([2, 8])
    assert (cfg.scaling.min_workers, cfg.scaling.max_workers) == (2, 8)
    for bad in ([8, 2], [0, 4]):
        with pytest.raises(ValueError, match=r"scaling\.workers"):
            _cfg(bad)


@pytest.mark.parametrize("world,accum,scale", [(8, 1, 1.0), (4, 2, 1.0), (2, 4, 1.0), (1, 8, 1.0),
                                               (3, 3, 1.125), (5, 2, 1.25)])
def test_fewer_workers_accumulate_to_keep_the_global_batch(world, accum, scale):
    s = _cfg([1, 8]).scaling
    assert s.accumulation(32, world) == (accum, pytest.approx(scale))
    # the global batch actually used, over the reference, is exactly the LR factor
    assert 32 * world * accum / (32 * 8) == pytest.approx(scale)


def test_the_deepspeed_config_follows_the_world_it_runs_on():
    cfg = _cfg([1, 4], grad_accum=2)
    for world in (4, 2, 1):
        ds = deepspeed_config(cfg, world)
        assert ds["train_batch_size"] == 32 * 4 * 2  # the reference global batch, at every size
        assert ds["gradient_accumulation_steps"] * world == 8
