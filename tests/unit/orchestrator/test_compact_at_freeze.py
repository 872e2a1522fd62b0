"""Train-time compaction through the real training loop, stopped and resumed, without Ray: one
process, a gloo group of one, real DeepSpeed engines, real shards, real checkpoints (the report
function keeps each checkpoint directory Ray would upload; resuming hands one back through Ray's
own `Checkpoint.from_directory`).

SFP freezes at epoch 2 of 4 (2 training epochs + 2 fine-tuning) and compacts there; checkpoints
come every 2 steps and at every epoch end. A run resumed from a checkpoint written after the
compaction (mid-epoch) rebuilds the compact model with its optimizer state and finishes; one
resumed from before the compaction compacts again at the freeze, to the same channels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

STEPS = 4  # optimizer steps per epoch: 32 samples, batch 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data import write_synthetic

    return str(write_synthetic(tmp_path_factory.mktemp("shards"), classes=4, train=32, val=16, size=8, seed=0,
                               shard_size=16))


def _cfg(shards: str, storage: Path, **over):
    from orchestrator.config import load_config

    return load_config({"name": "caf", "storage": str(storage), "epochs": 2, "seed": 0,
                        "model": {"name": "resnet20", "num_classes": 4},
                        "data": {"train": shards, "val": shards, "batch_size": 8, "image_size": 8,
                                 "transform": "cifar", "num_workers": 0, "shuffle_buffer": 8},
                        "optim": {"lr": 0.05, "momentum": 0.9},
                        "pruning": {"method": "sfp", "rate": 0.4, "finetune_epochs": 2, "recalibrate_batches": 1},
                        "checkpoint": {"every_steps": 2, "every_minutes": None, "on_preemption": False,
                                       "upload": "sync"},
                        "scaling": {"workers": 1}, "tracking": {"wandb": False}, "watchdog": {"timeout_s": 0}},
                       over)


class Kept:
    """The report function: keeps a copy of every checkpoint directory, as Ray's storage would."""

    def __init__(self, root: Path):
        self.root, self.dirs = root, []

    def __call__(self, metrics, checkpoint=None, checkpoint_upload_mode=None):
        target = self.root / f"{len(self.dirs):03d}"
        shutil.copytree(checkpoint.path, target)
        self.dirs.append(target)


def _train(cfg, kept: Kept, resume: Path | None = None):
    from ray.train import Checkpoint

    from orchestrator import trainer
    from orchestrator.worker import Run

    trainer.setup_worker(cfg)
    given = (lambda: Checkpoint.from_directory(str(resume))) if resume else None
    run = Run(cfg, report_fn=kept, get_checkpoint_fn=given)
    try:
        restored = _moments(run) if resume else None
        trainer.train(run)
    finally:
        run.close()
    return run, restored


def _moments(run) -> dict[str, torch.Tensor]:
    from orchestrator import engine_state

    return {n: m["momentum_buffer"] for n, m in engine_state.gather(run.engine, keep=True)[1]["moments"].items()}


def _state(d: Path):
    from orchestrator.checkpoint import read_state

    return read_state(d)


def _saved_moments(d: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(d / "optimizer.pt", weights_only=True)
    return {n: m["momentum_buffer"] for n, m in blob["moments"].items()}


def test_compacted_at_the_freeze_resumes_compact_and_an_earlier_checkpoint_compacts_again(
        world_of_one, shards, tmp_path):
    from orchestrator.saved_runs import load_model

    cfg = _cfg(shards, tmp_path / "a", stop_after_epoch=2)
    _train(cfg, kept := Kept(tmp_path / "ckpts"))
    states = [_state(d) for d in kept.dirs]
    assert [(s.epoch, s.step) for s in states] == [(0, 2), (1, 0), (1, 2), (2, 0), (2, 2), (3, 0)]
    before = kept.dirs[3]  # the end of epoch 1: soft masks, dense model
    after = kept.dirs[4]  # epoch 2, step 2: trained compact since the freeze
    assert not states[3].algorithm["frozen"] and states[3].arch_spec is None
    alg = states[4].algorithm
    assert alg["frozen"] and alg["compacted"] and states[4].arch_spec is not None
    assert [e["hard"] for e in alg["history"]] == [False, False, True]  # no frozen re-mask after compaction
    dense = sum(p.numel() for p in load_model(before)[0].parameters())
    small, _ = load_model(after)
    assert sum(p.numel() for p in small.parameters()) < dense
    saved = _saved_moments(after)
    assert {n: tuple(t.shape) for n, t in saved.items()} == {n: tuple(p.shape) for n, p in small.named_parameters()}
    assert all(float(t.abs().sum()) > 0 for n, t in saved.items() if n.endswith("conv1.weight"))

    # resumed after the compaction (mid-epoch): the compact model, its moments, and no masks of the dense model
    resumed, restored = _train(_cfg(shards, tmp_path / "b"), Kept(tmp_path / "ckpts_b"), resume=after)
    assert {n: torch.equal(t, saved[n]) for n, t in restored.items()} == {n: True for n in saved}
    assert resumed.algorithm.masker is None and resumed.algorithm.freezer is None
    report = resumed.report
    assert report["compact_mode"] in ("hard", "faithful") and report["epochs"]["trained"] == 4
    assert report["pruned"]["params"] == sum(p.numel() for p in small.parameters())  # the shape it trained
    assert report["mask_history"] == alg["history"]
    stages = report["stages"]
    assert stages["compacted_hard"]["top1"] == stages["finetuned"]["top1"]  # the model it fine-tuned
    assert {"soft", "compacted_faithful", "hard", "recalibrated"} <= set(stages)
    assert resumed.state.resumed_from[0]["step"] == 2 and resumed.state.history[-1]["epoch"] == 3

    # resumed from before the compaction: finalizes and compacts again at the freeze, to the same channels
    again, _ = _train(_cfg(shards, tmp_path / "c"), Kept(tmp_path / "ckpts_c"), resume=before)
    assert again.state.algorithm["compacted"] and again.state.arch_spec["kept"] == states[4].arch_spec["kept"]
    assert again.report["pruned"]["params"] == report["pruned"]["params"]


def test_no_recalibration_batches_keep_the_bn_statistics(world_of_one, shards, tmp_path):
    """`recalibrate_batches=0` skips the recalibration: no stage for it, and the BN statistics
    the masked model had (a reset without batches would leave BN at mean 0, variance 1)."""
    from orchestrator.evaluation import recalibrate_bn

    bn = torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    images = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)
    assert recalibrate_bn(model, [(images,)], (0.5,) * 3, (0.25,) * 3, limit=0) == 0
    assert bool((bn.running_mean == 0.5).all()) and bool((bn.running_var == 2.0).all())
    assert recalibrate_bn(model, [(images,)], (0.5,) * 3, (0.25,) * 3, limit=1) == 1
    assert not bool((bn.running_mean == 0.5).all())  # what a real recalibration changes

    cfg = _cfg(shards, tmp_path, pruning={"method": "sfp", "rate": 0.4, "finetune_epochs": 1,
                                          "recalibrate_batches": 0})
    run, _ = _train(cfg, Kept(tmp_path / "ckpts"))
    stages = run.report["stages"]
    assert "recalibrated" not in stages and {"soft", "hard", "finetuned"} <= set(stages)
