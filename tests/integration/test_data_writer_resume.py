"""A real `softprune shards imagenet` process is killed mid-run; re-running keeps its finished
shards untouched and produces exactly the shards of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.imagenet import scan_imagenet
from data.testing import write_imagenet_like_tree as make_tree
from data.imagenet_writer import plan_jobs

ROOT = Path(__file__).resolve().parents[2]

ARGS = ["--shard-size", "3", "--seed", "4", "--no-progress"]


def _cli(src: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "shards", "imagenet", str(src), str(out),
            "--workers", str(workers), *ARGS]


def _records(out: Path) -> list[Path]:
    return sorted((out / ".progress").glob("*.tar.json"))


@pytest.mark.slow
def test_killed_writer_resumes_to_the_uninterrupted_result(tmp_path):
    src = make_tree(tmp_path / "src")
    clean_src = tmp_path / "clean_src"
    shutil.copytree(src, clean_src)
    jobs = plan_jobs(scan_imagenet(src)[1], 3, 4)
    # The last job's first image becomes a FIFO: the writer (one process, jobs in order) finishes
    # every other shard, then blocks opening it until we kill it. No timing guesswork needed.
    blocker = src / jobs[-1].items[0][0]
    content = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(src, out, 1), cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 180  # a guard against a broken writer, not a speed assertion
    while len(_records(out)) < len(jobs) - 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the writer ended before reaching the blocking file"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_records(out)) == len(jobs) - 1 and not (out / "manifest.json").exists()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    assert jobs[-1].name not in kept and len(kept) == len(jobs) - 1

    blocker.unlink()
    blocker.write_bytes(content)
    subprocess.run(_cli(src, out, 2), cwd=ROOT, check=True)
    for name, stat in kept.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stat, f"{name} was rewritten"
    assert not list(out.glob(".*tmp*")) and not (out / ".progress").exists()

    clean = tmp_path / "clean"
    subprocess.run(_cli(clean_src, clean, 2), cwd=ROOT, check=True)
    resumed = json.loads((out / "manifest.json").read_text())
    uninterrupted = json.loads((clean / "manifest.json").read_text())
    for manifest in (resumed, uninterrupted):
        for split in manifest["splits"].values():
            for bad in split["bad_files"]:
                bad["error"] = bad["error"].split(":")[0]
    assert resumed["splits"] == uninterrupted["splits"]
    assert resumed["totals"]["bad_files"] == 2
