"""Preemption drills as tests, on a real multi-node Ray (`ray.cluster_utils.Cluster`): a spot
reclaim mid-epoch (notice, just-in-time checkpoint, node replaced: same final masks as an
undisturbed run), the launcher killed and run again (same run, same wandb id), a SIGKILL halfway
through writing a checkpoint (the previous one is used), and an elastic group that loses a node
(it goes on with fewer workers and records the change). The drills live in
benchmarks/drill_preemption.py, which also prints them as a table.

The default suite runs the reclaim drill only (about 2 minutes); the other three carry the
`drill` marker and run with `make drills` (`pytest -m drill`), as the soak drills do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import drill_preemption as drills  # noqa: E402


@pytest.mark.parametrize("name", ["reclaim", *(pytest.param(n, marks=pytest.mark.drill)
                                                for n in ("driver", "torn-checkpoint", "shrink"))])
def test_drill(name, tmp_path):
    (outcome,) = drills.run_drills(tmp_path, [name])
    assert outcome.ok, f"{name}: {outcome.detail}"
    assert outcome.steps_lost is not None
    # A fault costs at most the work since the last checkpoint (one epoch here). A reclaim is
    # judged by its checkpoint instead (`ok`: the restart used the one the notice caused); what
    # it loses is what ran between that checkpoint and the node's removal, which the drill delays
    # until Ray has registered the checkpoint.
    if name != "reclaim":
        assert outcome.steps_lost <= drills.STEPS_PER_EPOCH
