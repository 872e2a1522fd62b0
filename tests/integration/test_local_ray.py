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


# Another Ray on the same machine, as a second run or a notebook would start one: held up until
# its stdin closes.
OTHER_RAY = """
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1])
print("up", flush=True)
sys.stdin.read()
ray.shutdown()
"""

# Ray Train's placement-group cleaner, a detached actor, asks Ray's state API whether the
# controller lives; the state API finds its cluster the same way from any Ray worker.
STATE_PROBE = """
import os, ray
from orchestrator.driver import ensure_ray
assert ensure_ray(num_cpus=1)
@ray.remote
def state_api():
    from ray.util.state import list_actors
    try:
        return f"lists {len(list_actors())} actors"
    except Exception as exc:
        return f"fails: {type(exc).__name__}: {exc}"
print("state API from a worker", ray.get(state_api.remote()))
print("driver keeps", os.environ.get("RAY_API_SERVER_ADDRESS"))
ray.shutdown()
"""


def test_a_second_ray_on_the_machine_does_not_blind_the_state_api():
    """With two Ray instances on one machine, Ray's state API, called from inside a cluster with
    no address, fails with "Found multiple active Ray instances"; Ray Train's cleaner then loses
    its monitor thread (a traceback in the run's log, and no clean-up of a crashed controller's
    placement group). The cluster softprune starts names its own dashboard to its processes."""
    from orchestrator.driver import default_ray_temp_dir

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_API_SERVER_ADDRESS")}
    other = subprocess.Popen([sys.executable, "-c", OTHER_RAY, default_ray_temp_dir("_o")], cwd=ROOT, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        env["SOFTPRUNE_RAY_TMP"] = default_ray_temp_dir("_s")
        out = subprocess.run([sys.executable, "-c", STATE_PROBE], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=240)
    finally:
        other.stdin.close()
        other.wait(timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "state API from a worker lists" in out.stdout, out.stdout[-800:]
    assert "driver keeps None" in out.stdout  # the address reached the cluster, not the driver's later calls
