"""Measured CPU latency of a dense model against its compacted version, beside the MACs ratio.

Each number is the median of `repeats` timed forward passes after `warmup` untimed ones, on one
random batch, with the runtime's default thread count; dense and compact alternate. A shared or loaded machine makes the
absolute numbers noisy; the speed-up is measured on the same machine in the same minutes.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor


def interleaved_seconds(runs: Mapping[str, Callable[[Tensor], object]], x: Tensor, warmup: int,
                        repeats: int) -> dict[str, list[float]]:
    """Seconds of each of `runs` on `x`, `repeats` times after `warmup` untimed rounds. The runs
    are interleaved (one of each per round), so that a change in the machine's load falls on all
    of them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run(x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return times


def medians_ms(runs: Mapping[str, Callable[[Tensor], object]], x: Tensor, warmup: int,
               repeats: int) -> dict[str, float]:
    """Median milliseconds of each of `runs` on `x` (`interleaved_seconds`)."""
    return {name: statistics.median(t) * 1e3 for name, t in interleaved_seconds(runs, x, warmup, repeats).items()}


def compare(runners: Mapping[str, Mapping[str, Callable[[Tensor], object]]], input_size: tuple[int, int],
            batches: list[int], warmup: int, repeats: int) -> dict:
    """`runners[runtime][variant]` for variant in ("dense", "compact") -> per runtime and batch:
    {"dense_ms", "compact_ms", "speedup", "compact_img_per_s"}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for runtime, variants in runners.items():
        out[runtime] = {}
        for batch in batches:
            x = torch.randn(batch, 3, *input_size, generator=torch.Generator().manual_seed(batch))
            ms = medians_ms({v: variants[v] for v in ("dense", "compact")}, x, warmup, repeats)
            row = {"dense_ms": ms["dense"], "compact_ms": ms["compact"], "speedup": ms["dense"] / ms["compact"],
                   "compact_img_per_s": batch * 1e3 / ms["compact"]}
            out[runtime][str(batch)] = row
    return out


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}


def table(report: dict) -> str:
    """The latency report as lines of text."""
    macs = report["macs"]
    h, w = report["input_size"]
    lines = [f"{report['model']} @ {h}x{w}px, MACs dense {macs['dense']:,} / compact "
             f"{macs['compact']:,} = {macs['ratio']:.2f}x (theoretical)",
             f"{'runtime':<28}{'batch':>6}{'dense ms':>11}{'compact ms':>12}{'speed-up':>10}{'img/s':>9}"]
    for runtime, rows in report["latency"].items():
        for batch, r in rows.items():
            lines.append(f"{runtime:<28}{batch:>6}{r['dense_ms']:>11.2f}{r['compact_ms']:>12.2f}"
                         f"{r['speedup']:>9.2f}x{r['compact_img_per_s']:>9.0f}")
    return "\n".join(lines)
