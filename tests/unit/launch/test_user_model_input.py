"""`model.name=package.module:factory`: a factory that cannot be imported, found, called or traced
costs one line naming model.name (and the module, or the fx node the tracer stopped at), exit
status 2, before Ray starts and before anything is written. `softprune prune --model` the same.
The factories live in tests/user_models.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data.testing import write_indexed_shards
from launch.cli import main
from tests.unit.launch import bad_input_helpers

PREFIX = "softprune train: error: "


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_indexed_shards(tmp_path_factory.mktemp("shards"), {"train": [8, 8], "val": [8]})  # 16 classes


@pytest.fixture
def config(tmp_path, shards, monkeypatch) -> Path:
    monkeypatch.setenv("SOFTPRUNE_RAY_TMP", str(tmp_path / "ray"))
    for name in ("RAY_ADDRESS", "RAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "runs").mkdir()  # the storage check creates it otherwise: "nothing written" is checked after it
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "run", "storage": str(tmp_path / "runs"), "epochs": 1,
        "model": {"name": "tests.user_models:small_net", "kwargs": {"width": 4}},
        "data": {"train": str(shards), "val": str(shards), "batch_size": 4, "image_size": 8,
                 "transform": "cifar", "num_workers": 0},
        "scaling": {"workers": 1}, "tracking": {"wandb": False, "mode": "disabled"}}))
    return path


def refused(argv: list[str], capsys, tmp_path: Path, prefix: str = PREFIX) -> str:
    return bad_input_helpers.refused(argv, capsys, tmp_path, tmp_path / "ray", prefix)


@pytest.mark.parametrize("overrides, expected", [
    (["model.name=softprune_no_such_module:net"],
     ["model.name:", "cannot import module 'softprune_no_such_module'"]),
    (["model.name=tests.user_models:no_such_factory"],
     ["model.name:", "module 'tests.user_models' has no attribute 'no_such_factory'"]),
    (["model.name=tests.user_models:NOT_A_FACTORY"],
     ["model.name:", "tests.user_models.NOT_A_FACTORY is not callable"]),
    (["model.name=tests.user_models:flat_head", "model.kwargs={}"],
     ["model.name 'tests.user_models:flat_head': trace: node", "(call_module ", "flattens 4 channels"]),
    (["model.kwargs.blocks=fancy"],
     [("model.name 'tests.user_models:small_net': tests.user_models:small_net(width=4, blocks='fancy', "
       "num_classes=16) raised ValueError: blocks must be one of")]),
    (["model.name=tests.user_models:fixed_head", "model.kwargs={}"],
     ["model.name 'tests.user_models:fixed_head': its classifier has 3 outputs, the data has 16 classes"]),
    (["model.name=resnet20"], ["model.kwargs: only a model factory", "'resnet20' takes none"]),
], ids=["no-module", "no-attribute", "not-callable", "untraceable", "factory-raises", "too-few-classes",
        "kwargs-for-a-registered-model"])
def test_bad_user_models_are_one_line(config, tmp_path, capsys, overrides, expected):
    line = refused(["train", str(config), *overrides], capsys, tmp_path)
    for part in expected:
        assert part in line, line


def test_prune_a_user_model_and_its_bad_input(tmp_path, capsys):
    from pruning import load_compact

    out = tmp_path / "out"
    assert main(["prune", "--model", "tests.user_models:small_net", "--model-kwargs", '{"width": 6}',
                 "--num-classes", "5", "--input-size", "16", "--rate", "0.5", "--out", str(out)]) == 0
    model, spec, report = load_compact(out)  # rebuilt through the factory, with its kwargs
    assert spec["model"] == "tests.user_models:small_net" and spec["model_kwargs"] == {"width": 6}
    assert model.fc.out_features == 5 and model.fc.in_features == 12  # sfp keeps the stream feeding fc
    assert report["params"] == sum(p.numel() for p in model.parameters()) < report["dense"]["params"]
    capsys.readouterr()
    for argv, needle in [
        (["--model", "tests.user_models:flat_head", "--input-size", "8"], "--model tests.user_models:flat_head: trace: node"),
        (["--model", "tests.user_models:small_net", "--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
        (["--model", "resnet20", "--model-kwargs", '{"width": 6}'], "--model-kwargs are for a model factory"),
    ]:
        assert main(["prune", *argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
