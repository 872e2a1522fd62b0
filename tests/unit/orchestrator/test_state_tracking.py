"""Checkpoint state round trips, completeness checks, tracking modes, the summary table."""

from __future__ import annotations

import json
import os

import pytest
import torch

from orchestrator import checkpoint as ckpt
from orchestrator.config import TrackingConfig
from orchestrator.tracking import NullLogger, make_logger, resolve_mode


def test_run_state_round_trip_and_unknown_keys():
    state = ckpt.RunState(epoch=3, step=5, world_size=2, algorithm={"masks": {"epoch": 2, "groups": {}}, "frozen": True},
                          arch_spec={"model": "resnet20", "channels": {"conv1": 8}}, wandb_run_id="abc")
    text = state.to_json().replace('"finished": false', '"finished": false, "from_the_future": 1')
    assert ckpt.RunState.from_json(text) == state
    assert "masks" not in json.loads(state.to_json())  # the run state names no pruning concept


def test_a_checkpoint_from_before_algorithm_state_still_resumes():
    old = {"epoch": 4, "world_size": 2, "masks": {"epoch": 3, "groups": {}}, "mask_history": [{"epoch": 3}],
           "frozen": True, "compacted": False}
    state = ckpt.RunState.from_json(json.dumps(old))
    assert state.algorithm == {"masks": {"epoch": 3, "groups": {}}, "history": [{"epoch": 3}], "frozen": True,
                               "compacted": False}


def test_read_state_requires_every_part_of_a_legacy_checkpoint(tmp_path):
    state = ckpt.RunState(world_size=2)  # format 1: a DeepSpeed directory
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.read_state(tmp_path)
    (tmp_path / ckpt.STATE_FILE).write_text(state.to_json())
    (tmp_path / "rank_0.pt").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match="rank_1.pt"):
        ckpt.read_state(tmp_path)
    (tmp_path / "rank_1.pt").write_bytes(b"x")
    (tmp_path / ckpt.DS_DIR / ckpt.DS_TAG).mkdir(parents=True)
    assert ckpt.read_state(tmp_path).world_size == 2


def test_read_state_refuses_a_part_cut_short(tmp_path):
    """A copy interrupted mid-file (a killed upload) has the file, but not all of it."""
    (tmp_path / ckpt.MODEL_FILE).write_bytes(b"m" * 100)
    (tmp_path / ckpt.OPTIM_FILE).write_bytes(b"o" * 50)
    (tmp_path / "rank_0.pt").write_bytes(b"x")
    state = ckpt.RunState(world_size=1, format=ckpt.FORMAT, files={ckpt.MODEL_FILE: 100, ckpt.OPTIM_FILE: 80})
    (tmp_path / ckpt.STATE_FILE).write_text(state.to_json())
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt has 50 of 80 bytes"):
        ckpt.read_state(tmp_path)
    (tmp_path / ckpt.OPTIM_FILE).write_bytes(b"o" * 80)
    assert ckpt.read_state(tmp_path).files[ckpt.OPTIM_FILE] == 80


def test_rng_state_restores_the_stream():
    saved = ckpt.rng_state()
    first = torch.rand(3)
    ckpt.set_rng_state(saved)
    assert torch.equal(torch.rand(3), first)


def test_tracking_modes(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode(TrackingConfig(wandb=False)) == "disabled"
    assert resolve_mode(TrackingConfig(mode="offline")) == "offline"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode(TrackingConfig(mode="online")) == "offline"  # the environment wins
    assert isinstance(make_logger(TrackingConfig(), 1, "x", {}, None), NullLogger)  # rank 1: no-op


def test_rank0_offline_run_resumes_same_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = make_logger(TrackingConfig(), 0, "unit", {"a": 1}, None, str(tmp_path))
    first.log({"epoch": 0, "val/top1": 0.5})
    run_id = first.run_id
    first.finish()
    again = make_logger(TrackingConfig(), 0, "unit", {"a": 1}, run_id, str(tmp_path))
    assert again.run_id == run_id
    again.kept_channels_chart({"conv1": 16, "layer1.0.conv1": 16}, {"conv1": 16, "layer1.0.conv1": 10})
    again.finish()
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert runs and all(run_id in d for d in runs)  # offline resumes get a suffixed dir, same id


def test_summary_table_lists_stages_and_sizes():
    from orchestrator.summary import summary_lines

    report = {"stages": {"soft": {"top1": 0.5, "top5": 0.9, "loss": 1.0}, "compacted_hard": {"top1": 0.6}},
              "dense": {"params": 100, "macs": 1000}, "pruned": {"params": 50, "macs": 400},
              "compact_mode": "hard", "epochs": {"trained": 3}, "resumed_from": [], "wandb_run_id": "x"}
    text = "\n".join(summary_lines({"report": report, "output": "/o", "run_dir": "/r", "checkpoint": None}))
    assert "compacted_hard" in text and "0.6000" in text and "0.400" in text and "/o" in text
    assert "re-run to resume" in "\n".join(summary_lines({"output": "/o"}))


def test_run_id_held_by_a_dying_worker_is_waited_for(tmp_path, monkeypatch):
    """After a worker-group restart the old rank 0 may still hold the wandb id for a moment:
    the new rank 0 retries and then resumes the same run instead of failing the training."""
    import subprocess
    import sys
    import time

    monkeypatch.setenv("WANDB_MODE", "offline")
    holder = make_logger(TrackingConfig(), 0, "held", {}, None, str(tmp_path))
    code = ("from orchestrator.config import TrackingConfig; from orchestrator.tracking import make_logger; "
            f"lg = make_logger(TrackingConfig(), 0, 'held', {{}}, {holder.run_id!r}, {str(tmp_path)!r}); "
            "print('ID', lg.run_id); lg.finish()")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # the child starts within this and its first attempts meet "run ID ... is in use"
    holder.finish()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    assert f"ID {holder.run_id}" in out


class _RecordingRun:
    """Stands in for a wandb run (no wandb server here): records what the logger sends it."""

    def __init__(self):
        self.logged, self.metrics = [], {}

    def log(self, data, step=None, **kw):
        assert step is None, "an explicit step makes wandb drop replayed points after a resume"
        self.logged.append(data)

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric


def test_wandb_logs_on_its_own_step_axis_so_a_resume_keeps_replayed_points():
    from orchestrator.tracking import STEP_METRIC, WandbLogger

    logger = WandbLogger.__new__(WandbLogger)  # skip wandb.init: the calls below are what matters
    logger.run, logger.step_fn = _RecordingRun(), lambda: 7
    logger.run.define_metric(STEP_METRIC)
    for step in (10, 20, 10, 15):  # resumed from the step-10 checkpoint: steps go back, points must stay
        logger.log({"train/loss": step / 10}, step=step)
    logger.log({"epoch": 1, "val/top1": 0.5})  # no step given: the run's current global step
    assert [d[STEP_METRIC] for d in logger.run.logged] == [10, 20, 10, 15, 7]
    assert [d.get("train/loss") for d in logger.run.logged[:4]] == [1.0, 2.0, 1.0, 1.5]
