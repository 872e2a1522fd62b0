"""Checks of a run's inputs that need no Ray, made before Ray starts: a mistake costs one error
line, and nothing already written (the run directory, its checkpoints, outputs) is touched.

`preflight(cfg)` is the first thing `driver.run_training` does, and the launchers call it before
anything else (with their `--allow-config-change` / `--verify-shards` flags). It checks:
  * storage: writable (`orchestrator.storage.check_storage`);
  * data: every source is given, local paths are absolute (Ray workers do not run in the
    launching directory), each manifest reads and lists the split, every shard exists or answers
    HEAD with the manifest's byte count (`data.sources.check_source`; the sha256 of every shard
    only with `verify_shards`, a full read of the data set), the train and val splits give every
    rank at least one batch, and `model.num_classes` covers the manifest's classes;
  * a `package.module:factory` model builds, is traced at data.image_size (a model the tracer
    cannot follow fails with the trace's line, naming the fx node) and covers the classes;
  * `model.pretrained` is an existing file; `pruning.teacher` (unless `self`) a complete model
    directory (`arch.json`, `model.safetensors`, `report.json`: a finished run's `final/`);
  * run reuse: if `<storage>/<name>` already holds a run (its `config.yaml`, else its latest
    checkpoint's config), the run-defining fields (`RUN_DEFINING`) must be unchanged, unless
    `allow_config_change` says otherwise; the change is then recorded in the run directory.
Damage found only by reading a shard (a truncated or corrupt tar) is the loader's job, in the
workers: `data.stream.CorruptShardError` names the shard once `data.max_bad_fraction` is passed.

Every failure is a ValueError with one line naming the field, file or URI.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .config import TrainConfig
from .model_setup import check_model

# Fields whose change makes a different run: the model, what is pruned and how, the optimiser and
# schedule, the data and its augmentation, the per-rank batch and accumulation, ZeRO stage and
# precision (the checkpoint's layout and number format). A dotted prefix covers its whole section.
# Not listed, so free to change on resume: scaling.workers and the resources per worker, loader
# processes and prefetching, checkpoint cadence, tracking, watchdog, stop_after_epoch, max_bad_fraction.
RUN_DEFINING = (
    "epochs", "seed", "model", "pruning", "optim", "lr",
    "data.train", "data.val", "data.image_size", "data.transform", "data.val_crop_fraction",
    "data.batch_size", "data.shuffle_buffer", "data.seed", "data.mean", "data.std",
    "scaling.zero_stage", "scaling.precision", "scaling.grad_accum",
)
CHANGE_RECORD = "config-change-{stamp}.json"  # written into the run directory when a change is allowed

# configs that passed in this process -> whether their shards' sha256 were verified too: the
# launcher's check (with its flags) is not redone by run_training's
_passed: dict[str, bool] = {}


def preflight(cfg: TrainConfig, allow_config_change: bool = False, verify_shards: bool = False) -> None:
    """Raise ValueError (one line) if `cfg` cannot run; see the module docstring."""
    key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    if key in _passed and (_passed[key] or not verify_shards):
        return
    from .storage import check_storage

    check_storage(cfg.storage_abspath)
    check_data(cfg, verify_shards)
    check_model(cfg)
    check_pretrained(cfg)
    check_teacher(cfg)
    check_run_reuse(cfg, allow_config_change)
    _passed[key] = verify_shards


# -- data -------------------------------------------------------------------------------------
def _workers_local() -> bool:
    """True when Ray workers will be local processes of this machine (no `ray job submit`)."""
    from .driver import _under_ray_job

    return not _under_ray_job()


def check_data(cfg: TrainConfig, verify_shards: bool = False) -> None:
    from data.sources import check_source, relative_paths, verify_checksums

    d = cfg.data
    if d.train is None:
        raise ValueError("data.train: no training shard source configured (data.train=...)")
    for field, split in (("train", "train"), ("val", "val")):
        source = getattr(d, field)
        if source is None:
            continue
        relative = relative_paths(source) if _workers_local() else []
        if relative:
            raise ValueError(f"data.{field}: {relative[0]!r} is a relative path, and Ray workers do not run "
                             f"in this directory; give an absolute path")
        if not d.check_sources:
            continue
        try:
            shards = check_source(source, split)
            if shards is not None:
                _check_fit(cfg, field, shards)
                if verify_shards:
                    verify_checksums(shards)
        except ValueError as exc:
            raise ValueError(f"data.{field}: {exc}") from None


def _check_fit(cfg: TrainConfig, field: str, shards) -> None:
    """Every rank gets a batch, and the classifier covers the manifest's labels."""
    from data.plan import train_batches, val_batches

    world = getattr(cfg.scaling, "max_workers", cfg.scaling.workers)
    count = train_batches if field == "train" else val_batches
    if count(shards.total, world, cfg.data.batch_size) == 0:
        raise ValueError(f"{shards.total} samples ({shards.source}) are fewer than workers x batch_size = "
                         f"{world} x {cfg.data.batch_size}; lower data.batch_size")
    classes = len(shards.classes or [])
    if cfg.model.num_classes is not None and classes > cfg.model.num_classes:
        raise ValueError(f"the manifest of {shards.source} has {classes} classes, more than "
                         f"model.num_classes={cfg.model.num_classes}")


def check_pretrained(cfg: TrainConfig) -> None:
    path = cfg.model.pretrained
    if path is None or "://" in path:
        return
    if _workers_local() and not os.path.isabs(os.path.expanduser(path)):
        raise ValueError(f"model.pretrained: {path!r} is a relative path, and Ray workers do not run in "
                         f"this directory; give an absolute path")
    if not os.path.isfile(os.path.expanduser(path)):
        raise ValueError(f"model.pretrained: no such file {path!r}")


def check_teacher(cfg: TrainConfig) -> None:
    from pruning.io import FILES

    from .storage import exists, is_uri, join

    source = cfg.pruning.teacher
    if source is None or source == "self":
        return
    if not is_uri(source) and _workers_local() and not os.path.isabs(os.path.expanduser(source)):
        raise ValueError(f"pruning.teacher: {source!r} is a relative path, and Ray workers do not run in "
                         f"this directory; give an absolute path")
    missing = [f for f in FILES if not exists(join(os.path.expanduser(source), f))]
    if missing:
        raise ValueError(f"pruning.teacher: {source!r} is not a finished model directory (no "
                         f"{', '.join(missing)}); give a run's final/ directory or 'self'")


# -- run reuse --------------------------------------------------------------------------------
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _defining(dotted: str) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in RUN_DEFINING)


def config_changes(previous: dict, current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Run-defining dotted fields whose value differs: {field: (previous, current)}.

    The saved config is read through the current schema (defaults filled in, tuples as lists);
    one that no longer validates (written by an older version) is compared field by field where
    both have the field."""
    new = _flatten(current.model_dump(mode="json"))
    try:
        old = _flatten(TrainConfig.model_validate(previous).model_dump(mode="json"))
        keys = set(old) | set(new)
    except ValueError:  # pydantic's ValidationError: an older schema
        old = _flatten(json.loads(json.dumps(previous, default=str)))
        keys = set(old) & set(new)
    missing = object()
    return {k: (old.get(k), new.get(k)) for k in sorted(keys)
            if _defining(k) and old.get(k, missing) != new.get(k, missing)}


def check_run_reuse(cfg: TrainConfig, allow_config_change: bool = False) -> None:
    """Refuse to go on with a run directory that was started under another config (see
    `RUN_DEFINING`); with `allow_config_change`, record the change there and go on."""
    from . import storage

    run_dir = storage.join(cfg.storage_abspath, cfg.name)
    saved = _saved_config(run_dir)
    if saved is None:
        return
    previous, where = saved
    if previous is None:
        changes, problem = {"config": ("unreadable", "new")}, f"its config ({where}) cannot be read"
    else:
        changes = config_changes(previous, cfg)
        if not changes:
            return
        shown = ", ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items())
        problem = f"with another config ({where}): {shown}"
    if not allow_config_change:
        raise ValueError(f"run {run_dir} already exists {problem}; use another name for a new run, "
                         f"or pass --allow-config-change to go on with the new values")
    record = _record_change(run_dir, where, changes)
    print(f"[softprune] config change allowed: run {run_dir} already existed {problem} "
          f"(recorded in {record})", flush=True)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _saved_config(run_dir: str) -> tuple[dict | None, str] | None:
    """(config, where it was read) of the run already in `run_dir`: its config.yaml (the last
    launch's resolved config), else its latest checkpoint's; None if it holds no run. The config
    is None when the run's config.yaml cannot be read."""
    import yaml

    from . import storage

    config_file = storage.join(run_dir, "config.yaml")
    if storage.exists(config_file):
        try:
            loaded = yaml.safe_load(storage.read_text(config_file))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            loaded = None
        return (loaded if isinstance(loaded, dict) else None), config_file
    return _latest_checkpoint_config(run_dir)


def _latest_checkpoint_config(run_dir: str) -> tuple[dict, str] | None:
    from . import storage
    from .checkpoint import STATE_FILE, RunState

    found = []
    for name in storage.list_dirs(run_dir):
        try:
            state = RunState.from_json(storage.read_text(storage.join(run_dir, name, STATE_FILE)))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # not a checkpoint, or an incomplete one: not one Ray would resume from either
        if state.config:
            found.append((state.global_step, state.epoch, state.config, storage.join(run_dir, name)))
    if not found:
        return None
    *_, config, where = max(found, key=lambda f: (f[0], f[1]))
    return config, where


def _record_change(run_dir: str, where: str, changes: dict[str, tuple[Any, Any]]) -> str:
    """A new file in the run directory (nothing existing is rewritten): when, against what, which fields."""
    from . import storage

    stamp = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    record = storage.join(run_dir, CHANGE_RECORD.format(stamp=stamp))
    storage.write_text(record, json.dumps({
        "time": time.time(), "previous_config": where,
        "changes": {k: {"previous": a, "new": b} for k, (a, b) in changes.items()}}, indent=1))
    return record
