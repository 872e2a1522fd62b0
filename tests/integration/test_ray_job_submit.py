"""The cluster path once: `ray start --head`, `ray job submit --working-dir . -- python
launch/r101_asfp.py ...`, then `ray stop`. The launch script runs as a job driver on the cluster
(attaching to it instead of starting a local Ray), with a tiny model so the test stays short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.driver import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="offline")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _submit(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head answers that its job agent has not registered yet
    (seen on a loaded machine a few seconds after `ray start`: "No available agent to submit job,
    please try again later"). Any other failure is returned at once."""
    for _ in range(12):
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
        if job.returncode == 0 or "No available agent to submit job" not in job.stdout + job.stderr:
            return job
        time.sleep(5)
    return job


def test_ray_start_job_submit_stop(tmp_path):
    from data import write_synthetic

    manifest = write_synthetic(tmp_path / "shards", classes=4, train=64, val=32, size=16, shard_size=16)
    storage = tmp_path / "runs"
    port, dash = free_port(), free_port()
    from orchestrator.driver import default_ray_temp_dir

    temp = default_ray_temp_dir("_j")  # short: Ray's socket paths are length-limited
    env = _env()
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--port", str(port), "--dashboard-host",
                    "127.0.0.1", "--dashboard-port", str(dash), "--temp-dir", temp, "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        job = _submit(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT), "--",
             sys.executable, "launch/r101_asfp.py", "--smoke", "--data", str(manifest), "--val", str(manifest),
             "--storage", str(storage), "--name", "job", "model.name=resnet20", "model.num_classes=4",
             "data.image_size=16", "epochs=2", "pruning.finetune_epochs=0", "pruning.recalibrate_batches=1"],
            env)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        assert "softprune summary" in job.stdout
    finally:
        for _ in range(2):  # a first `ray stop` can leave processes behind (seen with Ray 2.60)
            subprocess.run([RAY, "stop"], env=env, capture_output=True, timeout=120)
    report = json.loads((storage / "job" / "final" / "report.json").read_text())
    assert report["epochs"]["trained"] == 2 and report["model"] == "resnet20"
    assert report["pruned"]["params"] < report["dense"]["params"]
    assert (storage / "job" / "final" / "model.safetensors").is_file()
