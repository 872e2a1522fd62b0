"""`softprune compare` end to end on a real local Ray: a dense and an SFP run of a tiny ResNet-20 on
synthetic shards, trained one after the other in the one Ray session compare starts; then a second
`compare` trains nothing: both reports are reused as they are. (Each Ray Train launch costs ~40 s
on a small machine; which runs a comparison resumes, and that preflight lets the same spec go on,
is tested by construction in tests/unit/orchestrator/test_compare.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def spec(tmp_path) -> Path:
    from data import write_synthetic

    manifest = write_synthetic(tmp_path / "shards", classes=4, train=64, val=32, size=16, seed=0, shard_size=16,
                               test=48)
    base = {"epochs": 2, "model": {"name": "resnet20", "num_classes": 4},
            "data": {"train": str(manifest), "val": str(manifest), "batch_size": 8, "image_size": 16,
                     "transform": "cifar", "num_workers": 0, "shuffle_buffer": 16},
            "optim": {"lr": 0.05}, "lr": {"schedule": "cosine"},
            "scaling": {"workers": 1, "cpus_per_worker": 1}, "tracking": {"mode": "disabled"},
            "pruning": {"recalibrate_batches": 2}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "storage": str(tmp_path / "runs"), "base": "base.yaml", "seeds": [3],
        "runs": {"dense": ["pruning.method=none"], "sfp": ["pruning.method=sfp", "pruning.rate=0.5"]}}))
    return path


def _compare(capsys, *args: str) -> str:
    from launch.cli import main

    assert main(["compare", *args, "--num-cpus", "2"]) == 0
    return capsys.readouterr().out


def test_compare_trains_then_reuses(spec, tmp_path, capsys, monkeypatch):
    import ray

    from orchestrator.driver import default_ray_temp_dir

    temp = Path(default_ray_temp_dir("_cmp"))  # short: Ray's socket paths are length-limited
    monkeypatch.setenv("SOFTPRUNE_RAY_TMP", str(temp))

    def sessions() -> set[Path]:  # one per ray.init
        return set(temp.glob("session_2*"))

    for name in ("RAY_ADDRESS", "RAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    runs = tmp_path / "runs"

    known = sessions()
    out = _compare(capsys, str(spec))
    assert len(sessions() - known) == 1  # one Ray session for both runs
    assert "dense seed 3: starting (1/2)" in out and "sfp seed 3: starting (2/2)" in out
    assert not ray.is_initialized()  # the session compare started is shut down again
    reports = {run: json.loads((runs / f"tiny-{run}-s3" / "final" / "report.json").read_text())
               for run in ("dense", "sfp")}
    assert [h["epoch"] for h in reports["sfp"]["history"]] == [0, 1]
    assert reports["sfp"]["pruned"]["macs"] < reports["dense"]["pruned"]["macs"]

    comparison = json.loads((runs / "tiny" / "compare.json").read_text())
    sfp = comparison["runs"]["sfp"]
    shipped = f"compacted_{reports['sfp']['compact_mode']}"
    assert sfp["n"] == 1 and sfp["shipped_stages"] == [shipped]
    assert sfp["top1"]["mean"] == reports["sfp"]["stages"][shipped]["top1"]
    assert sfp["soft_top1"]["mean"] == reports["sfp"]["stages"]["soft"]["top1"]
    assert sfp["pruning"]["rate"]["mean"] == [0.5, 0.5]
    # the coordinator's churn reaches the comparison: two soft events, the second one flips something or not
    assert sfp["churn_total"]["n"] == 1 and 0.0 <= sfp["churn_total"]["mean"] <= 2.0
    assert comparison["runs"]["dense"]["churn_total"]["n"] == 0
    assert sfp["curves"]["val_top1"]["mean"] == [h["val_top1"] for h in reports["sfp"]["history"]]
    assert sfp["delta_vs_baseline"]["top1"] == pytest.approx(
        sfp["top1"]["mean"] - reports["dense"]["stages"]["final"]["top1"])
    for name in ("compare.md", "top1_vs_macs.png", "curves.png", "rate.png", "churn.png"):
        assert (runs / "tiny" / name).stat().st_size > 0, name
    assert "| sfp | sfp | 1/1 |" in out  # the table, printed at the end

    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if "tiny-" in str(p)}
    known = sessions()
    test_set = str(tmp_path / "shards" / "manifest.json")
    out = _compare(capsys, str(spec), "--test", test_set)  # everything finished: reused, nothing trains
    assert sessions() == known  # not even Ray started, also to score the shipped models
    assert out.count(": reused (") == 2 and "starting" not in out and "resuming" not in out
    assert "sfp seed 3: held-out top-1 " in out and f"(48 images of {test_set})" in out
    heldout = json.loads((runs / "tiny" / "compare.json").read_text())["runs"]["sfp"]["test_top1"]
    assert heldout["n"] == 1 and 0.0 <= heldout["mean"] <= 1.0
    assert "held-out top-1 (%)" in (runs / "tiny" / "compare.md").read_text()
    after = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if "tiny-" in str(p)}
    assert after == before  # no run directory gained or changed a file
    for run, report in reports.items():
        again = json.loads((runs / f"tiny-{run}-s3" / "final" / "report.json").read_text())
        assert again["written_at"] == report["written_at"]
    assert not ray.is_initialized()
