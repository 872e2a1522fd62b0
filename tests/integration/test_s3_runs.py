"""A run whose storage is object storage, end to end: a real local Ray cluster (2 workers,
DeepSpeed over gloo) writes its checkpoints, outputs and wandb files to a real S3-compatible
server on 127.0.0.1 (moto, tests/s3server.py); the run stops after an epoch, resumes from the
bucket, finishes, and `softprune compact s3://...` compacts its latest checkpoint from there.
Nothing of the run is left outside the bucket."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.integration.support import local_ray, small_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory):
    """A bucket, and the AWS environment pointing at the server for the whole module: set before
    Ray starts, so every Ray process (controller, workers) inherits it."""
    from tests.s3server import Bucket, aws_environment

    with aws_environment(s3_server.env(), tmp_path_factory.mktemp("aws")):
        yield Bucket(s3_server)


@pytest.fixture(scope="module")
def ray_cluster(bucket):
    with local_ray("_s3"):
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return small_shards(tmp_path_factory, train=64, val=32)


def _config(shards: str, storage: str, **over):
    from orchestrator.config import load_config

    base = {
        "name": "s3run", "storage": storage, "epochs": 2, "seed": 1,
        "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": shards, "val": shards, "batch_size": 16, "image_size": 16, "transform": "cifar",
                 "num_workers": 0, "shuffle_buffer": 32},
        "optim": {"lr": 0.05}, "lr": {"schedule": "cosine"},
        "pruning": {"method": "sfp", "rate": 0.4, "recalibrate_batches": 1},
        "scaling": {"workers": 2, "cpus_per_worker": 1, "zero_stage": 1},
        "tracking": {"mode": "offline"},
    }
    return load_config(base, over)


def _files(bucket, prefix: str) -> list[str]:
    return [k for k in bucket.keys(prefix) if not k.endswith("/")]


def test_s3_run_stops_resumes_from_the_bucket_and_compacts(ray_cluster, bucket, shards, tmp_path, capsys):
    from launch.cli import main
    from orchestrator import storage
    from orchestrator.driver import run_training
    from orchestrator.saved_runs import latest_checkpoint, load_model
    from orchestrator.tracking import tracking_dir
    from pruning import load_compact

    runs = bucket.uri("runs")
    storage.check_storage(runs)
    first = run_training(_config(shards, runs, stop_after_epoch=0))
    assert "report" not in first  # stopped on purpose after epoch 0
    assert first["checkpoint"].startswith(f"{runs}/s3run/checkpoint_")
    run_files = _files(bucket, "runs/s3run/")
    assert "runs/s3run/config.yaml" in run_files  # the resolved config went up too
    saved = [k for k in run_files if k.endswith("/softprune_state.json")]
    assert len(saved) == 1 and f"{saved[0].rsplit('/', 1)[0]}/rank_1.pt" in run_files  # both ranks' parts merged

    second = run_training(_config(shards, runs))  # same name and storage: resumes from the bucket
    report = second["report"]
    assert report["resumed_from"][0]["epoch"] == 1 and report["resumed_from"][0]["step"] == 0
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    assert second["output"] == f"{runs}/s3run/final"
    finals = {k.rsplit("/", 1)[1] for k in _files(bucket, "runs/s3run/final/")}
    assert {"model.safetensors", "arch.json", "report.json", "kept_channels.png"} <= finals

    # wandb's files of both invocations (one wandb run, resumed) are in the run's storage
    wandb_files = _files(bucket, "runs/s3run/wandb/")
    offline_runs = {k.split("/")[3] for k in wandb_files if k.endswith(".wandb")}
    assert len(offline_runs) == 2 and all(r.endswith(report["wandb_run_id"]) for r in offline_runs), wandb_files
    assert report["wandb_run_dir"].startswith(f"{runs}/s3run/wandb/offline-run-")
    assert not any("latest-run" in k for k in wandb_files)

    assert main(["compact", f"{runs}/s3run"]) == 0
    assert f"-> {runs}/s3run/compact-hard" in capsys.readouterr().out
    compacted = storage.download_dir(f"{runs}/s3run/compact-hard", tmp_path / "compact")
    model, _, compact_report = load_compact(compacted)
    assert compact_report["checkpoint"] == second["checkpoint"]  # the finished run's last checkpoint
    assert compact_report["pruned"]["params"] < compact_report["dense"]["params"]
    with latest_checkpoint(f"{runs}/s3run") as (local, where):
        masked, state = load_model(local)
    assert where == second["checkpoint"] and state.finished
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():  # the compacted network is the finished, hard-masked one
        assert torch.allclose(model.eval()(x), masked(x), atol=1e-4)
    shipped = json.loads(storage.read_text(f"{runs}/s3run/final/report.json"))
    assert shipped["pruned"]["params"] == report["pruned"]["params"]
    # wandb wrote into its local staging directory, not into the shared .cache/wandb (WANDB_DIR)
    run_id = report["wandb_run_id"]
    assert not list(Path(os.environ["WANDB_DIR"]).glob(f"wandb/*{run_id}"))
    assert len(list(Path(tracking_dir(_config(shards, runs))).glob(f"wandb/offline-run-*-{run_id}"))) == 2
