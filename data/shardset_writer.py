"""Writing a shard set: tar files, per-shard records, parallel workers, resume after a kill.

A shard set is a list of jobs, one per shard, each producing its samples deterministically.
Every finished shard is renamed into place and then recorded (`.progress/NAME.json`), so after an
interruption a re-run keeps each shard whose file matches its record (size and sha256) and
writes only the rest. The manifest is written last, atomically, and the progress folder removed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from data.manifest import MANIFEST_NAME, build_manifest, shard_record, write_json_atomic

PROGRESS_DIR = ".progress"


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    label: int


@dataclass(frozen=True)
class BadFile:
    path: str
    error: str


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its file name, split, and whatever its producer needs (picklable)."""

    name: str
    split: str
    items: tuple = field(default=(), repr=False)


class Producer(Protocol):
    def samples(self, job: ShardJob) -> Iterator[Sample | BadFile]: ...


class _HashingWriter:
    """Write-through file wrapper that hashes and counts what passes."""

    def __init__(self, raw):
        self.raw, self.sha, self.nbytes = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self.raw.write(data)


def write_tar(path: Path, samples: Iterable[Sample]) -> tuple[int, int, str]:
    """Write samples as `KEY.jpg` + `KEY.cls` into `path` atomically; (count, bytes, sha256).

    The members are written by webdataset's `TarWriter`, with fixed metadata (mtime 0, no owner,
    mode 0444, pax format) so that the same samples always give the same bytes. `TarWriter.write`
    puts a dict's members in sorted-extension order (`.cls` before `.jpg`); each sample is written
    as two single-member dicts instead, image first, so the shards stay byte-identical to the ones
    written before (their manifests' sha256 can be reproduced).
    """
    # Imported here: importing webdataset imports torch (write_shard_set loads it before forking).
    from webdataset.writer import TarWriter

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    with open(tmp, "wb") as raw:
        writer = _HashingWriter(raw)
        with TarWriter(writer, user="", group="", mode=0o444, mtime=0, encoder=False,
                       format="PAX_FORMAT") as tar:
            for sample in samples:
                tar.write({"__key__": sample.key, "jpg": sample.image})
                tar.write({"__key__": sample.key, "cls": str(sample.label).encode()})
                count += 1
    os.replace(tmp, path)
    return count, writer.nbytes, writer.sha.hexdigest()


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _run_job(args: tuple[Path, Producer, ShardJob]) -> dict[str, Any]:
    """Worker: write one shard and its progress record; returns the record."""
    out_dir, producer, job = args
    bad: list[dict[str, str]] = []

    def good_samples():
        for item in producer.samples(job):
            if isinstance(item, BadFile):
                bad.append({"path": item.path, "error": item.error, "shard": job.name})
            else:
                yield item

    count, nbytes, sha = write_tar(out_dir / job.name, good_samples())
    record = {"split": job.split, "shard": shard_record(job.name, count, nbytes, sha), "bad_files": bad}
    write_json_atomic(out_dir / PROGRESS_DIR / f"{job.name}.json", record)
    return record


def _shard_ok(args: tuple[Path, dict[str, Any]]) -> bool:
    path, rec = args
    return path.is_file() and path.stat().st_size == rec["bytes"] and file_sha256(path) == rec["sha256"]


def _previous_records(out_dir: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Records of shards an earlier run finished, from the manifest and the progress folder.

    Raises ValueError if that run used different settings (its shards would not fit this plan).
    """
    records: dict[str, dict[str, Any]] = {}
    manifest_path, progress = out_dir / MANIFEST_NAME, out_dir / PROGRESS_DIR
    sources = []
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        sources.append((manifest_path, manifest.get("settings")))
        for split, body in manifest.get("splits", {}).items():
            for rec in body["shards"]:
                bad = [b for b in body.get("bad_files", []) if b.get("shard") == rec["name"]]
                records[rec["name"]] = {"split": split, "shard": rec, "bad_files": bad}
    if (progress / "settings.json").is_file():
        sources.append((progress / "settings.json", json.loads((progress / "settings.json").read_text())))
        for path in sorted(progress.glob("*.tar.json")):
            rec = json.loads(path.read_text())
            records[rec["shard"]["name"]] = rec
    for where, old in sources:
        if old != settings:
            raise ValueError(f"{out_dir} already holds shards written with other settings ({where}); "
                             f"use a new output directory or delete it")
    return records


def _clean_temporaries(out_dir: Path) -> None:
    for path in out_dir.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)
    if (out_dir / PROGRESS_DIR).is_dir():
        for path in (out_dir / PROGRESS_DIR).glob(".*.tmp-*"):
            path.unlink(missing_ok=True)


def _map(workers: int, fn, items):
    """imap_unordered over a fork pool, or in-process for one worker (easier to debug and kill)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with multiprocessing.get_context("fork").Pool(min(workers, len(items))) as pool:
        yield from pool.imap_unordered(fn, items)


def write_shard_set(out_dir: str | Path, jobs: list[ShardJob], producer: Producer,
                    classes: list[str], settings: dict[str, Any], sizes: dict[str, int],
                    workers: int = 1, progress: bool = True) -> Path:
    """Write (or finish writing) the shards of `jobs` into `out_dir`; return the manifest path.

    `sizes` maps job name -> planned samples (for the progress bar). `settings` identifies the
    shard set: a re-run with the same settings resumes, different settings are refused.
    """
    # Once here, not in every forked worker: importing webdataset imports torch.
    import webdataset.writer  # noqa: F401

    out_dir = Path(out_dir)
    (out_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out_dir)
    previous = _previous_records(out_dir, settings)
    write_json_atomic(out_dir / PROGRESS_DIR / "settings.json", settings)
    candidates = [(out_dir / j.name, previous[j.name]["shard"]) for j in jobs if j.name in previous]
    kept = {path.name for (path, _), ok in zip(candidates, _map(workers, _shard_ok, candidates)) if ok}
    records = {name: previous[name] for name in kept}
    todo = [j for j in jobs if j.name not in kept]
    bar = tqdm(total=sum(sizes.values()), initial=sum(sizes[n] for n in kept), unit="img",
               disable=not progress, desc=f"shards -> {out_dir.name}", dynamic_ncols=True)
    with bar:
        for record in _map(workers, _run_job, [(out_dir, producer, j) for j in todo]):
            records[record["shard"]["name"]] = record
            bar.update(sizes[record["shard"]["name"]])
    return _finish(out_dir, jobs, records, classes, settings)


def _finish(out_dir: Path, jobs, records, classes, settings) -> Path:
    splits: dict[str, dict[str, list]] = {}
    for job in jobs:
        rec = records[job.name]
        split = splits.setdefault(job.split, {"shards": [], "bad_files": []})
        split["shards"].append(rec["shard"])
        split["bad_files"].extend(rec["bad_files"])
    manifest = build_manifest(classes, splits, settings)
    path = out_dir / MANIFEST_NAME
    write_json_atomic(path, manifest)
    shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
    return path
