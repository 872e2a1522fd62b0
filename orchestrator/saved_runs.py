"""Work on a run's checkpoints without Ray or DeepSpeed: find the latest one, load its model,
compact it. Used by `softprune compact` and by the tests that inspect what a run saved."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt

MODEL_STATES = Path(ckpt.DS_DIR) / ckpt.DS_TAG / "mp_rank_00_model_states.pt"


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
    """The checkpoint's model (rebuilt at its saved shape) with its weights, and its state."""
    from models import build_from_spec, create_model

    state = ckpt.read_state(checkpoint_dir)
    cfg = state.config or {}
    if state.arch_spec is not None:
        model = build_from_spec(state.arch_spec)
    else:
        from .model_setup import num_classes
        from .config import TrainConfig

        model = create_model(cfg["model"]["name"], num_classes(TrainConfig.model_validate(cfg)))
    blob = torch.load(Path(checkpoint_dir) / MODEL_STATES, map_location="cpu", weights_only=False)
    model.load_state_dict(blob["module"], strict=True)
    return model.float().eval(), state


def compact_checkpoint(run_dir: str | Path, out: str | Path | None, mode: str = "hard"):
    """Hard-mask (mode hard) or keep soft (mode faithful) the latest checkpoint's masks and compact.
    Writes model.safetensors + arch.json + report.json atomically; re-running overwrites."""
    from models import arch_spec
    from pruning import MaskSet, PruningConfig, apply_masks, compact, count_flops, groups_from_config, save_compact

    latest = find_checkpoints(run_dir)[-1]
    model, state = load_model(latest)
    size = (state.config or {}).get("data", {}).get("image_size") or model.softprune_meta.input_size
    masks_state = state.algorithm.get("masks")
    if masks_state is not None and state.arch_spec is None:  # masked, not yet compacted in training
        groups = groups_from_config(model, PruningConfig.model_validate(state.config["pruning"]))
        masks = MaskSet.from_state(masks_state)
        masks.check(groups)
        if mode == "hard":
            apply_masks(model, groups, masks, hard=True)
        model, spec = compact(model, groups, masks, mode=mode, input_size=size)
    else:
        spec = arch_spec(model)
    counts = count_flops(model, size)
    report = {"epoch": state.epoch, "compact_mode": mode, "checkpoint": str(latest),
              "dense": state.dense_counts or {}, "pruned": {"params": int(counts.params), "macs": int(counts.macs)},
              "stages": state.stages}
    dest = Path(out) if out else Path(run_dir) / f"compact-{mode}"
    staging = Path(tempfile.mkdtemp(prefix=".compact-", dir=dest.parent if dest.parent.exists() else None))
    save_compact(staging, model, spec, report)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)  # atomic on one filesystem: outputs appear whole
    return dest, report
