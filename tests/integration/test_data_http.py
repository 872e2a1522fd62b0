"""Shards served by a real HTTP server on 127.0.0.1, and read through pipe: commands, give the
same batches as the local files; a missing or unreachable shard is an error at start."""

from __future__ import annotations

import functools
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from data import DataConfig, make_train_loader, make_val_loader
from data.testing import write_indexed_shards


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture()
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    src = write_indexed_shards(tmp_path / "shards", {"train": [20, 7, 13], "val": [9]}).parent
    handler = functools.partial(_QuietHandler, directory=str(src))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield src, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _cfg(train, val=None, **kw):
    return DataConfig(**{"train": train, "val": val or train, "image_size": 8, "transform": "imagenet",
                         "batch_size": 4, "num_workers": 2, "shuffle_buffer": 8, **kw})


def _batches(loader, epoch=1):
    loader.set_epoch(epoch)
    return list(loader)


def _same(a, b):
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


@pytest.mark.slow
def test_http_and_pipe_sources_match_local_files(served):
    src, base = served
    local = _batches(make_train_loader(_cfg(str(src)), 0, 1))
    assert len(local) == 10
    assert _same(local, _batches(make_train_loader(_cfg(f"{base}/manifest.json"), 0, 1)))
    assert _same(local, _batches(make_train_loader(_cfg(f"pipe:cat {src}/manifest.json"), 0, 1)))
    brace = f"{base}/train-{{000000..000002}}.tar"  # no manifest: counted over HTTP at start
    assert _same(local, _batches(make_train_loader(_cfg(brace), 0, 1)))
    val = make_val_loader(_cfg(f"{base}/manifest.json"), 0, 1)
    assert sorted(i for _, labels, valid in val for i in labels[valid].tolist()) == list(range(9))


def test_missing_or_unreachable_shards_fail_at_start(served, tmp_path):
    src, base = served
    (src / "train-000001.tar").unlink()
    with pytest.raises(ValueError, match=r"train-000001\.tar: HTTP 404"):
        make_train_loader(_cfg(f"{base}/manifest.json"), 0, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(ValueError, match="cannot read manifest"):
        make_train_loader(_cfg(f"http://127.0.0.1:{closed_port}/manifest.json"), 0, 1)
    with pytest.raises(ValueError, match="not found on PATH"):
        make_train_loader(_cfg("pipe:no-such-tool-xyz cp s3://b/train-{0..3}.tar -"), 0, 1)
    with pytest.raises(ValueError, match="pipe:"):
        make_train_loader(_cfg("s3://bucket/train-{0..3}.tar"), 0, 1)


def _resumed_on_one_rank(source: str) -> tuple[list[int], list]:
    """Two ranks stop after 2 batches of epoch 1; one rank plays the rest of the epoch."""
    cfg = _cfg(source, num_workers=0)
    first = []
    for rank in range(2):
        loader = make_train_loader(cfg, rank, 2)
        loader.set_epoch(1)
        first += [i for _, (_, labels) in zip(range(2), loader) for i in labels.tolist()]
    resumed = make_train_loader(cfg, 0, 1)
    resumed.load_state_dict(loader.state_dict())
    return first, _batches(resumed)


@pytest.mark.slow
def test_resume_on_another_world_reads_the_same_over_http(served):
    src, base = served
    first, local = _resumed_on_one_rank(str(src))
    again, remote = _resumed_on_one_rank(f"{base}/manifest.json")  # holes skipped in a stream
    assert first == again and _same(local, remote)
    ids = first + [i for _, labels in remote for i in labels.tolist()]
    assert len(ids) == len(set(ids)) == 40 - 40 % 4 and len(remote) == (40 - 16) // 4
