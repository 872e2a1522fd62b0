"""Many train + val passes with 2 loader workers inside a process that is not pytest: its
`__main__` is a script file (spawned workers import it again) and it keeps busy threads running,
like a Ray Train worker with wandb and gloo threads. That is where a per-pass fork once hung a run.

The script counts os.fork() calls in its own process (a spawned or forkserver worker starts by
fork + exec in C, which runs no Python fork hooks), records the worker pids of every pass, and
compares every batch with the epoch played in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.testing import write_indexed_shards

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 30

SCRIPT = r'''
import hashlib, json, os, sys, threading, time

import psutil
import torch

FORKS = []
IMPORTS = os.environ.get("SOAK_IMPORTS")
if IMPORTS:  # one line per import of this file: the run itself, and each spawned worker
    with open(IMPORTS, "a") as f:
        f.write(f"{__name__} {os.getpid()}\n")


def busy(stop, lock, k):
    """Python work that takes locks and allocates all the time, plus torch intra-op threads."""
    x = torch.randn(64, 64)
    while not stop.is_set():
        with lock:
            blob = json.dumps({"k": k, "t": time.time(), "v": list(range(50))})
        hashlib.sha256(blob.encode()).hexdigest()
        if k == 0:
            x = (x @ x).tanh()
        time.sleep(0.002)


def digest(batches):
    return [[b[1].tolist(), hashlib.sha256(b[0].numpy().tobytes()).hexdigest()]
            + ([b[2].tolist()] if len(b) == 3 else []) for b in batches]


def ids(batches):
    """Sorted sample ids (labels) of real samples: what any worker count must deliver."""
    return sorted(i for b in batches for i in (b[1][b[2]] if len(b) == 3 else b[1]).tolist())


def workers():
    return sorted(c.pid for c in psutil.Process().children()
                  if "resource_tracker" not in " ".join(c.cmdline()))


if __name__ == "__main__":
    os.register_at_fork(before=lambda: FORKS.append(1))
    src, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    stop, lock = threading.Event(), threading.Lock()
    threads = [threading.Thread(target=busy, args=(stop, lock, k), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    from data import DataConfig, make_train_loader, make_val_loader
    from data.testing import in_process_batches

    cfg = DataConfig(train=src, val=src, image_size=8, transform="cifar", batch_size=4,
                     num_workers=2, prefetch_factor=2, shuffle_buffer=8, seed=3)
    train, val = make_train_loader(cfg, 0, 1), make_val_loader(cfg, 0, 1)
    result = {"passes": 0, "pids": [], "train": [], "val": [], "ids": {"train": [], "val": []},
              "threads": threading.active_count()}
    start = time.perf_counter()
    for epoch in range(epochs):
        for name, loader in (("train", train), ("val", val)):
            loader.set_epoch(epoch)
            batches = list(loader)
            result[name].append(digest(batches))
            result["ids"][name].append(ids(batches))
            result["passes"] += 1
        result["pids"].append(workers())
    result["seconds"] = time.perf_counter() - start
    result["forks"] = len(FORKS)
    json.dump(result, open(out, "w"))  # written before the checks below, which need the new API
    stop.set()
    serial = DataConfig(**{**cfg.model_dump(), "num_workers": 0})
    plain_train, plain_val = make_train_loader(serial, 0, 1), make_val_loader(serial, 0, 1)
    result["in_process"] = {"train": [], "val": []}
    result["serial_ids"] = {"train": [], "val": []}
    for epoch in range(epochs):
        for name, loader, plain in (("train", train, plain_train), ("val", val, plain_val)):
            result["in_process"][name].append(digest(in_process_batches(loader, epoch)))
            plain.set_epoch(epoch)
            result["serial_ids"][name].append(ids(plain))
    train.close()
    val.close()
    result["left_after_close"] = workers()
    json.dump(result, open(out, "w"))
'''


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_many_passes_in_a_threaded_script_never_fork_and_match_in_process(tmp_path):
    src = write_indexed_shards(tmp_path / "shards", {"train": [23, 4, 31, 9], "val": [11, 6]}).parent
    script, out, imports = tmp_path / "soak_main.py", tmp_path / "result.json", tmp_path / "imports.txt"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SOAK_IMPORTS": str(imports)}
    proc = subprocess.run([sys.executable, str(script), str(src), str(EPOCHS), str(out)], env=env,
                          cwd=tmp_path, timeout=240, capture_output=True, text=True)
    assert out.exists(), f"the script died before its first report:\n{proc.stderr[-3000:]}"
    got = json.loads(out.read_text())
    stderr = proc.stderr[-3000:]
    assert got["passes"] == 2 * EPOCHS and got["threads"] >= 5, stderr
    assert got["forks"] == 0, f"the training process forked {got['forks']} times in {got['passes']} passes"
    assert all(p == got["pids"][0] for p in got["pids"]) and len(got["pids"][0]) == 4, \
        f"workers were started more than once per loader: {got['pids']}"
    assert proc.returncode == 0, stderr
    for name in ("train", "val"):
        assert got[name] == got["in_process"][name], f"{name} batches differ from the in-process epoch"
        assert got["ids"][name] == got["serial_ids"][name], f"{name}: not the samples of a num_workers=0 loader"
    assert got["left_after_close"] == [], stderr
    # the script was imported again by each spawned worker (as __mp_main__), and worked
    names = [line.split()[0] for line in imports.read_text().splitlines()]
    assert names.count("__main__") == 1 and names.count("__mp_main__") == 4, (names, stderr)
    print(f"{got['passes']} passes in {got['seconds']:.1f} s with {got['threads']} threads")
