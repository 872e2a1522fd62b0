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


def _odd_tar(path):
    """A tar with members webdataset leaves out of every sample: a directory, a `__meta__` member,
    a name without a key; and a sample whose member is upper-case."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in [("d", None), ("__index__", b"x"), ("a.cls", b"0"), ("noext", b"x"),
                           ("b.JPG", b"j"), ("b.cls", b"1"), ("__meta__/c.cls", b"x"), ("c.cls", b"2")]:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_local_and_streamed_reads_count_samples_as_webdataset(tmp_path):
    path = _odd_tar(tmp_path / "odd.tar")
    expected = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
                for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert expected == [("a", ["cls"]), ("b", ["cls", "jpg"]), ("c", ["cls"])]
    for url in (str(path), f"pipe:cat {path}"):
        got = list(read_range(url, 0, 3))
        assert [(e["__key__"], sorted(k for k in e if k != "__key__")) for _, e in got] == expected, url
        assert count_samples(url) == 3
        assert [i for i, e in read_range(url, 1, 3, want=lambda i: i != 1) if e is not None] == [2], url


def test_failing_pipe_command_is_damage_named_by_status(shard):
    got = list(read_range(f"pipe:cat {shard}.missing 2>/dev/null", 0, 3))
    assert [i for i, _ in got] == [0, 1, 2]
    assert all("exited with status 1" in e for _, e in got)


def test_stopping_early_kills_the_pipe_command(shard):
    import time

    start = time.perf_counter()
    reader = read_range(f"pipe:cat {shard}; sleep 30", 0, 12)
    assert next(reader)[0] == 0
    reader.close()  # a mid-epoch break: the command is killed, not waited for
    assert time.perf_counter() - start < 10


def test_written_shards_keep_their_byte_layout(tmp_path):
    """write_tar goes through webdataset's TarWriter but keeps the layout of before: image member
    first, mtime 0, no owner, mode 0444, so that the same samples always give the same bytes."""
    import tarfile

    from data.shardset_writer import Sample, write_tar

    samples = [Sample(f"k{i}", bytes([i]) * 5, i) for i in range(3)]
    count, nbytes, sha = write_tar(tmp_path / "a.tar", samples)
    assert count == 3 and write_tar(tmp_path / "b.tar", samples) == (count, nbytes, sha)
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["k0.jpg", "k0.cls", "k1.jpg", "k1.cls", "k2.jpg", "k2.cls"]
    assert {(m.mtime, m.mode, m.uname, m.gname, m.uid, m.gid) for m in members} == {(0, 0o444, "", "", 0, 0)}
