"""Scoring shipped models on a held-out split that no run saw.

A run's shipped top-1 is measured on its validation set, which also chose what it shipped (soft
pruning keeps the better of its hard and faithful compactions), and which is often small: 500
images give one image per 0.2 point. A held-out split (`softprune shards synthetic --test N`, or
any shard source) gives every shipped model one more figure, on images that chose nothing, as
large as one likes. What it buys depends on where the spread comes from (docs/results.md): on
the dev budget 10,000 held-out images narrowed the spread over seeds only from 1.34 to 1.18
points, the runs' own variance; in the papers' regime, whose models are better trained, from
0.72 to 0.28, and the pruned runs' gaps to dense from +0.3..0.4 to within 0.06.

Scoring runs in the calling process (the driver), one model at a time, on the GPU if it has one:
cheap next to training for the dev models (41 ResNet-20s on 10,000 images at 32 px: under 6
minutes on 2 busy CPU cores); an ImageNet-sized split wants the driver's GPU (not measured here).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import storage

DEFAULT_SPLIT = "test"


def check_heldout(source: str, num_classes: int | None = None) -> None:
    """The start-up check of a held-out source: its shards exist (sizes as the manifest says)
    and, with a manifest, its classes are as many as the models'. One-line ValueError naming it."""
    from data.sources import check_source

    shards = check_source(source, DEFAULT_SPLIT)
    if shards is not None and num_classes is not None and shards.classes and len(shards.classes) != num_classes:
        raise ValueError(f"held-out source {source}: {len(shards.classes)} classes, the models have {num_classes}")


def _local_model_dir(final_dir: str, scratch: Path) -> Path:
    """`final_dir` itself when local; otherwise downloaded into `scratch`."""
    if not storage.is_uri(final_dir):
        return Path(final_dir)
    return storage.download_dir(final_dir, scratch / "final")


def score_model(final_dir: str, data, source: str, device: str | None = None,
                channels_last: bool = False) -> dict[str, Any]:
    """Top-1/top-5/loss of the compacted model in `final_dir` (local or URI) on `source` (split
    "test" unless its `#split` says otherwise), its images prepared as `data` (a DataConfig: the
    run's own size, crop and normalisation) prepares validation images, NHWC with
    `channels_last` (the run's `scaling.channels_last`)."""
    import torch

    from data.loader import StreamingLoader
    from data.sources import resolve_source
    from pruning.io import load_compact

    from .evaluation import evaluate

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shards = resolve_source(source, DEFAULT_SPLIT)
    cfg = data.model_copy(update={"val": source, "num_workers": 0})
    scratch = storage.scratch_dir("sp_heldout_")
    try:
        model, _, _ = load_compact(_local_model_dir(final_dir, scratch), device)
        loader = StreamingLoader(shards, cfg, 0, 1, train=False)
        try:
            figures = evaluate(model, loader, cfg.mean, cfg.std, channels_last)
        finally:
            loader.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**figures, "source": source, "split": shards.split, "identity": shard_identity(shards)}


def shard_identity(shards) -> str:
    """Names, counts and (from a manifest) checksums of a split's shards: a set rewritten under
    the same path is another set."""
    import hashlib

    names = [u.rsplit("/", 1)[-1] for u in shards.urls]
    return hashlib.sha256(json.dumps([names, shards.counts, shards.sha256]).encode()).hexdigest()[:16]


class HeldoutCache:
    """Scores already taken, in `<comparison dir>/heldout.json`: one per run name, reused while
    the run's report (its `written_at`) and the source's shard list are the same."""

    def __init__(self, out_dir: str):
        self.path = storage.join(out_dir, "heldout.json")
        try:
            self.entries: dict[str, Any] = json.loads(storage.read_text(self.path))
        except (FileNotFoundError, storage.StorageError, json.JSONDecodeError):
            self.entries = {}

    def get(self, name: str, report: Mapping[str, Any], identity: str) -> dict[str, Any] | None:
        entry = self.entries.get(name)
        if entry and entry.get("written_at") == report.get("written_at") and entry.get("identity") == identity:
            return entry
        return None

    def put(self, name: str, report: Mapping[str, Any], figures: Mapping[str, Any]) -> None:
        self.entries[name] = {**figures, "written_at": report.get("written_at")}

    def save(self) -> None:
        storage.write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True) + "\n")


def score_runs(runs: Mapping[tuple[str, int], tuple[str, Any, Mapping[str, Any]]], source: str, out_dir: str,
               say: Callable[[str], None]) -> dict[tuple[str, int], dict[str, Any]]:
    """Score every finished run on `source`. `runs` maps (run, seed) to (its final/ directory, its
    DataConfig, its report). Scores of unchanged runs come from the cache in `out_dir`."""
    from data.sources import resolve_source

    identity = shard_identity(resolve_source(source, DEFAULT_SPLIT))
    cache, scored, fresh = HeldoutCache(out_dir), {}, 0
    for (run, seed), (final_dir, data, report) in runs.items():
        name = report.get("name") or f"{run}-s{seed}"
        figures = cache.get(name, report, identity)
        if figures is None:
            figures = score_model(final_dir, data, source)
            cache.put(name, report, figures)
            fresh += 1
            say(f"{run} seed {seed}: held-out top-1 {100 * figures['top1']:.2f}% "
                f"({figures['samples']} images of {source})")
        scored[(run, seed)] = figures
    if fresh:
        cache.save()
    return scored
