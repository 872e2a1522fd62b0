"""CPU inference latency of compacted vs dense ResNet-50 at P=30% under `sfp` and `coupled`.

Batch 8, 224 px, torch threads = cores, eval mode, no grad; each model's latency is the fastest of
its timed forwards (interleaved rounds after warm-up), all measured in this run. Prints measured speed-up, theoretical
speed-up (dense MACs / compacted MACs, counted) and their ratio. Target: ratio >= 0.8 for
`coupled`; `sfp` is reported as it is (the SFP paper saw about 0.75: its residual scatters and
full-width block inputs remain). The last line is the figure.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402
from pruning import build_groups, compact, count_flops, score, select  # noqa: E402

RATE, BATCH, SIZE = 0.3, 8, 224
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))


def latencies_ms(model, x) -> list[float]:
    with torch.inference_mode():
        model(x)  # warm-up: oneDNN primitive creation
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    dense = create_model("resnet50").eval()
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    dense_macs = count_flops(dense, SIZE).macs
    models = {}
    for policy in ("sfp", "coupled"):
        groups = build_groups(dense, policy)
        masks = select(groups, score(groups, dict(dense.named_parameters()), "l2"), RATE)
        models[policy] = compact(dense, groups, masks, "hard", input_size=SIZE)[0].eval()
    print(f"resnet50 batch {BATCH} {SIZE}px, torch threads={torch.get_num_threads()}, "
          f"best of 3 x {REPEATS} forwards")
    # Interleaved rounds, and the minimum: on a shared CPU other processes only ever add time,
    # so the fastest forward is the closest to each model's own cost.
    runs = {"dense": [], "sfp": [], "coupled": []}
    for _ in range(3):
        runs["dense"] += latencies_ms(dense, x)
        for policy, model in models.items():
            runs[policy] += latencies_ms(model, x)
    print("spread (median/min): " + ", ".join(
        f"{k} {statistics.median(v) / min(v):.2f}" for k, v in runs.items()))
    base = min(runs["dense"])
    print(f"dense: {base:.0f} ms, {dense_macs / 1e9:.2f} GMACs")
    figures = []
    for policy, model in models.items():
        ms = min(runs[policy])
        macs = count_flops(model, SIZE).macs
        measured, theory = base / ms, dense_macs / macs
        print(f"{policy}: {ms:.0f} ms, {macs / 1e9:.2f} GMACs, measured speed-up {measured:.2f}x, "
              f"theoretical {theory:.2f}x, measured/theoretical {measured / theory:.2f}")
        figures.append(f"{policy} {measured:.2f}x/{theory:.2f}x = {measured / theory:.2f}")
    print("measured/theoretical speed-up at P=0.3: " + ", ".join(figures) + " (target coupled >= 0.8)")


if __name__ == "__main__":
    main()
