"""Tar reading by index, compatibility with webdataset itself, DataConfig validation, the CLI."""

from __future__ import annotations

import json

import pytest
import webdataset as wds
from pydantic import ValidationError

from data import DataConfig
from data.tario import count_samples, read_range
from data.testing import write_indexed_shards
from launch.cli import main


@pytest.fixture()
def shard(tmp_path):
    return write_indexed_shards(tmp_path, {"train": [12]}).parent / "train-000000.tar"


def test_read_range_skips_and_selects(shard):
    got = list(read_range(str(shard), 3, 9, want=lambda i: i % 2 == 0))
    assert [i for i, _ in got] == list(range(3, 9))
    assert [int(e["cls"]) for i, e in got if i % 2 == 0] == [4, 6, 8]
    assert all(e is None for i, e in got if i % 2)
    assert count_samples(str(shard)) == 12


def test_read_range_through_a_pipe_command(shard):
    got = list(read_range(f"pipe:cat {shard}", 10, 12))
    assert [int(e["cls"]) for _, e in got] == [10, 11]


def test_read_range_reports_every_missing_index(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    got = list(read_range(str(shard), 0, 12))
    assert [i for i, _ in got] == list(range(12))
    # A sample cut mid-way comes back as a reason or without its .cls member (unusable either way).
    unusable = [i for i, e in got if isinstance(e, str) or "cls" not in e]
    assert 2 <= len(unusable) <= 5 and unusable == list(range(unusable[0], 12))
    assert isinstance(got[-1][1], str)


def test_webdataset_reads_our_shards(shard):
    dataset = wds.WebDataset(str(shard), shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls")
    items = list(dataset)
    assert [label for _, _, label in items] == list(range(12))
    assert items[0][1].size == (8, 8)


def test_config_rejects_unknown_and_bad_fields():
    with pytest.raises(ValidationError, match="batchsize"):
        DataConfig(batchsize=3)
    with pytest.raises(ValidationError, match="max_bad_fraction"):
        DataConfig(max_bad_fraction=1.5)
    with pytest.raises(ValidationError, match="transform"):
        DataConfig(transform="resnet")
    assert DataConfig.model_validate_json(DataConfig(train="x").model_dump_json()).train == "x"


def test_cli_synthetic_and_bad_input(tmp_path, capsys):
    assert main(["shards", "synthetic", str(tmp_path / "s"), "--classes", "3", "--train", "30",
                 "--val", "9", "--size", "16", "--shard-size", "10", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 39 and manifest["totals"]["shards"] == 4
    assert main(["shards", "synthetic", str(tmp_path / "t"), "--classes", "0", "--train", "3",
                 "--val", "0", "--size", "16"]) == 2
    assert "classes must be at least 2" in capsys.readouterr().err
    assert main(["shards", "imagenet", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
