"""Work on a run's checkpoints without Ray or DeepSpeed: find the latest one, load its model,
compact it. Used by `softprune compact` and by the tests that inspect what a run saved.

A run may live in a local directory or in object storage (`s3://bucket/prefix/run`): there the
latest complete checkpoint is downloaded into a local temp directory first, and the compacted
model is uploaded to the destination (report.json last).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from . import checkpoint as ckpt
from . import storage


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (by global step, then epoch)."""
    root = Path(run_dir)
    if (root / ckpt.STATE_FILE).is_file():
        return [root]
    found = []
    for d in root.iterdir() if root.is_dir() else []:
        try:
            state = ckpt.read_state(d)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue  # incomplete or not a checkpoint
        found.append((state.global_step, state.epoch, state.finished, d))
    if not found:
        raise ValueError(f"no complete softprune checkpoint under {run_dir}")
    return [d for *_, d in sorted(found)]


def load_model(checkpoint_dir: str | Path) -> tuple[nn.Module, ckpt.RunState]:
    """The checkpoint's model (rebuilt at its saved shape: a registered model, or a user factory's
    traced and re-compacted) with its weights, and its state."""
    from .model_setup import dense_model, saved_model

    state = ckpt.read_state(checkpoint_dir)
    cfg = state.config or {}
    if state.arch_spec is not None:
        model = saved_model(cfg.get("model", {}).get("kwargs"), state.arch_spec)
    else:
        from .config import TrainConfig

        model = dense_model(TrainConfig.model_validate(cfg))
    model.load_state_dict(ckpt.model_state(checkpoint_dir), strict=True)
    return model.float().eval(), state


def _remote_candidates(run: str) -> list[str]:
    """Checkpoint directories of a run in object storage that hold a state file, oldest first
    (by global step, then epoch); whether every part is there is checked after the download."""
    if storage.exists(storage.join(run, ckpt.STATE_FILE)):
        return [run]
    found = []
    for name in storage.list_dirs(run):
        where = storage.join(run, name)
        try:
            state = ckpt.RunState.from_json(storage.read_text(storage.join(where, ckpt.STATE_FILE)))
        except (FileNotFoundError, ValueError, TypeError):
            continue  # no state file yet, or not a checkpoint
        found.append((state.global_step, state.epoch, state.finished, where))
    return [where for *_, where in sorted(found)]


@contextmanager
def latest_checkpoint(run: str | Path) -> Iterator[tuple[Path, str]]:
    """(local directory, location) of a run's latest complete checkpoint. A URI run's is
    downloaded into a temp directory that is removed on exit."""
    if not storage.is_uri(run):
        latest = find_checkpoints(run)[-1]
        yield latest, str(latest)
        return
    scratch = storage.scratch_dir("sp_ckpt_dl_")
    try:
        for where in reversed(_remote_candidates(str(run))):
            local = storage.download_dir(where, scratch / where.rstrip("/").rsplit("/", 1)[-1])
            try:
                ckpt.read_state(local)
            except (FileNotFoundError, NotADirectoryError, ValueError):
                shutil.rmtree(local, ignore_errors=True)
                continue  # an upload cut short: the one before it
            yield local, where
            return
        raise ValueError(f"no complete softprune checkpoint under {run}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compact_checkpoint(run_dir: str | Path, out: str | Path | None, mode: str = "hard"):
    """Hard-mask (mode hard) or keep soft (mode faithful) the latest checkpoint's masks and compact.
    Writes model.safetensors + arch.json + report.json to `out` (default `<run_dir>/compact-<mode>`,
    local or URI) so they appear whole; re-running overwrites. Returns (destination, report)."""
    with latest_checkpoint(run_dir) as (latest, where):
        model, spec, report = _compact(latest, where, mode)
    dest = str(out) if out else storage.join(run_dir, f"compact-{mode}")
    staging = storage.scratch_dir("sp_compact_")
    try:
        from pruning import save_compact

        save_compact(staging, model, spec, report)
        storage.publish_dir(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return (dest if storage.is_uri(dest) else Path(dest)), report


def _compact(latest: Path, where: str, mode: str) -> tuple[nn.Module, dict, dict]:
    """The compacted model, its arch spec and its report, from one local checkpoint directory."""
    from models import arch_spec
    from pruning import MaskSet, PruningConfig, apply_masks, compact, count_flops, groups_from_config
    from pruning.respec import with_kwargs

    model, state = load_model(latest)
    cfg = state.config or {}
    # a user model compacted in training is an fx.GraphModule without a meta: its saved spec
    own = arch_spec(model) if hasattr(model, "softprune_meta") else state.arch_spec
    size = cfg.get("data", {}).get("image_size") or own["input_size"]
    masks_state = state.algorithm.get("masks")
    if masks_state is not None and state.arch_spec is None:  # masked, not yet compacted in training
        groups = groups_from_config(model, PruningConfig.model_validate(state.config["pruning"]))
        masks = MaskSet.from_state(masks_state)
        masks.check(groups)
        if mode == "hard":
            apply_masks(model, groups, masks, hard=True)
        model, spec = compact(model, groups, masks, mode=mode, input_size=size)
    else:
        spec = own
    spec = with_kwargs(spec, cfg.get("model", {}).get("kwargs"))
    counts = count_flops(model, size)
    report = {"epoch": state.epoch, "compact_mode": mode, "checkpoint": where,
              "dense": state.dense_counts or {}, "pruned": {"params": int(counts.params), "macs": int(counts.macs)},
              "stages": state.stages}
    return model, spec, report
