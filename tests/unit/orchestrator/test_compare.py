"""`softprune compare` without Ray: the spec and its errors, the aggregation of report dicts
(shipped stage per method, mean and sample std over seeds, baseline deltas, missing seeds), the
plots, and which runs a comparison trains when some reports are already on disk."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from launch.cli import main
from orchestrator.compare import (
    CompareSpec,
    aggregate,
    churn_by_epoch,
    load_spec,
    mask_settling,
    markdown_table,
    plan_runs,
    pruning_by_epoch,
    run_compare,
    runs_to_train,
    shipped_stage,
    write_comparison,
)

PNG = b"\x89PNG\r\n\x1a\n"
DENSE = {"params": 270_000, "macs": 40_000_000}


def _history(epochs: int, top1: float) -> list[dict]:
    return [{"epoch": e, "train_loss": 2.0 - 0.1 * e, "val_top1": top1 - 0.01 * (epochs - 1 - e), "lr": 0.1}
            for e in range(epochs)]


def dense_report(top1: float, epochs: int = 3) -> dict:
    return {"name": "d", "method": "none", "compact_mode": "dense", "dense": dict(DENSE), "pruned": dict(DENSE),
            "stages": {"final": {"top1": top1, "top5": 1.0}}, "history": _history(epochs, top1),
            "mask_history": [], "written_at": 1.0}


def soft_report(shipped: float, mode: str = "hard", other: float = 0.1, soft: float = 0.7, epochs: int = 3,
                method: str = "sfp", churn: list | None = None) -> dict:
    """An SFP/ASFP report as build_report writes it: soft events at every epoch's end (`churn`:
    each one's fraction of flipped slots, None for the first), the frozen event of finalize (no
    rate), both compactions evaluated, `mode` shipped."""
    churn = churn or [None] + [0.0] * (epochs - 1)
    events = [{"epoch": e, "rate": 0.4 if method == "sfp" else 0.1 * (e + 1), "hard": False,
               "macs": 25_000_000, "params": 160_000, "churn": churn[e]} for e in range(epochs)]
    events.append({"epoch": epochs, "rate": None, "hard": True, "macs": 25_000_000, "params": 160_000})
    stages = {"soft": {"top1": soft}, "hard": {"top1": 0.2}, "recalibrated": {"top1": 0.3},
              f"compacted_{mode}": {"top1": shipped},
              f"compacted_{'faithful' if mode == 'hard' else 'hard'}": {"top1": other}}
    return {"name": "s", "method": method, "compact_mode": mode, "dense": dict(DENSE),
            "pruned": {"params": 160_000, "macs": 24_000_000}, "stages": stages,
            "history": _history(epochs, shipped), "mask_history": events, "written_at": 2.0}


def pfec_report(shipped: float, prune_epoch: int = 1, epochs: int = 3) -> dict:
    stages = {"pruned_masked": {"top1": 0.3}, "compacted_before_retrain": {"top1": 0.31},
              "compacted_hard": {"top1": shipped}}
    return {"name": "p", "method": "pfec", "compact_mode": "hard", "dense": dict(DENSE),
            "pruned": {"params": 150_000, "macs": 20_000_000}, "stages": stages,
            "history": _history(epochs, shipped),
            "mask_history": [{"epoch": prune_epoch, "rate": 0.4, "hard": True, "macs": 20_000_000,
                              "params": 150_000}], "written_at": 3.0}


# -- shipped stage ------------------------------------------------------------------------------
def test_shipped_stage_follows_the_compact_mode_of_each_method():
    assert shipped_stage(dense_report(0.5)) == "final"
    assert shipped_stage(soft_report(0.6, mode="hard")) == "compacted_hard"
    assert shipped_stage(soft_report(0.6, mode="faithful")) == "compacted_faithful"
    assert shipped_stage(pfec_report(0.6)) == "compacted_hard"
    uncompacted = pfec_report(0.6) | {"compact_mode": "dense", "stages": {"final": {"top1": 0.6}}}
    assert shipped_stage(uncompacted) == "final"  # PFEC whose prune epoch never came
    both = soft_report(0.6, mode="hard")
    both["stages"]["final"] = {"top1": 0.99}  # a stage named final is not what a compacted run shipped
    assert shipped_stage(both) == "compacted_hard"


def test_shipped_top1_is_the_chosen_compaction_not_another_stage():
    report = soft_report(0.61, mode="faithful", other=0.95, soft=0.99)
    run = aggregate("c", {"sfp": {0: report}})["runs"]["sfp"]
    assert run["top1"]["mean"] == 0.61 and run["soft_top1"]["mean"] == 0.99
    assert run["shipped_stages"] == ["compacted_faithful"]


def test_a_report_without_its_shipped_stage_is_named():
    report = soft_report(0.6) | {"stages": {"soft": {"top1": 0.5}}, "name": "cmp-sfp-s3"}
    with pytest.raises(ValueError, match="cmp-sfp-s3.*compacted_hard"):
        shipped_stage(report)


# -- aggregation -----------------------------------------------------------------------------------
def test_mean_sample_std_sizes_and_baseline_delta():
    reports = {"dense": {0: dense_report(0.80), 1: dense_report(0.84), 2: dense_report(0.82)},
               "sfp": {0: soft_report(0.70), 1: soft_report(0.76), 2: soft_report(0.79)},
               "pfec": {0: pfec_report(0.75), 1: pfec_report(0.71), 2: pfec_report(0.73)}}
    c = aggregate("cmp", reports, baseline="dense")
    sfp, dense = c["runs"]["sfp"], c["runs"]["dense"]
    assert sfp["top1"]["mean"] == pytest.approx(0.75)
    assert sfp["top1"]["std"] == pytest.approx(statistics.stdev([0.70, 0.76, 0.79]))  # n - 1
    assert sfp["n"] == 3 and sfp["missing_seeds"] == []
    assert sfp["macs_cut"]["mean"] == pytest.approx(1 - 24 / 40)
    assert sfp["params_cut"]["mean"] == pytest.approx(1 - 160 / 270)
    assert dense["macs_cut"]["mean"] == 0.0 and dense["soft_top1"]["mean"] is None
    assert sfp["delta_vs_baseline"]["top1"] == pytest.approx(0.75 - 0.82)
    paired = sfp["delta_vs_baseline"]["paired"]
    assert paired["mean"] == pytest.approx(0.75 - 0.82)
    assert paired["std"] == pytest.approx(statistics.stdev([-0.10, -0.08, -0.03]))
    # 95% t interval, 2 degrees of freedom: t = 4.303
    half = 4.303 * statistics.stdev([-0.10, -0.08, -0.03]) / 3 ** 0.5
    assert sfp["delta_vs_baseline"]["paired_ci95"] == pytest.approx(half)
    assert f"| -7.00 | -7.00 ± {100 * half:.2f} (3) |" in markdown_table(c)  # 0 outside: resolved
    assert dense["delta_vs_baseline"]["top1"] == 0.0
    assert c["runs"]["sfp"]["per_seed"]["1"]["top1"] == 0.76  # every seed's value kept
    json.dumps(c)  # JSON-able as it is


def test_baseline_defaults_to_the_first_run_and_must_exist():
    reports = {"sfp": {0: soft_report(0.7)}, "dense": {0: dense_report(0.8)}}
    assert aggregate("c", reports)["baseline"] == "sfp"
    assert aggregate("c", reports)["runs"]["dense"]["delta_vs_baseline"]["top1"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="baseline 'pfec'"):
        aggregate("c", reports, baseline="pfec")


def test_missing_seeds_count_only_what_finished():
    reports = {"dense": {0: dense_report(0.8), 1: None, 2: dense_report(0.9)},
               "sfp": {0: None, 1: soft_report(0.7), 2: None}, "pfec": {0: None, 1: None, 2: None}}
    c = aggregate("c", reports)
    dense, sfp, pfec = (c["runs"][r] for r in ("dense", "sfp", "pfec"))
    assert dense["n"] == 2 and dense["seeds"] == [0, 2] and dense["missing_seeds"] == [1]
    assert dense["top1"]["mean"] == pytest.approx(0.85)
    assert sfp["top1"] == {"mean": 0.7, "std": None, "n": 1}  # one seed: no spread
    assert sfp["delta_vs_baseline"]["paired"]["n"] == 0  # no seed both have
    assert pfec["n"] == 0 and pfec["top1"]["mean"] is None and pfec["delta_vs_baseline"]["top1"] is None
    table = markdown_table(c)
    assert "| sfp | sfp | 1/3 (missing 0, 2) | 70.00 |" in table
    assert "| pfec | - | 0/3 (missing 0, 1, 2) | - |" in table


def test_curves_are_means_over_the_seeds_that_reached_each_epoch():
    short = dense_report(0.8, epochs=2)
    c = aggregate("c", {"dense": {0: dense_report(0.9, epochs=3), 1: short}})
    curves = c["runs"]["dense"]["curves"]
    assert curves["epoch"] == [0, 1, 2]
    assert curves["val_top1"]["n"] == [2, 2, 1]
    assert curves["val_top1"]["mean"][1] == pytest.approx((0.89 + 0.8) / 2)
    assert curves["val_top1"]["mean"][2] == pytest.approx(0.9) and curves["val_top1"]["std"][2] is None
    assert curves["train_loss"]["mean"] == pytest.approx([2.0, 1.9, 1.8])


def test_pruning_rate_per_epoch_from_mask_events():
    # ASFP: the rate grows; finalize's frozen event (no rate) keeps the last one
    asfp = pruning_by_epoch(soft_report(0.7, method="asfp", epochs=3), [0, 1, 2, 3])
    assert asfp["rate"] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert asfp["macs_kept"] == pytest.approx([25 / 40] * 4)
    # PFEC: nothing before the prune epoch, then the pruned size for good
    pfec = pruning_by_epoch(pfec_report(0.7, prune_epoch=2, epochs=4), [0, 1, 2, 3])
    assert pfec["rate"] == [0.0, 0.0, 0.4, 0.4] and pfec["macs_kept"] == pytest.approx([1, 1, 0.5, 0.5])
    assert pruning_by_epoch(dense_report(0.8), [0, 1]) == {"rate": [0.0, 0.0], "macs_kept": [1.0, 1.0]}


def test_masks_settle_at_the_first_event_from_which_none_flips_one_percent():
    late = soft_report(0.7, epochs=5, churn=[None, 0.4, 0.05, 0.009, 0.0])
    assert mask_settling(late) == {"settled_epoch": 3, "churn_total": pytest.approx(0.459)}
    # a flip of 1% at the last event: not settled, however quiet the events before it were
    moving = soft_report(0.7, epochs=4, churn=[None, 0.0, 0.0, 0.01])
    assert mask_settling(moving)["settled_epoch"] is None
    # quiet from the first event on: settled there
    assert mask_settling(soft_report(0.7, epochs=3))["settled_epoch"] == 0
    # no soft events: nothing to settle (PFEC's one hard event, and finalize's frozen one, do not count)
    assert mask_settling(pfec_report(0.7)) == {"settled_epoch": None, "churn_total": None}
    assert mask_settling(dense_report(0.8)) == {"settled_epoch": None, "churn_total": None}


def test_churn_per_epoch_sums_the_events_of_each_epoch():
    report = soft_report(0.7, epochs=3, churn=[None, 0.3, 0.1])
    # events counted in steps: two in epoch 1
    report["mask_history"].insert(2, {"epoch": 1, "global_step": 20, "rate": 0.4, "hard": False, "churn": 0.05})
    assert churn_by_epoch(report, [0, 1, 2, 3]) == pytest.approx([0.0, 0.35, 0.1, 0.0])
    assert mask_settling(report)["churn_total"] == pytest.approx(0.45)


def test_the_table_says_when_each_runs_masks_settled():
    reports = {"dense": {0: dense_report(0.8), 1: dense_report(0.82)},
               "sfp": {0: soft_report(0.7, epochs=4, churn=[None, 0.2, 0.0, 0.0]),
                       1: soft_report(0.7, epochs=4, churn=[None, 0.2, 0.2, 0.0])},
               "asfp": {0: soft_report(0.7, epochs=3, churn=[None, 0.2, 0.0], method="asfp"),
                        1: soft_report(0.7, epochs=3, churn=[None, 0.2, 0.3], method="asfp")},
               "pfec": {0: pfec_report(0.75), 1: pfec_report(0.76)}}
    c = aggregate("cmp", reports)
    assert c["runs"]["sfp"]["settled_epoch"]["mean"] == pytest.approx(2.5)
    assert c["runs"]["sfp"]["pruning"]["churn"]["mean"] == pytest.approx([0.0, 0.2, 0.1, 0.0])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in markdown_table(c).splitlines()}
    column = rows["run"].index("masks settled (epoch)")
    assert rows["sfp"][column] == "2.5 ± 0.7"
    assert rows["asfp"][column] == "2.0 (1 never)"
    assert rows["dense"][column] == "-" and rows["pfec"][column] == "-"


# -- the spec ---------------------------------------------------------------------------------------
def _spec_file(tmp_path: Path, **tree) -> Path:
    base = {"name": "cmp", "storage": str(tmp_path / "runs"), "base": "base.yaml",
            "overrides": ["epochs=3"], "seeds": [0, 1],
            "runs": {"dense": ["pruning.method=none"], "sfp": ["pruning.method=sfp", "pruning.rate=0.4"]}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"name": "resnet20", "num_classes": 4},
                                                         "data": {"image_size": 16},
                                                         "tracking": {"mode": "disabled"}}))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**base, **tree}))
    return path


def test_spec_builds_one_validated_config_per_run_and_seed(tmp_path):
    spec = load_spec(_spec_file(tmp_path))
    assert spec.baseline == "dense"  # the first run
    assert spec.base == str(tmp_path / "base.yaml")  # read from the spec's folder
    plan = plan_runs(spec, ["pruning.rate=0.3", "data.batch_size=8"])
    assert [(p.run, p.seed, p.cfg.name) for p in plan] == [
        ("dense", 0, "cmp-dense-s0"), ("dense", 1, "cmp-dense-s1"), ("sfp", 0, "cmp-sfp-s0"), ("sfp", 1, "cmp-sfp-s1")]
    sfp1 = plan[3].cfg
    assert (sfp1.seed, sfp1.data.seed, sfp1.epochs, sfp1.pruning.method) == (1, 1, 3, "sfp")
    assert sfp1.pruning.rate == 0.3 and sfp1.data.batch_size == 8  # the command line's come last
    assert sfp1.storage == str(tmp_path / "runs")
    assert plan[3].output == str(tmp_path / "runs" / "cmp-sfp-s1" / "final")
    assert plan_runs(load_spec(_spec_file(tmp_path, data_seed=False)))[3].cfg.data.seed == 0


@pytest.mark.parametrize("tree, message", [
    ({"runs": {"sfp": ["pruning.rate=1.5"]}}, "run 'sfp' (seed 0): invalid config: pruning.rate"),
    ({"runs": {"a": ["pruning.method=magic"]}}, "run 'a' (seed 0): invalid config: pruning.method"),
    ({"overrides": ["epochs=0"]}, "run 'dense' (seed 0): invalid config: epochs"),
])
def test_a_bad_value_names_the_run_and_the_field(tmp_path, tree, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_runs(load_spec(_spec_file(tmp_path, **tree)))


@pytest.mark.parametrize("tree, message", [
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"seeds": [0, 0]}, "seeds: seeds must be distinct"),
    ({"seeds": []}, "seeds: List should have at least 1 item"),
    ({"runs": {}}, "runs: Dictionary should have at least 1 item"),
    ({"baseline": "pfec"}, "baseline 'pfec' is not one of the runs (dense, sfp)"),
    ({"runs": {"a b": []}}, "run name 'a b'"),
    ({"runs": {"sfp": ["seed=3"]}}, "runs.sfp: override 'seed=3': seed is set by compare"),
    ({"overrides": ["data.seed=3"]}, "override 'data.seed=3': data.seed is set by compare"),
    ({"overrides": ["epochs"]}, "override 'epochs' is not of the form section.field=value"),
    ({"name": "my comparison"}, "name: String should match pattern"),
])
def test_spec_errors_are_one_line_naming_the_field(tmp_path, tree, message):
    with pytest.raises(ValueError) as info:
        load_spec(_spec_file(tmp_path, **tree))
    assert message in str(info.value) and "spec.yaml" in str(info.value)
    assert "\n" not in str(info.value)


def test_data_seed_may_be_overridden_when_compare_does_not_set_it(tmp_path):
    spec = load_spec(_spec_file(tmp_path, data_seed=False, overrides=["data.seed=7"]))
    assert {p.cfg.data.seed for p in plan_runs(spec)} == {7}


def test_cli_reports_a_bad_spec_in_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"softprune compare: error: compare spec {str(tmp_path / 'nope.yaml')!r} does not exist"
    spec = _spec_file(tmp_path)
    assert main(["compare", str(spec), "pruning.rate=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run 'dense' (seed 0): invalid config: pruning.rate" in err[0]
    assert main(["compare", str(spec), "--only", "pfec"]) == 2
    assert "--only: no run named 'pfec'" in capsys.readouterr().err
    assert main(["compare", str(spec), "--seeds", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["softprune compare: error: --seeds must be >= 0 (got -1)"]


def test_seeds_from_the_command_line_extend_the_spec(tmp_path):
    """`--seeds 1 5 3` on a spec of seeds [0, 1]: more replicates without editing the spec, each
    with its own data order; the spec's own seeds come first."""
    spec = load_spec(_spec_file(tmp_path))
    wider = spec.with_seeds([1, 5, 5, 3])
    assert wider.seeds == [0, 1, 5, 3] and spec.seeds == [0, 1]
    planned = {(p.run, p.seed): p for p in plan_runs(wider)}
    assert {s for _, s in planned} == {0, 1, 3, 5}
    assert planned[("dense", 5)].cfg.seed == 5 and planned[("dense", 5)].cfg.data.seed == 5
    assert spec.with_seeds(None) is spec and spec.with_seeds([0, 1]) is spec


# -- plots -------------------------------------------------------------------------------------------
def _pixels_of(image, colour) -> int:
    """Pixels of `image` (RGBA floats) within a small distance of a matplotlib colour."""
    import numpy as np
    from matplotlib.colors import to_rgb

    rgb = np.array(to_rgb(colour))
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.03).sum())


def test_plots_are_real_images(tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    reports = {"dense": {0: dense_report(0.8), 1: dense_report(0.82)},
               "sfp": {0: soft_report(0.7), 1: soft_report(0.72)},
               "pfec": {0: pfec_report(0.75), 1: None}, "asfp": {0: None, 1: None}}
    written = write_comparison(aggregate("cmp", reports), str(tmp_path / "out"))
    assert written[-1] == "compare.json"  # last: its presence says the rest is there
    assert set(written) == {"compare.md", "compare.json", "top1_vs_macs.png", "curves.png", "rate.png", "churn.png"}
    for name in ("top1_vs_macs.png", "curves.png", "rate.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name
        image = matplotlib.image.imread(tmp_path / "out" / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500, name
        assert image.std() > 0.05, name  # something drawn, not a blank canvas
        # one colour per run, in spec order: every finished run is drawn in every panel, asfp
        # (no seed finished) in none
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        half = image.shape[1] // 2
        panels = [image] if name == "top1_vs_macs.png" else [image[:, :half], image[:, half:]]
        for i, panel in enumerate(panels):
            for run, colour in zip(("dense", "sfp", "pfec"), colours):
                assert _pixels_of(panel, colour) > 40, (name, i, run)
            assert _pixels_of(panel, colours[3]) == 0, (name, i)
    # churn: only the run with soft events is drawn
    churn = matplotlib.image.imread(tmp_path / "out" / "churn.png")
    assert churn.shape[0] > 300 and churn.shape[1] > 500
    assert _pixels_of(churn, colours[1]) > 40
    assert _pixels_of(churn, colours[0]) == 0 and _pixels_of(churn, colours[2]) == 0
    stored = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert stored["runs"]["pfec"]["missing_seeds"] == [1]
    assert "| sfp | sfp | 2/2 | 71.00 ± 1.41 | -10.00 |" in (tmp_path / "out" / "compare.md").read_text()


# -- what a comparison trains ---------------------------------------------------------------------
def _write_report(planned, report: dict) -> None:
    out = Path(planned.output)
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(report | {"name": planned.cfg.name}))
    (Path(planned.run_dir) / "config.yaml").write_text(yaml.safe_dump(planned.cfg.model_dump(mode="json")))


def test_runs_to_train_skips_finished_runs_and_honours_only(tmp_path):
    plan = plan_runs(load_spec(_spec_file(tmp_path)))
    reports = {("dense", 0): dense_report(0.8), ("sfp", 1): soft_report(0.7)}
    assert [(p.run, p.seed) for p in runs_to_train(plan, reports)] == [("dense", 1), ("sfp", 0)]
    assert [(p.run, p.seed) for p in runs_to_train(plan, reports, only=["sfp"])] == [("sfp", 0)]
    assert runs_to_train(plan, reports, report_only=True) == []
    assert [(p.run, p.seed) for p in runs_to_train(plan, reports, seeds=[1])] == [("dense", 1)]
    assert runs_to_train(plan, reports, only=["sfp"], seeds=[1]) == []


def _kd_spec(tmp_path: Path, teacher: str = "run:dense") -> CompareSpec:
    runs = {"dense": ["pruning.method=none"], "sfp": ["pruning.method=sfp", "pruning.rate=0.4"],
            "sfp_kd": ["pruning.method=sfp", "pruning.rate=0.4", f"pruning.teacher={teacher}"]}
    return load_spec(_spec_file(tmp_path, runs=runs))


def test_a_run_distils_from_another_run_of_the_spec_at_its_own_seed(tmp_path):
    plan = plan_runs(_kd_spec(tmp_path))
    kd = [p for p in plan if p.run == "sfp_kd"]
    assert [(p.seed, p.teacher_run, p.cfg.pruning.teacher) for p in kd] == [
        (0, "dense", str(tmp_path / "runs" / "cmp-dense-s0" / "final")),
        (1, "dense", str(tmp_path / "runs" / "cmp-dense-s1" / "final"))]
    assert all(p.teacher_run is None for p in plan if p.run != "sfp_kd")
    # the teacher trains first, whatever the spec's order; a teacher neither finished nor to be
    # trained in this invocation is named before anything starts
    todo = runs_to_train(list(reversed(plan)), {}, seeds=[0])
    assert [p.run for p in todo][:1] == ["dense"] and {p.run for p in todo} == {"dense", "sfp", "sfp_kd"}
    assert [p.run for p in runs_to_train(plan, {("dense", 0): dense_report(0.8)}, only=["sfp_kd"], seeds=[0])] == [
        "sfp_kd"]
    with pytest.raises(ValueError, match=r"^sfp_kd seed 1 distils from run 'dense', which has not finished"):
        runs_to_train(plan, {("dense", 0): dense_report(0.8)}, only=["sfp_kd"])


def test_a_teacher_trained_in_the_same_invocation_passes_the_checks_before_it_exists(tmp_path, monkeypatch):
    """Every run is checked before the first one trains, but the dense teacher's final/ cannot
    exist yet: its check waits for the run that writes it, and that run goes first."""
    from data import write_synthetic

    import orchestrator.compare as compare

    manifest = write_synthetic(tmp_path / "shards", classes=4, train=16, val=8, size=16, shard_size=8)
    spec = _kd_spec(tmp_path)
    plan = plan_runs(spec, [f"data.train={manifest}", f"data.val={manifest}", "data.batch_size=4"])
    trained: list[tuple[str, int]] = []
    monkeypatch.setattr(compare, "train_runs", lambda todo, *a, **k: trained.extend((p.run, p.seed) for p in todo))
    run_compare(spec, plan, only=["sfp_kd", "dense"], seeds=[0], say=lambda line: None)
    assert trained == [("dense", 0), ("sfp_kd", 0)]


@pytest.mark.parametrize("teacher", ["run:densest", "run:sfp_kd"])
def test_a_teacher_run_must_be_another_run_of_the_spec(tmp_path, teacher):
    with pytest.raises(ValueError, match=rf"run 'sfp_kd' \(seed 0\): pruning.teacher={teacher}: no other run"):
        plan_runs(_kd_spec(tmp_path, teacher))


def test_finished_runs_on_disk_are_reused_without_ray(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("SOFTPRUNE_RAY_TMP", str(tmp_path / "ray"))  # where a Ray session would go
    spec = load_spec(_spec_file(tmp_path))
    plan = plan_runs(spec)
    for p, top1 in zip(plan, (0.8, 0.82, 0.7, 0.74)):
        _write_report(p, dense_report(top1) if p.run == "dense" else soft_report(top1))
    lines: list[str] = []
    comparison = run_compare(spec, plan, say=lines.append)  # not report-only: still trains nothing
    assert not ray.is_initialized() and not (tmp_path / "ray").exists()
    assert lines == [
        f"dense seed 0: reused ({plan[0].output}, shipped top-1 80.00% (final), MACs cut 0.0%)",
        f"dense seed 1: reused ({plan[1].output}, shipped top-1 82.00% (final), MACs cut 0.0%)",
        f"sfp seed 0: reused ({plan[2].output}, shipped top-1 70.00% (compacted_hard), MACs cut 40.0%)",
        f"sfp seed 1: reused ({plan[3].output}, shipped top-1 74.00% (compacted_hard), MACs cut 40.0%)"]
    assert comparison["runs"]["sfp"]["top1"]["mean"] == pytest.approx(0.72)
    assert json.loads((tmp_path / "runs" / "cmp" / "compare.json").read_text())["runs"]["dense"]["n"] == 2


def test_an_unfinished_run_is_checked_before_anything_trains(tmp_path, monkeypatch):
    """One report missing: the run that would train is preflighted (here: no data source) and the
    error names it; nothing is written, no Ray."""
    import ray

    monkeypatch.setenv("SOFTPRUNE_RAY_TMP", str(tmp_path / "ray"))
    spec = load_spec(_spec_file(tmp_path))
    plan = plan_runs(spec)
    for p in plan[:3]:
        _write_report(p, dense_report(0.8) if p.run == "dense" else soft_report(0.7))
    with pytest.raises(ValueError, match=r"^sfp seed 1: data.train: no training shard source"):
        run_compare(spec, plan, say=lambda line: None)
    assert not ray.is_initialized() and not (tmp_path / "ray").exists()
    assert not (tmp_path / "runs" / "cmp").exists()
    # --report-only: the table covers what finished, the missing seed is shown as missing
    comparison = run_compare(spec, plan, report_only=True, say=lambda line: None)
    assert comparison["runs"]["sfp"]["n"] == 1 and comparison["runs"]["sfp"]["missing_seeds"] == [1]


def test_a_finished_run_of_another_config_is_not_reused(tmp_path):
    spec = load_spec(_spec_file(tmp_path))
    plan = plan_runs(spec)
    for p in plan:
        _write_report(p, dense_report(0.8) if p.run == "dense" else soft_report(0.7))
    changed = plan_runs(load_spec(_spec_file(tmp_path, overrides=["epochs=5"])))
    with pytest.raises(ValueError, match=r"^dense seed 0: .*cmp-dense-s0 finished under another config "
                                         r"\(epochs: 3 -> 5\)"):
        run_compare(spec, changed, report_only=True, say=lambda line: None)
    # data sources left out on the command line (say with --report-only) are not a change
    with_data = plan_runs(spec, ["data.train=/abs/shards"])
    for p in with_data:
        Path(p.run_dir, "config.yaml").write_text(yaml.safe_dump(p.cfg.model_dump(mode="json")))
    assert run_compare(spec, plan, report_only=True, say=lambda line: None)["runs"]["sfp"]["n"] == 2


def test_an_interrupted_run_goes_on_under_the_same_spec(tmp_path):
    """A run that started (its config.yaml is there, as run_training writes it first) but has no
    report is trained again, and preflight's run-reuse check lets the same spec go on; a changed
    spec is refused with the change named."""
    from data import write_synthetic
    from orchestrator.preflight import preflight

    manifest = write_synthetic(tmp_path / "shards", classes=4, train=32, val=16, size=8, shard_size=16)
    extra = [f"data.train={manifest}", f"data.val={manifest}", "data.batch_size=4", "scaling.workers=1"]
    spec = load_spec(_spec_file(tmp_path))
    plan = plan_runs(spec, extra)
    started = plan[2]  # sfp seed 0: interrupted before its report
    Path(started.run_dir).mkdir(parents=True)
    Path(started.run_dir, "config.yaml").write_text(yaml.safe_dump(started.cfg.model_dump(mode="json")))
    for p in (plan[0], plan[1], plan[3]):
        _write_report(p, dense_report(0.8) if p.run == "dense" else soft_report(0.7))
    again = plan_runs(load_spec(_spec_file(tmp_path)), extra)  # the same command, run again
    reports = {(p.run, p.seed): json.loads(Path(p.output, "report.json").read_text())
               for p in again if Path(p.output, "report.json").exists()}
    assert [(p.run, p.seed) for p in runs_to_train(again, reports)] == [("sfp", 0)]
    preflight(again[2].cfg)  # no refusal: same run-defining values
    changed = plan_runs(load_spec(_spec_file(tmp_path, overrides=["epochs=4"])), extra)
    with pytest.raises(ValueError, match=r"cmp-sfp-s0 already exists with another config .*epochs: 3 -> 4"):
        preflight(changed[2].cfg)


def test_cli_report_only_prints_the_table(tmp_path, capsys):
    spec_path = _spec_file(tmp_path)
    plan = plan_runs(load_spec(spec_path))
    for p in plan:
        _write_report(p, dense_report(0.8) if p.run == "dense" else soft_report(0.7))
    assert main(["compare", str(spec_path), "--report-only"]) == 0
    out = capsys.readouterr().out
    assert "| dense | none | 2/2 | 80.00 ± 0.00 | baseline | - | - | - | 0.00 | 0.00 | final |" in out
    assert "| sfp | sfp | 2/2 | 70.00 ± 0.00 | -10.00 | -10.00 ± 0.00 (2) | 70.00 ± 0.00 | 0.0 ± 0.0 | 40.00 |" in out
    assert out.count("reused") == 4
    assert (tmp_path / "runs" / "cmp" / "compare.md").read_text() in out


def test_spec_model_rejects_reserved_fields_directly():
    with pytest.raises(ValueError, match="name is set by compare"):
        CompareSpec(name="x", base="b.yaml", runs={"a": ["name=y"]})


def test_reports_and_comparison_in_object_storage(s3, tmp_path, monkeypatch):
    """An s3:// storage: the reports are read from the bucket and the comparison is uploaded there."""
    from orchestrator import storage

    monkeypatch.chdir(tmp_path)  # a URI taken for a local path would land here, not in the checkout

    spec = load_spec(_spec_file(tmp_path, storage=s3.uri("runs")))
    plan = plan_runs(spec)
    for p in plan:
        report = dense_report(0.8) if p.run == "dense" else soft_report(0.7 + 0.02 * p.seed)
        storage.write_text(storage.join(p.output, "report.json"), json.dumps(report))
        storage.write_text(storage.join(p.run_dir, "config.yaml"), yaml.safe_dump(p.cfg.model_dump(mode="json")))
    comparison = run_compare(spec, plan, say=lambda line: None)  # all finished: nothing to train
    assert comparison["runs"]["sfp"]["top1"]["mean"] == pytest.approx(0.71)
    assert {k for k in s3.keys("runs/cmp/") if not k.endswith("/")} == {f"runs/cmp/{n}" for n in
                                          ("compare.json", "compare.md", "top1_vs_macs.png", "curves.png", "rate.png",
                                                                        "churn.png")}
    stored = json.loads(storage.read_text(s3.uri("runs", "cmp", "compare.json")))
    assert stored["runs"]["sfp"]["per_seed"]["1"]["top1"] == pytest.approx(0.72)
