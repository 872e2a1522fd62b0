"""The pictures a finished run leaves next to report.json: kept channels per layer, the pruning
rate schedule, and accuracy at every finalize stage against the model's MACs.

Written by rank 0 into the output directory before it is published, so they travel with
`model.safetensors`, `arch.json` and `report.json` (also to object storage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    return plt


def plot_schedules(schedules: dict[str, Any], total_epochs: int, path: str | Path) -> Path:
    """Rate-vs-epoch curves (`{label: schedule function}`) as a PNG."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = list(range(total_epochs + 1))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, fn in schedules.items():
        ax.plot(epochs, [fn(e) for e in epochs], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("pruning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def kept_channels_png(rows: list[list], directory: str | Path) -> Path:
    """Bar chart of dense vs kept output channels per conv; rows are [layer, dense, kept]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.18), 3.5))
    xs = range(len(rows))
    ax.bar(xs, [r[1] for r in rows], color="#ddd", label="dense")
    ax.bar(xs, [r[2] for r in rows], color="#3a7", label="kept")
    ax.set_xticks(list(xs), [r[0] for r in rows], rotation=90, fontsize=5)
    ax.set_ylabel("channels")
    ax.legend()
    fig.tight_layout()
    path = Path(directory) / "kept_channels.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def stages_png(report: dict[str, Any], directory: str | Path) -> Path | None:
    """Top-1 of every evaluated stage, placed at the MACs of the model that stage runs: the
    masked stages compute at dense cost, the compacted ones at the pruned cost."""
    stages = {k: v for k, v in (report.get("stages") or {}).items() if isinstance(v, dict) and "top1" in v}
    dense, pruned = report["dense"].get("macs"), report["pruned"].get("macs")
    if not stages or not dense or not pruned:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, result in stages.items():
        macs = pruned if name.startswith("compacted") else dense
        ax.scatter(macs / 1e6, 100 * result["top1"], s=40)
        ax.annotate(name, (macs / 1e6, 100 * result["top1"]), fontsize=8, xytext=(5, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"MACs (M) at {report.get('input_size')} px")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{report.get('model')} {report.get('method')}: MACs x{pruned / dense:.3f}, "
                 f"shipped {report.get('compact_mode')}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(directory) / "accuracy_vs_macs.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_run_plots(report: dict[str, Any], pruning_cfg, epochs: int, directory: str | Path) -> list[Path]:
    """All of a run's plots into `directory`; returns the files written."""
    from pruning import make_schedule

    rows = [[layer, c["dense"], c["kept"]] for layer, c in report.get("per_layer", {}).items()]
    written = [kept_channels_png(rows, directory)] if rows else []
    if pruning_cfg.method != "none":
        label = f"{pruning_cfg.method} (goal {pruning_cfg.rate})"
        written.append(plot_schedules({label: make_schedule(pruning_cfg, epochs)}, epochs,
                                      Path(directory) / "schedule.png"))
    stages = stages_png(report, directory)
    return written + ([stages] if stages else [])
