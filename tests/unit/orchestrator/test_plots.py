from __future__ import annotations

import pytest

from orchestrator.plots import stages_png, write_run_plots
from pruning import PruningConfig

PNG = b"\x89PNG\r\n\x1a\n"


def _report(stages: dict) -> dict:
    return {"model": "resnet20", "method": "asfp", "compact_mode": "hard", "input_size": 32,
            "dense": {"params": 270_000, "macs": 40_550_000}, "pruned": {"params": 150_000, "macs": 22_000_000},
            "per_layer": {"conv1": {"dense": 16, "kept": 12}, "layer1.0.conv1": {"dense": 16, "kept": 11}},
            "stages": stages}


def test_run_plots_are_pngs(tmp_path):
    stages = {"soft": {"top1": 0.5, "top5": 0.9}, "compacted_hard": {"top1": 0.6, "top5": 0.95}}
    cfg = PruningConfig(method="asfp", rate=0.3)
    written = write_run_plots(_report(stages), cfg, 10, tmp_path)
    assert sorted(p.name for p in written) == ["accuracy_vs_macs.png", "kept_channels.png", "schedule.png"]
    for path in written:
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 2000, path.name


def test_no_schedule_plot_without_pruning_and_no_stage_plot_without_stages(tmp_path):
    written = write_run_plots(_report({}), PruningConfig(method="none"), 10, tmp_path)
    assert [p.name for p in written] == ["kept_channels.png"]
    assert stages_png(_report({"soft": {"top1": 0.5}}) | {"pruned": {}}, tmp_path) is None


@pytest.mark.parametrize("bad", [{"soft": "not a result"}])
def test_stage_plot_ignores_entries_without_top1(tmp_path, bad):
    assert stages_png(_report(bad), tmp_path) is None


def test_schedule_plot_writes_a_png(tmp_path):
    from orchestrator.plots import plot_schedules
    from pruning import PruningConfig, make_schedule

    cfgs = {"sfp": PruningConfig(method="sfp", rate=0.4), "asfp": PruningConfig(method="asfp", rate=0.4)}
    path = plot_schedules({k: make_schedule(c, 50) for k, c in cfgs.items()}, 50, tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
