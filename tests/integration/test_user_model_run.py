"""A model outside the zoo through the whole pipeline on a real local Ray cluster: 2 workers,
DeepSpeed ZeRO-1 over gloo, real tar shards. `model.name=tests.user_models:small_net` (its
factory's kwargs in `model.kwargs`; Ray's workers import it from the driver's working directory)
is traced with torch.fx, trained two epochs with SFP and compacted at the freeze (epoch 1; the
compact model is a torch.fx GraphModule), then fine-tuned one more epoch. One run stops after
epoch 1 (its checkpoint holds the compact model) and resumes at the compact shape; a second runs
uninterrupted. Resuming is exact: both ship the same weights. The shipped model is smaller, loads
through the factory, scores what the run recorded, and exports.

BLOCKS picks the factory's blocks: "plain" (convs, identity and projection residual adds);
"full" (the issue's model) adds an inverted-residual block (depthwise conv, squeeze-excite gate)
and a block that concatenates two branches with torch.cat.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.support import local_ray, small_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "tests.user_models:small_net"
BLOCKS = "full"
KWARGS = {"width": 8, "blocks": BLOCKS}


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray("_um"):
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return small_shards(tmp_path_factory, train=64, val=32)


def _config(shards: str, storage: Path, name: str, **over):
    from orchestrator.config import load_config

    return load_config({
        "name": name, "storage": str(storage), "epochs": 2, "seed": 3,
        "model": {"name": MODEL, "kwargs": KWARGS},  # num_classes: the manifest's 4, passed to the factory
        "data": {"train": shards, "val": shards, "batch_size": 16, "image_size": 16, "transform": "cifar",
                 "num_workers": 0, "shuffle_buffer": 16},
        "optim": {"lr": 0.05}, "lr": {"schedule": "cosine"},
        "pruning": {"method": "sfp", "rate": 0.5, "freeze_epoch": 1, "finetune_epochs": 1,
                    "recalibrate_batches": 1, "compact_at_freeze": True, "compact_mode": "hard"},
        "checkpoint": {"every_minutes": None, "upload": "sync"},
        "scaling": {"workers": 2, "cpus_per_worker": 1, "zero_stage": 1},
        "tracking": {"wandb": False, "mode": "disabled"},
    }, over)


def _val(model, cfg) -> dict:
    from data import make_val_loader
    from orchestrator.evaluation import evaluate

    return evaluate(model, make_val_loader(cfg.data, 0, 1), cfg.data.mean, cfg.data.std)


def test_a_user_model_trains_compacts_resumes_compact_and_ships(ray_cluster, shards, tmp_path):
    from launch.cli import main
    from orchestrator.driver import run_training
    from orchestrator.model_setup import weights_digest
    from orchestrator.saved_runs import compact_checkpoint, find_checkpoints, load_model
    from pruning import load_compact

    cfg = _config(shards, tmp_path, "user")
    first = run_training(_config(shards, tmp_path, "user", stop_after_epoch=1))
    assert "report" not in first  # stopped on purpose after epoch 1, trained compact since its start
    saved_model, saved = load_model(find_checkpoints(tmp_path / "user")[-1])  # rebuilt through the factory
    assert saved.epoch == 2 and saved.algorithm["frozen"] and saved.algorithm["compacted"]
    spec = saved.arch_spec
    assert (spec["model"], spec["model_kwargs"], spec["num_classes"]) == (MODEL, KWARGS, 4)
    dense = saved.dense_counts
    assert sum(p.numel() for p in saved_model.parameters()) < dense["params"]

    second = run_training(cfg)  # same name: resumes, at the compact shape
    report = second["report"]
    resumed = report["resumed_from"]
    assert len(resumed) == 1 and (resumed[0]["epoch"], resumed[0]["step"]) == (2, 0)
    assert resumed[0]["weights_sha256"] == weights_digest(saved_model)  # the compact model, loaded exactly
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2]
    assert all(h["train_loss"] > 0 and h["val_loss"] > 0 and 0 <= h["val_top1"] <= 1 for h in report["history"])
    stages = report["stages"]
    for name in ("soft", "compacted_faithful", "hard", "recalibrated", "finetuned", "compacted_hard"):
        assert 0 <= stages[name]["top1"] <= 1 and stages[name]["loss"] > 0, name

    # the shipped model: compact, rebuilt through the factory from final/, the one the run scored
    model, shipped_spec, _ = load_compact(second["output"])
    assert json.loads((Path(second["output"]) / "arch.json").read_text())["model_kwargs"] == KWARGS
    params = sum(p.numel() for p in model.parameters())
    assert params == report["pruned"]["params"] < report["dense"]["params"]
    assert report["pruned"]["macs"] < report["dense"]["macs"]
    narrowed = [n for n, c in report["per_layer"].items() if c["kept"] < c["dense"]]
    assert narrowed and shipped_spec["channels"] == spec["channels"]  # trained on at the freeze's shape
    assert report["compact_mode"] == "hard" and stages["compacted_hard"]["top1"] == stages["finetuned"]["top1"]
    assert _val(model, cfg)["top1"] == pytest.approx(stages["compacted_hard"]["top1"], abs=1e-9)
    last = find_checkpoints(tmp_path / "user")[-1]
    assert weights_digest(load_model(last)[0]) == weights_digest(model)  # the model it fine-tuned
    faithful, _, _ = load_compact(last / "carry" / "faithful")  # the soft model's candidate, also via the factory
    assert _val(faithful, cfg)["top1"] == pytest.approx(stages["compacted_faithful"]["top1"], abs=1e-9)

    # resuming changed nothing: an uninterrupted run ships the same weights
    whole = run_training(_config(shards, tmp_path, "whole"))
    assert not whole["report"]["resumed_from"]
    assert weights_digest(load_compact(whole["output"])[0]) == weights_digest(model)

    # offline paths: `softprune compact` of the compact checkpoint, `softprune export` of final/
    out, _ = compact_checkpoint(tmp_path / "user", None, "hard")
    assert weights_digest(load_compact(out)[0]) == weights_digest(model)
    exported = tmp_path / "user.pt"
    assert main(["export", second["output"], "--format", "torchscript", "--out", str(exported),
                 "--batch", "2", "--repeats", "1", "--warmup", "0"]) == 0
    latency = json.loads(Path(f"{exported}.latency.json").read_text())
    assert latency["model"] == MODEL and latency["macs"]["ratio"] > 1 and latency["max_abs_diff"] <= 1e-4
