"""The local Ray that `softprune train`/`compare` start when no cluster is given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]

# In a fresh interpreter: start Ray the way the driver does, and print what a Ray worker sees.
PROBE = """
import os, ray
from orchestrator.driver import ensure_ray
assert ensure_ray(num_cpus=1)
@ray.remote
def seen():
    return os.environ.get("RAY_enable_metrics_collection")
print("worker sees", ray.get(seen.remote()))
ray.shutdown()
"""


def test_local_ray_runs_without_metrics_collection():
    """Ray's metrics recording costs the loop ~7% of a small machine and feeds a Prometheus a
    local cluster does not have: the setting must reach the processes Ray starts."""
    from orchestrator.driver import default_ray_temp_dir

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_enable_metrics_collection", "RAY_ADDRESS", "RAY_JOB_ID")}
    env["SOFTPRUNE_RAY_TMP"] = default_ray_temp_dir("_m")
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "worker sees 0" in out.stdout, out.stdout[-500:]
