"""The CPU a local Ray and an idle Ray Train run take, by process, under the settings Ray offers.

On a 2-core machine the Ray loop's gap to bare DDP is the CPU of Ray's daemons and actors
(bench_overhead.py, "Where the CPU goes"). This measures that CPU with nothing else in the way: a
Ray Train run whose two workers sleep, and the CPU seconds per second of every process on the
machine over a window after start-up (psutil). Each setting runs in its own process with a fresh
local Ray, because Ray reads them from the environment at start. The baseline is the same window
with no Ray at all, measured in the same run.

  python benchmarks/bench_ray_idle.py                 # every setting, 30 s windows
  python benchmarks/bench_ray_idle.py --window 60 --settings softprune,no_dashboard
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_overhead import _cpu_by_process, _cpu_split

# name -> (what it is, environment it adds). softprune's local Ray is orchestrator.driver.ensure_ray.
SETTINGS = {
    "no_ray": ("no Ray (baseline)", {}),
    "softprune": ("softprune's local Ray (metrics collection off)", {}),
    "ray_defaults": ("Ray's defaults (metrics collection on)", {"RAY_enable_metrics_collection": "1"}),
    "no_dashboard": ("no dashboard, metrics collection off", {}),
    "no_train_metrics": ("softprune's + RAY_TRAIN_METRICS_ENABLED=0", {"RAY_TRAIN_METRICS_ENABLED": "0"}),
    "no_event_stats": ("softprune's + RAY_event_stats=0", {"RAY_event_stats": "0"}),
    "no_lag_probe": ("softprune's + no event-loop lag probe",
                     {"RAY_io_context_event_loop_lag_collection_interval_ms": "-1"}),
    "slow_task_events": ("softprune's + task events every 10 s", {"RAY_task_events_report_interval_ms": "10000"}),
}
START_S = 25.0  # Ray Train's controller, workers and actors are up by then on this machine


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=float, default=30.0, help="seconds measured per setting")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"any of {', '.join(SETTINGS)}")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    unknown = set(a.settings.split(",")) - set(SETTINGS)
    if unknown:
        p.error(f"--settings: unknown {sorted(unknown)}; choose from {', '.join(SETTINGS)}")
    return a


def _start_ray(setting: str) -> None:
    import ray

    from orchestrator import driver

    if setting != "no_dashboard":
        driver.ensure_ray(num_cpus=2)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    ray.init(address="local", num_cpus=2, _temp_dir=driver.default_ray_temp_dir(), include_dashboard=False,
             log_to_driver=False)  # the placement-group cleaner's warning every second, unread here


def _sleep(config: dict) -> None:
    time.sleep(config["seconds"])


def _measure(window: float) -> dict:
    """CPU ms per second of every process on the machine over the next `window` seconds, and the
    top processes by role."""
    before = _cpu_by_process()
    time.sleep(window)
    split = _cpu_split(before, _cpu_by_process(), [], 1)
    return {"others_cpu_per_step": split["others_cpu_per_step"] * 1e3 / window,
            "others_top": [(n, s * 1e3 / window) for n, s in split["others_top"]]}


def child(setting: str, window: float) -> dict:
    """One setting, measured while a Ray Train run's workers sleep (or with no Ray at all)."""
    if setting == "no_ray":
        return _measure(window)
    _start_ray(setting)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    found: dict = {}

    def measure() -> None:
        time.sleep(START_S)
        found.update(_measure(window))

    thread = threading.Thread(target=measure)
    thread.start()
    storage = REPO / ".cache" / "bench_ray_idle"
    TorchTrainer(_sleep, train_loop_config={"seconds": START_S + window + 5},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=str(storage), name=f"idle_{setting}_{os.getpid()}")).fit()
    thread.join()
    ray.shutdown()
    return found


def main() -> None:
    a = parse()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.window)), flush=True)
        return
    with open("/proc/loadavg") as f:
        print(f"{a.window:.0f} s windows, load average {' '.join(f.read().split()[:3])}; "
              "CPU ms per second of wall time, every process on the machine", flush=True)
    base = None
    for setting in ["no_ray"] + [s for s in a.settings.split(",") if s != "no_ray"]:
        env = {**os.environ, **SETTINGS[setting][1]}
        proc = subprocess.run([sys.executable, __file__, "--child", setting, "--window", str(a.window)],
                              env=env, capture_output=True, text=True, timeout=START_S + a.window + 300, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{setting}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        got = json.loads(line[len("RESULT "):])
        total = got["others_cpu_per_step"]
        base = total if setting == "no_ray" else base
        top = ", ".join(f"{n} {ms:.1f}" for n, ms in got["others_top"][:5])
        extra = "" if setting == "no_ray" else f"  Ray's share {total - base:6.1f} ms/s = {(total - base) / 10:.1f}% of a core"
        print(f"{SETTINGS[setting][0]:<48}{total:7.1f} ms/s{extra}\n    top: {top}", flush=True)


if __name__ == "__main__":
    main()
