"""The driver: validates the config, attaches to (or starts) Ray, and runs the TorchTrainer.

Under `ray job submit` the job's environment carries the cluster address and `ray.init()`
attaches to it; run directly, a local Ray is started with its temp dir under the project's
.cache (short path: Ray's Unix sockets must fit in 107 bytes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import env, storage
from .config import TrainConfig


def _under_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))


def default_ray_temp_dir(suffix: str = "") -> str:
    """Ray's temp dir: the checkout's .cache/ray when its path is short, else /tmp/ray_sp_<uid>.

    Ray puts Unix sockets ~65 characters deep under it (session_<date>_<pid>/sockets/...), and a
    socket path may not exceed 107 bytes, so deep checkouts fall back to a short /tmp path.
    """
    if os.environ.get("SOFTPRUNE_RAY_TMP"):
        return os.environ["SOFTPRUNE_RAY_TMP"] + suffix
    local = Path(__file__).resolve().parents[1] / ".cache" / f"ray{suffix}"
    return str(local) if len(str(local)) <= 40 else f"/tmp/ray_sp_{os.getuid()}{suffix}"


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Attach to a running cluster under `ray job submit` (or RAY_ADDRESS), else start a local one.
    Returns True when this call started (or connected) Ray, so the caller shuts it down again."""
    import ray

    if ray.is_initialized():
        return False
    env.set_defaults()
    if _under_ray_job():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
        return True
    # address="local": never pick up a stale cluster file a previous `ray stop` left behind.
    # The dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves
    # (without it the driver prints "Failed to query Ray Train Controller actor state" every few s).
    # A local cluster listens on loopback only; token auth would just write ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's metrics recording and export serve a Prometheus that a local cluster does not have,
    # and cost the training loop about 7% of a 2-core machine (benchmarks/bench_overhead.py:
    # 0.895 -> 0.968 x bare DDP, docs/results.md); RAY_enable_metrics_collection=1 turns it back on.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    # Ray's state API, which Ray Train's placement-group cleaner polls from inside the cluster,
    # finds its cluster by scanning the machine's processes and fails ("Found multiple active Ray
    # instances") when another Ray runs beside this one: the cleaner's monitor thread dies with a
    # traceback in the run's log, and a crashed controller's placement group is never removed.
    # So the dashboard gets a port chosen here, and every process this cluster starts inherits
    # its address: the raylet, and with it each worker, copies the environment at init. The
    # driver's own environment gets its value back, so nothing later in this process (a second
    # cluster, a job submission) reads a stale address.
    port = free_port()
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", num_cpus=num_cpus, _temp_dir=default_ray_temp_dir(), log_to_driver=True,
                 dashboard_host="127.0.0.1", dashboard_port=port)
    finally:
        if before is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before
    return True


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_trainer(cfg: TrainConfig):
    """The TorchTrainer for `cfg` (nothing started yet)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .trainer import train_loop_per_worker

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.gpus_per_worker:
        resources["GPU"] = s.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json")},
        # a [min, max] range makes an elastic group: Ray starts with what it can place and, when a
        # node goes, restarts on the survivors from the last checkpoint (any world size loads it)
        scaling_config=ScalingConfig(num_workers=s.workers if isinstance(s.workers, int) else tuple(s.workers),
                                     use_gpu=s.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        # The process group's own deadline backs up the watchdog: longer than any phase may take.
        torch_config=TorchConfig(timeout_s=int(cfg.watchdog.checkpoint_timeout_s + 2 * cfg.watchdog.grace_s)),
        run_config=RunConfig(
            name=cfg.name, **storage.ray_storage(cfg.storage_abspath),  # an s3:// URI: our S3 filesystem
            failure_config=FailureConfig(max_failures=s.max_failures, max_preemption_failures=s.max_preemptions),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            worker_runtime_env={"env_vars": env.worker_env()},
            # Ray Train's INFO lines (every report of every rank, every checkpoint) drown the
            # progress lines; they stay in Ray's log files either way.
            logging_config=LoggingConfig(log_level="INFO" if env.verbose(cfg.tracking.verbose) else "WARNING"),
        ),
    )


def run_training(cfg: TrainConfig, num_cpus: int | None = None) -> dict[str, Any]:
    """Run (or resume, if `storage/name` holds checkpoints) the training; return a summary.

    The summary holds Ray's last metrics, the checkpoint path, and the final report if written.
    """
    from .preflight import preflight

    preflight(cfg)  # before anything is written or started: bad input costs one line (ValueError)
    _save_resolved(cfg)
    started = ensure_ray(num_cpus)
    try:
        result = make_trainer(cfg).fit()  # resumes silently when storage/name already has a run
    finally:
        if started:  # flushes the workers' logs before the caller prints its summary
            import ray

            ray.shutdown()
    from .outputs import output_uri

    checkpoint = result.checkpoint.path if result.checkpoint else None
    summary: dict[str, Any] = {"metrics": dict(result.metrics or {}), "output": output_uri(cfg.storage_abspath, cfg.name),
                               "checkpoint": storage.location_of(cfg.storage_abspath, checkpoint),
                               "run_dir": storage.join(cfg.storage_abspath, cfg.name)}
    report = read_report(summary["output"])
    if report is not None:
        summary["report"] = report
    return summary


def read_report(output: str) -> dict | None:
    """report.json of a run's outputs (local path or URI), or None before the run has finished."""
    try:
        return json.loads(storage.read_text(storage.join(output, "report.json")))
    except (FileNotFoundError, NotADirectoryError, storage.StorageError):
        return None


def _save_resolved(cfg: TrainConfig) -> None:
    """The resolved config next to the run, `<storage>/<name>/config.yaml` (a URI gets it uploaded)."""
    import yaml

    storage.write_text(storage.join(cfg.storage_abspath, cfg.name, "config.yaml"),
                       yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
