"""Held-out scoring of shipped models (orchestrator/heldout.py) and its place in a comparison:
a real compacted model on real synthetic shards with a test split, scored without Ray through
the trainer's own validation path; the scores' cache; and the held-out columns of the table."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from data import DataConfig, make_val_loader, write_synthetic
from orchestrator.compare import aggregate, markdown_table
from orchestrator.evaluation import evaluate
from orchestrator.heldout import check_heldout, score_model, score_runs
from pruning import MaskSet, build_groups, compact, save_compact

from .test_compare import dense_report, soft_report


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    return write_synthetic(root / "set", classes=4, train=16, val=24, size=16, seed=0, shard_size=10, test=40)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A pruned ResNet-20 as a run ships it (final/: arch.json, model.safetensors, report.json)."""
    from models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4).eval()
    groups = build_groups(model, "pfec")
    masks = MaskSet(0, {g.name: torch.arange(g.size) % 2 == 0 for g in groups})
    small, spec = compact(model, groups, masks, "hard", input_size=16)
    out = tmp_path_factory.mktemp("run") / "final"
    save_compact(out, small, spec, {"name": "r", "written_at": 1.0})
    return out


def _data(manifest) -> DataConfig:
    return DataConfig(train=str(manifest), val=str(manifest), image_size=16, transform="cifar", batch_size=8,
                      num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_a_shipped_model_is_scored_as_the_trainer_validates(shards, shipped):
    """The same images prepared the same way as the run's validation: scoring the val split gives
    exactly what the trainer's evaluation of that model gives; the default split is "test"."""
    from pruning.io import load_compact

    data = _data(shards)
    model, _, _ = load_compact(shipped)
    trainer_val = evaluate(model, make_val_loader(data, 0, 1), data.mean, data.std)
    scored_val = score_model(str(shipped), data, f"{shards}#val")
    assert {k: scored_val[k] for k in trainer_val} == trainer_val and trainer_val["samples"] == 24
    other_norm = score_model(str(shipped), data.model_copy(update={"mean": (0.0, 0.0, 0.0)}), f"{shards}#val")
    assert other_norm["loss"] != trainer_val["loss"]  # the run's own normalisation is what is used
    test = score_model(str(shipped), data, str(shards))
    assert test["split"] == "test" and test["samples"] == 40 and test["source"] == str(shards)


def test_scores_are_cached_until_the_run_or_the_set_changes(shards, shipped, tmp_path):
    data, lines = _data(shards), []
    report = {"name": "cmp-dense-s0", "written_at": 5.0}
    runs = {("dense", 0): (str(shipped), data, report)}
    first = score_runs(runs, str(shards), str(tmp_path / "cmp"), lines.append)
    assert len(lines) == 1 and lines[0].startswith("dense seed 0: held-out top-1 ")
    cached = json.loads((tmp_path / "cmp" / "heldout.json").read_text())
    assert cached["cmp-dense-s0"]["top1"] == first[("dense", 0)]["top1"]
    again = score_runs(runs, str(shards), str(tmp_path / "cmp"), lines.append)
    assert len(lines) == 1 and again[("dense", 0)]["top1"] == first[("dense", 0)]["top1"]
    retrained = {("dense", 0): (str(shipped), data, {**report, "written_at": 6.0})}
    score_runs(retrained, str(shards), str(tmp_path / "cmp"), lines.append)
    assert len(lines) == 2  # a run trained again is scored again
    bigger = write_synthetic(tmp_path / "set2", classes=4, train=16, val=24, size=16, seed=0, shard_size=10, test=50)
    fresh = score_runs(retrained, str(bigger), str(tmp_path / "cmp"), lines.append)
    assert len(lines) == 3 and fresh[("dense", 0)]["samples"] == 50  # another test set: scored again


def test_a_bad_heldout_source_is_one_line_naming_it(shards, tmp_path):
    no_test = write_synthetic(tmp_path / "plain", classes=4, train=8, val=8, size=16, seed=0)
    with pytest.raises(ValueError, match=r"plain/manifest.json has no split 'test' \(it has \['train', 'val'\]\)"):
        check_heldout(str(no_test))
    with pytest.raises(ValueError, match=r"held-out source .*set/manifest.json: 4 classes, the models have 10"):
        check_heldout(str(shards), num_classes=10)
    with pytest.raises(ValueError, match="missing.json"):
        check_heldout(str(tmp_path / "missing.json"))
    check_heldout(str(shards), num_classes=4)


def _heldout(values: dict[int, float]) -> dict[int, dict]:
    return {seed: {"top1": v, "samples": 1000, "source": "/sets/m.json", "split": "test", "identity": "x"}
            for seed, v in values.items()}


def test_the_comparison_gains_held_out_top1_and_its_paired_delta():
    reports = {"dense": {0: dense_report(0.80), 1: dense_report(0.84), 2: dense_report(0.82)},
               "sfp": {0: soft_report(0.70), 1: soft_report(0.76), 2: soft_report(0.79)}}
    heldout = {"dense": _heldout({0: 0.90, 1: 0.92, 2: 0.91}), "sfp": _heldout({0: 0.88, 1: 0.91})}
    c = aggregate("cmp", reports, "dense", heldout)
    sfp = c["runs"]["sfp"]
    assert sfp["test_top1"]["mean"] == pytest.approx(0.895) and sfp["test_top1"]["n"] == 2
    assert sfp["per_seed"]["2"]["test_top1"] is None  # seed 2 not scored
    delta = sfp["delta_vs_baseline"]
    assert delta["test_paired"]["mean"] == pytest.approx(-0.015) and delta["test_paired_seeds"] == [0, 1]
    half = 12.706 * statistics.stdev([-0.02, -0.01]) / 2 ** 0.5  # t at 1 degree of freedom
    assert delta["test_paired_ci95"] == pytest.approx(half)
    assert delta["paired"]["n"] == 3  # validation pairs are unaffected
    assert c["heldout"] == {"source": "/sets/m.json", "split": "test", "samples": 1000, "identity": "x"}
    table = markdown_table(c)
    assert "| held-out top-1 (%) | held-out paired Δ ± 95% (pp) |" in table
    assert f"| 89.50 ± 2.12 | -1.50 ± {100 * half:.2f} (2) |" in table
    assert "scored on 1000 images of /sets/m.json (split test)" in table
    json.dumps(c)
    plain = markdown_table(aggregate("cmp", reports, "dense"))
    assert "held-out" not in plain and aggregate("cmp", reports, "dense")["heldout"] is None


def test_the_plot_draws_held_out_points_beside_the_validation_ones(tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    from orchestrator.compare import write_comparison

    from .test_compare import _pixels_of

    reports = {"dense": {0: dense_report(0.80), 1: dense_report(0.84)}, "sfp": {0: soft_report(0.70), 1: soft_report(0.76)}}
    # the validation figures again: the axes stay the same, the squares sit beside the dots
    heldout = {"dense": _heldout({0: 0.80, 1: 0.84}), "sfp": _heldout({0: 0.70, 1: 0.76})}
    write_comparison(aggregate("cmp", reports, "dense"), str(tmp_path / "plain"))
    write_comparison(aggregate("cmp", reports, "dense", heldout), str(tmp_path / "held"))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run, colour in zip(("dense", "sfp"), colours):
        plain, held = (_pixels_of(matplotlib.image.imread(tmp_path / d / "top1_vs_macs.png"), colour)
                       for d in ("plain", "held"))
        assert held > plain + 40, run  # a square and its error bar more, in the run's colour


def test_a_run_in_object_storage_is_scored_and_cached_there(shards, shipped, s3, tmp_path, monkeypatch):
    from orchestrator import storage

    monkeypatch.chdir(tmp_path)  # a URI taken for a local path would land here
    final = s3.uri("runs", "cmp-dense-s0", "final")
    storage.upload_dir(shipped, final)
    data, lines = _data(shards), []
    runs = {("dense", 0): (final, data, {"name": "cmp-dense-s0", "written_at": 1.0})}
    remote = score_runs(runs, str(shards), s3.uri("runs", "cmp"), lines.append)
    local = score_model(str(shipped), data, str(shards))
    assert remote[("dense", 0)]["top1"] == local["top1"] and remote[("dense", 0)]["loss"] == local["loss"]
    assert "runs/cmp/heldout.json" in s3.keys("runs/cmp/")
    score_runs(runs, str(shards), s3.uri("runs", "cmp"), lines.append)
    assert len(lines) == 1  # the second time from the bucket's heldout.json
    assert not list(tmp_path.iterdir())  # nothing written where a URI could be mistaken for a path


# -- softprune evaluate -------------------------------------------------------------------------
@pytest.fixture
def run_dir(shards, shipped, tmp_path):
    """A run directory as a run leaves it: config.yaml beside final/."""
    import shutil

    import yaml

    run = tmp_path / "runs" / "r"
    shutil.copytree(shipped, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "r", "data": _data(shards).model_dump(mode="json")}))
    return run


def test_evaluate_scores_each_model_with_its_runs_preparation(shards, run_dir, tmp_path, capsys):
    from launch.cli import main

    out_json = tmp_path / "scores.json"
    assert main(["evaluate", str(run_dir), "--data", str(shards), "--json", str(out_json)]) == 0
    line = capsys.readouterr().out.strip()
    expected = score_model(str(run_dir / "final"), _data(shards), str(shards))
    assert line == (f"{run_dir / 'final'}: top-1 {100 * expected['top1']:.2f}%  top-5 {100 * expected['top5']:.2f}%  "
                    f"loss {expected['loss']:.4f}  on 40 images of {shards} (split test)")
    assert json.loads(out_json.read_text())[str(run_dir / "final")] == expected


def test_evaluate_refuses_bad_input_in_one_line(shards, run_dir, tmp_path, capsys):
    from tests.unit.launch.bad_input_helpers import refused

    (run_dir / "config.yaml").rename(run_dir / "other.yaml")
    prefix = "softprune evaluate: error: "
    line = refused(["evaluate", str(run_dir), "--data", str(shards)], capsys, tmp_path, tmp_path / "ray", prefix)
    assert line == f"{prefix}{run_dir / 'final'}: no config.yaml in its run directory: not found; give --config " \
                   f"FILE (a config whose data section says how images are prepared)"
    line = refused(["evaluate", str(run_dir), "--data", str(tmp_path / "none.json"), "--config",
                    str(run_dir / "other.yaml")], capsys, tmp_path, tmp_path / "ray", prefix)
    assert "none.json" in line
    line = refused(["evaluate", str(tmp_path), "--data", str(shards)], capsys, tmp_path, tmp_path / "ray", prefix)
    assert "is neither a compacted model" in line



@pytest.mark.parametrize("channels_last", [False, True])
def test_evaluate_feeds_batches_in_the_layout_the_run_validated_in(channels_last, shards, run_dir, tmp_path):
    """A run trained with scaling.channels_last validated NHWC batches; `softprune evaluate` reads
    that from its config.yaml and does the same, so its val figures are the run's to the last bit
    (the layouts' outputs differ by ~3e-8 on ResNet-20)."""
    import yaml

    from launch.cli import main

    from .stem_inputs import stem_batches

    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**tree, "scaling": {"channels_last": channels_last}}))
    with stem_batches() as seen:
        assert main(["evaluate", str(run_dir), "--data", f"{shards}#val", "--json", str(tmp_path / "s.json")]) == 0
    layouts = {nhwc for _, nhwc in seen}
    assert layouts == {channels_last}
