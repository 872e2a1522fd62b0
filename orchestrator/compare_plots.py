"""The plots of a comparison (orchestrator/compare.py): top-1 against MACs, the training curves,
the pruning rate per epoch and the masks' churn; one colour per run throughout. Drawn from the
comparison dict alone, so `--report-only` redraws them without any run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .plots import _pyplot


def _colours(runs: Mapping[str, Any]) -> dict[str, Any]:
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(runs) > len(cycle):  # the default cycle has 10: past that, 20 distinct ones
        cycle = [plt.get_cmap("tab20")(i) for i in range(20)]
    return {run: cycle[i % len(cycle)] for i, run in enumerate(runs)}


def _finished(comparison: Mapping[str, Any]) -> dict[str, Any]:
    return {run: s for run, s in comparison["runs"].items() if s["n"] > 0}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def top1_vs_macs_png(comparison: Mapping[str, Any], directory: str | Path) -> Path:
    """One point per run at its shipped model's MACs, error bars = sample std over seeds."""
    plt, runs = _pyplot(), _finished(comparison)
    colours = _colours(comparison["runs"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    shift, step = _dodge({run: s["macs"]["mean"] / 1e6 for run, s in runs.items()})
    for run, s in runs.items():
        x, y = s["macs"]["mean"] / 1e6 + shift[run], 100 * s["top1"]["mean"]
        xerr = s["macs"]["std"] / 1e6 if s["macs"]["std"] is not None else None
        yerr = 100 * s["top1"]["std"] if s["top1"]["std"] is not None else None
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=4, color=colours[run], label=f"{run} (n={s['n']})")
        ax.annotate(run, (x, y), fontsize=8, xytext=(6, 4), textcoords="offset points")
        _heldout_point(ax, s, x + step / 3, colours[run])
    ax.set_xlabel("MACs of the shipped model (M)")
    ax.set_ylabel("shipped top-1 (%)")
    heldout = comparison.get("heldout")
    what = f"; open squares: held-out ({heldout['samples']} images)" if heldout else ""
    ax.set_title(f"{comparison['name']}: mean ± std over seeds; dots: validation{what}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(directory) / "top1_vs_macs.png")


def _dodge(xs: Mapping[str, float]) -> tuple[dict[str, float], float]:
    """Horizontal offsets that set runs of (nearly) the same MACs side by side rather than on
    top of each other, and the offset step: 1.5% of the axis' span per run."""
    span = max(max(xs.values()) - min(xs.values()), max(xs.values()) * 0.2, 1e-9) if xs else 1.0
    step, groups = 0.015 * span, {}
    for run, x in xs.items():
        groups.setdefault(round(x / (2 * step)), []).append(run)
    shift = {run: (i - (len(g) - 1) / 2) * step for g in groups.values() for i, run in enumerate(g)}
    return shift, step


def _heldout_point(ax, summary: Mapping[str, Any], x: float, colour) -> None:
    """The run's held-out top-1 (mean ± std over seeds) beside its validation point, if scored."""
    test = summary.get("test_top1") or {}
    if test.get("mean") is None:
        return
    yerr = 100 * test["std"] if test.get("std") is not None else None
    ax.errorbar(x, 100 * test["mean"], yerr=yerr, fmt="s", mfc="none", capsize=3, color=colour)


def _mean_line(ax, curves: Mapping[str, Any], key: str, colour, label: str, scale: float = 1.0,
               steps: bool = False) -> None:
    """The mean over seeds per epoch; `steps`: a value that holds until the next epoch's."""
    points = [(e, scale * m, None if s is None else scale * s)
              for e, m, s in zip(curves["epoch"], curves[key]["mean"], curves[key]["std"]) if m is not None]
    if not points:
        return
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", color=colour, label=label,
            drawstyle="steps-post" if steps else "default")
    spread = [p for p in points if p[2] is not None]
    if spread:  # the band over seeds, where two or more reached the epoch
        ax.fill_between([p[0] for p in spread], [p[1] - p[2] for p in spread], [p[1] + p[2] for p in spread],
                        color=colour, alpha=0.15, linewidth=0, step="post" if steps else None)


def _epoch_axes(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def curves_png(comparison: Mapping[str, Any], directory: str | Path) -> Path:
    """Validation top-1 and training loss per epoch, mean over seeds (band: ± std)."""
    plt, runs = _pyplot(), _finished(comparison)
    colours = _colours(comparison["runs"])
    fig, (top, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for run, s in runs.items():
        _mean_line(top, s["curves"], "val_top1", colours[run], run, scale=100.0)
        _mean_line(loss, s["curves"], "train_loss", colours[run], run)
    top.set_ylabel("validation top-1 (%)")
    loss.set_ylabel("training loss")
    _epoch_axes(top, loss)
    return _save(fig, Path(directory) / "curves.png")


def rate_png(comparison: Mapping[str, Any], directory: str | Path) -> Path:
    """Pruning rate of the latest mask event, and the MACs the masks keep, after each epoch."""
    plt, runs = _pyplot(), _finished(comparison)
    colours = _colours(comparison["runs"])
    fig, (rate, kept) = plt.subplots(1, 2, figsize=(11, 4))
    for run, s in runs.items():
        _mean_line(rate, s["pruning"], "rate", colours[run], run, steps=True)
        _mean_line(kept, s["pruning"], "macs_kept", colours[run], run, scale=100.0, steps=True)
    rate.set_ylabel("pruning rate (latest mask event)")
    kept.set_ylabel("MACs kept by the masks (% of dense)")
    _epoch_axes(rate, kept)
    return _save(fig, Path(directory) / "rate.png")


def churn_png(comparison: Mapping[str, Any], directory: str | Path) -> Path:
    """The fraction of the mask slots the soft events flipped per epoch, for the runs that have
    soft events: where it stays near 0 the masks have settled, and freezing them there would change
    them by no more than the later flips."""
    plt = _pyplot()
    runs = {run: s for run, s in _finished(comparison).items() if s["churn_total"]["n"]}
    colours = _colours(comparison["runs"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run, s in runs.items():
        _mean_line(ax, s["pruning"], "churn", colours[run], run, scale=100.0)
    ax.set_ylabel("mask slots flipped by soft events (%)")
    ax.set_title(f"{comparison['name']}: mask churn, mean over seeds", fontsize=9)
    if runs:
        _epoch_axes(ax)
    else:  # dense and PFEC only: nothing moves softly
        ax.text(0.5, 0.5, "no run has soft mask events", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, Path(directory) / "churn.png")


def write_compare_plots(comparison: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """All four plots into `directory`; returns the files written."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return [top1_vs_macs_png(comparison, directory), curves_png(comparison, directory),
            rate_png(comparison, directory), churn_png(comparison, directory)]
