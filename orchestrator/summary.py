"""The end-of-run summary table printed by the launch scripts and `softprune train`."""

from __future__ import annotations

from typing import Any

STAGE_ORDER = ["soft", "compacted_faithful", "hard", "recalibrated", "finetuned", "pruned_masked",
               "compacted_before_retrain", "compacted_hard", "final"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Stage accuracies, sizes before/after, and where the outputs are."""
    report = summary.get("report")
    lines = [f"run directory : {summary.get('run_dir')}", f"outputs       : {summary.get('output')}",
             f"checkpoint    : {summary.get('checkpoint')}"]
    if not report:
        return lines + ["(no report.json yet: the run stopped before finishing; re-run to resume)"]
    stages = report["stages"]
    names = [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]
    lines += ["", f"{'stage':<26}{'top1':>9}{'top5':>9}{'loss':>9}", "-" * 53]
    for name in names:
        st = stages[name]
        lines.append(f"{name:<26}{_fmt(st.get('top1')):>9}{_fmt(st.get('top5')):>9}{_fmt(st.get('loss')):>9}")
    dense, pruned = report["dense"], report["pruned"]
    lines += ["", f"{'':<12}{'dense':>16}{'shipped':>16}{'ratio':>8}", "-" * 52]
    for key in ("params", "macs"):
        d, p = dense.get(key), pruned.get(key)
        ratio = f"{p / d:.3f}" if d else "-"
        lines.append(f"{key:<12}{_fmt(d):>16}{_fmt(p):>16}{ratio:>8}")
    lines += ["", f"shipped compaction mode: {report['compact_mode']}  (model.safetensors, arch.json, report.json)",
              f"epochs trained: {report['epochs']['trained']}  resumed {len(report['resumed_from'])} time(s)",
              f"wandb run id: {report.get('wandb_run_id')}  ({report.get('wandb_run_dir') or 'not tracked'})"]
    return lines


def print_summary(summary: dict[str, Any]) -> None:
    print("\n".join(["", "=== softprune summary ===", *summary_lines(summary)]), flush=True)
