"""End-to-end runs on a real local Ray cluster: 2 workers, DeepSpeed over gloo, shards on disk.

One Ray cluster serves the whole module (starting one costs several seconds). Each test runs the
same launch path users run (`run_training`), stops it after an epoch on purpose, starts it again
under the same name, and inspects what the run wrote: checkpoints, report.json, the compacted model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.integration.support import local_ray, small_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray("_t"):
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return small_shards(tmp_path_factory, train=128, val=64)


def _config(shards: str, storage: Path, name: str, **over):
    from orchestrator.config import load_config

    base = {
        "name": name, "storage": str(storage), "epochs": 3, "seed": 1,
        "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": shards, "val": shards, "batch_size": 16, "image_size": 16, "transform": "cifar",
                 "num_workers": 0, "shuffle_buffer": 32},
        "optim": {"lr": 0.05}, "lr": {"schedule": "cosine"},
        "scaling": {"workers": 2, "cpus_per_worker": 1},
        "tracking": {"mode": "offline"},
    }
    return load_config(base, over)


def _val_top1(model, cfg) -> float:
    """Single-process evaluation of a plain model over the whole val split."""
    from data import make_val_loader
    from orchestrator.evaluation import evaluate

    return evaluate(model, make_val_loader(cfg.data, 0, 1), cfg.data.mean, cfg.data.std)["top1"]


def test_asfp_stop_resume_finalize_compact(ray_cluster, shards, tmp_path):
    from orchestrator.driver import run_training
    from orchestrator.model_setup import weights_digest
    from orchestrator.saved_runs import find_checkpoints, load_model
    from pruning import MaskSet, load_compact

    over = {"pruning.method": "asfp", "pruning.rate": 0.4, "pruning.finetune_epochs": 1,
            "pruning.recalibrate_batches": 2, "scaling.zero_stage": 1, "checkpoint.keep": 3}
    cfg = _config(shards, tmp_path, "asfp", **over, stop_after_epoch=1)
    first = run_training(cfg)
    assert "report" not in first  # stopped on purpose after epoch 1
    saved_dir = find_checkpoints(tmp_path / "asfp")[-1]
    saved_model, saved = load_model(saved_dir)
    assert saved.epoch == 2 and [h["epoch"] for h in saved.history] == [0, 1]
    saved_masks = MaskSet.from_state(saved.algorithm["masks"])

    second = run_training(_config(shards, tmp_path, "asfp", **over))  # same name: resumes
    report = second["report"]
    resumed = report["resumed_from"]
    assert len(resumed) == 1 and resumed[0]["epoch"] == 2 and resumed[0]["step"] == 0
    assert resumed[0]["weights_sha256"] == weights_digest(saved_model)  # loaded exactly what was saved
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2, 3]  # continued at k+1, nothing redone
    events = report["mask_history"]
    assert [e["epoch"] for e in events if not e["hard"]] == [0, 1, 2]
    # the resumed run started from the saved masks: its first event's churn is measured against them
    first_after = next(e for e in events if e["epoch"] == 2 and not e["hard"])
    assert first_after["churn"] is not None
    assert events[1]["hash"] == saved_masks.hash()  # the masks in the checkpoint are the last event's
    for event in events:  # both ranks held the same zero rows after every event (checked in the run)
        assert len(event["rank_hashes"]) == 2 and len(set(event["rank_hashes"])) == 1, event

    # the shipped compacted model loads and scores what the finalized masked model scores
    stages = report["stages"]
    for name in ("soft", "compacted_faithful", "hard", "recalibrated", "finetuned", "compacted_hard"):
        assert name in stages, name
    model, spec, shipped = load_compact(second["output"])
    for png in ("kept_channels.png", "schedule.png", "accuracy_vs_macs.png"):  # published with the model
        assert (Path(second["output"]) / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert report["pruned"]["params"] < report["dense"]["params"]
    final_masked, final_state = load_model(find_checkpoints(tmp_path / "asfp")[-1])
    assert final_state.finished
    compact_top1 = _val_top1(model, cfg)
    assert compact_top1 == pytest.approx(stages[f"compacted_{report['compact_mode']}"]["top1"], abs=1e-9)
    if report["compact_mode"] == "hard":
        assert compact_top1 == pytest.approx(_val_top1(final_masked, cfg), abs=1e-9)
        assert stages["compacted_hard"]["top1"] == pytest.approx(stages["finetuned"]["top1"], abs=1e-9)
    x = torch.randn(4, 3, 16, 16)
    checkpoints = find_checkpoints(tmp_path / "asfp")
    faithful, _, _ = load_compact(checkpoints[-1] / "carry" / "faithful")  # the candidate, shipped or not
    soft_dir = max((d for d in checkpoints if not load_model(d)[1].algorithm["frozen"]),
                   key=lambda d: load_model(d)[1].epoch)
    soft_model, soft_state = load_model(soft_dir)  # the soft-masked model finalize started from
    assert soft_state.epoch == 3
    with torch.no_grad():
        assert torch.allclose(model(x), (final_masked if report["compact_mode"] == "hard" else faithful)(x), atol=1e-4)
        # faithful compaction reproduces the soft-masked model, pruned channels' BN constants and all
        assert torch.allclose(faithful.eval()(x), soft_model.eval()(x), atol=1e-4)
    assert json.loads((Path(second["output"]) / "arch.json").read_text())["model"] == "resnet20"
    # `softprune compact` path: the latest checkpoint, hard-compacted offline, is the same network
    from orchestrator.saved_runs import compact_checkpoint

    out, _ = compact_checkpoint(tmp_path / "asfp", None, "hard")
    offline_model, _, _ = load_compact(out)
    with torch.no_grad():
        assert torch.allclose(offline_model(x), final_masked(x), atol=1e-4)


def test_pfec_compacts_mid_run_and_resumes_compacted(ray_cluster, shards, tmp_path):
    from orchestrator.driver import run_training
    from orchestrator.saved_runs import find_checkpoints, load_model
    from pruning import load_compact

    over = {"pruning.method": "pfec", "pruning.policy": "pfec", "pruning.criterion": "l1",
            "pruning.rate": 0.5, "pruning.prune_epoch": 1, "scaling.zero_stage": 2}
    run_training(_config(shards, tmp_path, "pfec", **over, stop_after_epoch=1))
    saved_model, saved = load_model(find_checkpoints(tmp_path / "pfec")[-1])  # rebuilt at its small shape
    assert saved.algorithm["compacted"] and saved.arch_spec is not None and saved.epoch == 2
    dense_params = saved.dense_counts["params"]
    assert sum(p.numel() for p in saved_model.parameters()) < dense_params

    second = run_training(_config(shards, tmp_path, "pfec", **over))
    report = second["report"]
    assert report["resumed_from"][0]["epoch"] == 2
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2]
    assert {"pruned_masked", "compacted_before_retrain", "compacted_hard"} <= set(report["stages"])
    model, spec, _ = load_compact(second["output"])
    assert sum(p.numel() for p in model.parameters()) == report["pruned"]["params"] < dense_params


def _own_train_workers() -> list:
    """Ray Train worker processes of this test's own local cluster (descendants of this process)."""
    import psutil

    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def test_worker_killed_mid_run_resumes_from_last_checkpoint(ray_cluster, shards, tmp_path):
    import signal
    import threading
    import time

    from orchestrator.driver import run_training

    cfg = _config(shards, tmp_path, "killed", **{"scaling.max_failures": 1, "checkpoint.every_steps": 2,
                                                 "pruning.method": "sfp", "pruning.rate": 0.3,
                                                 "pruning.freeze_epoch": 2, "pruning.recalibrate_batches": 2})
    killed: list[int] = []

    def kill_one_worker_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            run_dir = tmp_path / "killed"
            # the controller's snapshot appears once Ray has registered a checkpoint (not just uploaded it)
            if (run_dir / "checkpoint_manager_snapshot.json").is_file():
                workers = _own_train_workers()
                if workers:
                    workers[-1].send_signal(signal.SIGKILL)  # by pid, a process this test started
                    killed.append(workers[-1].pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint)
    killer.start()
    summary = run_training(cfg)
    killer.join()
    assert killed, "no worker was killed"
    report = summary["report"]
    assert len(report["resumed_from"]) >= 1  # the restarted worker group restored a checkpoint
    assert report["wandb_run_id"] == report["resumed_from"][0]["wandb_run_id"]  # the same wandb run went on
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2]  # no epoch lost or repeated
    assert report["epochs"]["trained"] == 3
    # freeze epoch 2: finalized at its start, trained frozen, shipped compacted
    assert {"soft", "hard", "recalibrated", "finetuned", "compacted_hard"} <= set(report["stages"])
    assert report["stages"]["hard"]["epoch"] == 2


def test_a_stalled_rank_fails_and_the_run_resumes_and_finishes(ray_cluster, shards, tmp_path, monkeypatch):
    """Rank 1 stops making progress at global step 7 (injected once, 4 steps an epoch); its watchdog
    fails it after 20 s (room for a step on a loaded 2-core CI machine), Ray restarts the group
    from the step-6 checkpoint (epoch 1, step 2), and the run finishes with every epoch once."""
    from orchestrator.driver import default_ray_temp_dir, run_training

    marker = tmp_path / "stalled_once"
    monkeypatch.setenv("SOFTPRUNE_FAULTS", f"stall:rank=1:at=train:step=7:seconds=600:once={marker}")
    cfg = _config(shards, tmp_path, "stalled", **{"scaling.max_failures": 1, "checkpoint.every_steps": 2,
                                                  "epochs": 2, "watchdog.timeout_s": 20, "watchdog.grace_s": 5,
                                                  "data.num_workers": 1})  # loader processes under Ray too
    summary = run_training(cfg)
    assert marker.read_text().startswith("rank 1 at train step 7")  # the stall really happened
    report = summary["report"]
    assert len(report["resumed_from"]) == 1, report["resumed_from"]
    assert report["resumed_from"][0]["epoch"] == 1 and report["resumed_from"][0]["step"] == 2
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    logs = Path(default_ray_temp_dir("_t")) / "session_latest" / "logs"
    text = "\n".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    assert "watchdog: rank 1 made no progress in train step for" in text
