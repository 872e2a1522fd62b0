"""The run's deliverables: `model.safetensors` + `arch.json` + `report.json` in `<storage>/<name>/final`.

Rank 0 writes them into a local staging directory and then publishes the directory in one step
(a rename on a local filesystem, report.json uploaded last for a URI), so readers see either the
previous outputs or the new ones.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from .collectives import barrier
from .tracking import stored_run_dir


def output_uri(storage: str, name: str) -> str:
    from .storage import join

    return join(storage, name, "final")


def build_report(run, model, spec: dict, chosen: str, extra: dict | None = None) -> dict[str, Any]:
    """Everything the run should tell a reader: sizes, every stage's accuracy, per-layer channels."""
    from pruning import count_flops

    counts = count_flops(model, run.input_size)
    dense = run.state.dense_counts or {}
    dense_channels = dense.get("channels", {})
    kept = spec.get("channels", {})
    return {
        "name": run.cfg.name,
        "model": run.cfg.model.name,
        "method": run.cfg.pruning.method,
        "compact_mode": chosen,
        "input_size": run.input_size,
        "dense": {"params": dense.get("params"), "macs": dense.get("macs")},
        "pruned": {"params": int(counts.params), "macs": int(counts.macs)},
        "stages": run.state.stages,
        "per_layer": {layer: {"dense": c, "kept": kept.get(layer, c)} for layer, c in dense_channels.items()},
        "epochs": {"trained": run.state.epoch, "configured": run.cfg.epochs,
                   "finetune": run.cfg.pruning.finetune_epochs},
        "resumed_from": run.state.resumed_from,
        "world_changes": run.state.world_changes,
        "mask_history": [],
        "history": run.state.history,
        "wandb_run_id": run.state.wandb_run_id,
        "wandb_run_dir": stored_run_dir(run.cfg, str(Path(run.logger.run_dir).parent) if run.logger.run_dir else None),
        "written_at": time.time(),
        **(extra or {}),  # what the algorithm adds (its mask events)
    }


def write_outputs(run, model, spec: dict, chosen: str, extra: dict | None = None) -> str:
    """Every rank calls it (a barrier keeps them together); rank 0 builds and publishes the outputs."""
    from .model_setup import run_spec

    target = output_uri(run.cfg.storage_abspath, run.cfg.name)
    spec = run_spec(run.cfg, spec)  # a user model's spec names its factory's kwargs too
    if run.rank == 0:  # rank-dependent: one writer
        from pruning import save_compact

        from .plots import write_run_plots

        model = model.float().cpu().eval()
        report = build_report(run, model, spec, chosen, extra)
        staging = Path(tempfile.mkdtemp(prefix="sp_final_", dir=run.scratch))
        save_compact(staging, model, spec, report)
        write_run_plots(report, run.cfg.pruning, run.cfg.epochs, staging)
        _publish(staging, target)
        run.report = report
        run.logger.summary({"final/compact_mode": chosen, **{f"final/{k}": v for k, v in report["pruned"].items()}})
        drawn = staging / "kept_channels.png"  # write_run_plots drew it; staging outlives _publish
        run.logger.kept_channels_chart({k: v["dense"] for k, v in report["per_layer"].items()},
                                       {k: v["kept"] for k, v in report["per_layer"].items()},
                                       png=drawn if drawn.exists() else None)
        print(f"[softprune] outputs written to {target} (compact mode: {chosen})", flush=True)
    barrier()  # sync point: nobody leaves before the outputs exist
    return target


def _publish(staging: Path, target: str) -> None:
    from .storage import publish_dir

    publish_dir(staging, target)
