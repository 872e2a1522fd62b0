"""The config tree: sources, overrides, and errors that name the dotted field and the value."""

from __future__ import annotations

import json

import pytest

from orchestrator.config import TrainConfig, load_config, parse_override, save_config

BASE = {"data": {"train": "/data/manifest.json", "batch_size": 8}}


def test_overrides_are_parsed_as_yaml_and_nested():
    cfg = load_config(BASE, ["scaling.zero_stage=2", "optim.lr=0.05", "lr.milestones=[1, 2]",
                             "pruning.method=asfp", "tracking.wandb=false"])
    assert cfg.scaling.zero_stage == 2 and cfg.optim.lr == 0.05 and cfg.lr.milestones == [1, 2]
    assert cfg.pruning.method == "asfp" and cfg.tracking.wandb is False


@pytest.mark.parametrize("override, field, value", [
    ("scaling.zero_stage=3", "scaling.zero_stage", "3"),
    ("optim.lr=-1", "optim.lr", "-1"),
    ("pruning.rate=1.5", "pruning.rate", "1.5"),
    ("model.name=resnet7", "model.name", "resnet7"),
    ("data.batch_size=0", "data.batch_size", "0"),
])
def test_bad_values_name_the_dotted_field_and_value(override, field, value):
    with pytest.raises(ValueError) as err:
        load_config(BASE, [override])
    assert field in str(err.value) and value in str(err.value)


def test_unknown_keys_are_rejected_everywhere():
    for override in ("foo=1", "optim.momentun=0.5", "pruning.ratee=0.3"):
        with pytest.raises(ValueError, match="Extra inputs are not permitted"):
            load_config(BASE, [override])


def test_cross_field_checks():
    with pytest.raises(ValueError, match="prune_epoch"):
        load_config(BASE, ["pruning.method=pfec", "pruning.prune_epoch=5", "epochs=3"])
    with pytest.raises(ValueError, match="fp16"):
        load_config(BASE, ["scaling.precision=fp16"])


@pytest.mark.parametrize("method", ["sfp", "asfp"])
def test_a_self_teacher_of_a_soft_method_needs_pretrained_weights(method, tmp_path):
    """sfp/asfp mask from the first epoch: the weights before the first mask are untrained."""
    with pytest.raises(ValueError, match=r"pruning.teacher='self' .* untrained: set model.pretrained"):
        load_config(BASE, [f"pruning.method={method}", "pruning.teacher=self"])
    weights = tmp_path / "dense.pt"
    cfg = load_config(BASE, [f"pruning.method={method}", "pruning.teacher=self", f"model.pretrained={weights}"])
    assert cfg.pruning.teacher == "self"
    assert load_config(BASE, ["pruning.method=pfec", "pruning.teacher=self"]).pruning.teacher == "self"
    # a dense warm-up trains the weights the first mask sees
    warm = load_config(BASE, [f"pruning.method={method}", "pruning.teacher=self", "pruning.start_epoch=3",
                              "epochs=10"])
    assert warm.pruning.start_epoch == 3


@pytest.mark.parametrize("overrides, words", [
    (["pruning.method=sfp", "pruning.start_epoch=5", "pruning.freeze_epoch=5", "epochs=9"],
     "start_epoch=5 leaves no soft event: it must be below pruning.freeze_epoch=5"),
    (["pruning.method=asfp", "pruning.start_epoch=10", "epochs=10"], "start_epoch=10 leaves no soft event: it must be below epochs=10"),
    (["pruning.method=pfec", "pruning.start_epoch=2"], "start_epoch delays soft mask events"),
    (["pruning.method=asfp", "pruning.start_epoch=4", "pruning.last_prune_epoch=4"], "must be after start_epoch=4"),
    (["pruning.method=sfp", "pruning.start_epoch=-1"], "pruning.start_epoch"),
])
def test_a_start_epoch_must_leave_soft_events(overrides, words):
    with pytest.raises(ValueError, match=words):
        load_config(BASE, overrides)


def test_malformed_override():
    with pytest.raises(ValueError, match="section.field=value"):
        parse_override("no-equals-sign")


def test_yaml_and_json_files_round_trip(tmp_path):
    cfg = load_config(BASE, ["epochs=7", "pruning.method=sfp"])
    save_config(cfg, tmp_path / "run.yaml")
    again = load_config(tmp_path / "run.yaml")
    assert again == cfg
    (tmp_path / "run.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    assert load_config(str(tmp_path / "run.json"), ["epochs=8"]).epochs == 8
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_recipe_validates():
    for name in ("resnet101_asfp", "resnet50_asfp", "resnet56_sfp", "resnet56_pfec", "vgg16_pfec", "smoke"):
        cfg = load_config(f"launch.recipes:{name}", ["data.train=/x/manifest.json"])
        assert isinstance(cfg, TrainConfig) and cfg.pruning.method != "none"
    r101 = load_config("launch.recipes:resnet101_asfp", ["data.train=/x"])
    assert (r101.epochs, r101.optim.lr, r101.lr.milestones, r101.pruning.rate) == (100, 0.1, [30, 60, 90], 0.35)
    assert r101.data.batch_size * r101.scaling.workers == 256
    paper = load_config("launch.recipes:resnet101_asfp", ["data.train=/x", "pruning.authors=true",
                                                           "pruning.rate=0.3"])
    assert (paper.pruning.policy, paper.pruning.rate, paper.pruning.zero_moments) == ("sfp", 0.3, False)


def test_recipe_rate_cuts_the_papers_macs():
    """The recipes prune the inner convs at the rate that cuts what the paper's rate cuts on every
    conv (ResNet-56: 0.53 against the paper's 0.4)."""
    import torch

    from models import create_model
    from pruning import PruningConfig
    from pruning.chooser import groups_from_config, make_chooser
    from pruning.cost import masked_cost

    def macs_kept(pruning: PruningConfig) -> float:
        torch.manual_seed(0)
        model = create_model("resnet56", num_classes=10).eval()
        groups = groups_from_config(model, pruning)
        masks = make_chooser(groups, pruning)(dict(model.named_parameters()), pruning.rate, 0)
        return masked_cost(model, groups, masks, 32, mode="hard").macs

    ours = load_config("launch.recipes:resnet56_sfp", ["data.train=/x"]).pruning
    paper = PruningConfig(method="sfp", authors=True, rate=0.4)
    assert ours.policy == "pfec" and abs(macs_kept(ours) / macs_kept(paper) - 1) < 0.02


def test_total_epochs_adds_finetuning_only_for_soft_methods():
    from orchestrator.algorithms import total_epochs

    assert total_epochs(load_config(BASE, ["epochs=5", "pruning.method=asfp", "pruning.finetune_epochs=2"])) == 7
    assert total_epochs(load_config(BASE, ["epochs=5", "pruning.method=pfec", "pruning.finetune_epochs=2"])) == 5


def test_cli_train_rejects_bad_config_before_ray(capsys):
    import sys

    from launch.cli import main

    code = main(["train", "launch.recipes:smoke", "data.train=/x/manifest.json", "scaling.zero_stage=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "scaling.zero_stage" in err and "5" in err and len(err.splitlines()) == 1
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_cli_train_prints_resolved_config(capsys):
    from launch.cli import main

    assert main(["train", "launch.recipes:resnet56_pfec", "data.train=/x", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pruning"]["preset"] == "resnet56-B" and out["model"]["name"] == "resnet56"


def test_a_relative_storage_is_made_absolute_where_the_config_is_first_read(tmp_path, monkeypatch):
    """Ray's workers validate the config again in their own working directory: a relative path
    resolved there put a run's outputs under Ray's session folder."""
    monkeypatch.chdir(tmp_path)
    for given in (["storage=runs"], []):  # set, and the default
        cfg = load_config(BASE, given)
        assert cfg.storage == str(tmp_path / "runs")
        monkeypatch.chdir("/")
        again = TrainConfig.model_validate(cfg.model_dump(mode="json"))  # what a worker does
        assert again.storage_abspath == str(tmp_path / "runs")
        monkeypatch.chdir(tmp_path)
    assert load_config(BASE, ["storage=s3://bucket/runs"]).storage == "s3://bucket/runs"
