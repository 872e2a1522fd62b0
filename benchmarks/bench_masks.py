"""Mask computation for ResNet-101 on one CPU thread: softprune vs the authors' per-layer loop.

Ours: L2 scores of every masked conv, floor(N*P) ranking, keep-vectors, bit-packing (what the
coordinator does each pruning epoch). Reference, measured in the same run on the same weights:
the SFP code's way (he-y/soft-filter-pruning `get_filter_codebook`): per layer, the weight as a
numpy array, its filter norms, argsort, and a Python loop writing a per-weight codebook for every
pruned filter.
Target: ours <= 50 ms and >= 5x faster. The last line is the figure.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402
from pruning import build_groups, score, select  # noqa: E402

RATE = 0.3


def ours(groups, tensors) -> bytes:
    masks = select(groups, score(groups, tensors, "l2"), RATE)
    return masks.pack()


def authors(groups, tensors) -> dict[str, np.ndarray]:
    codebooks = {}
    for conv in groups.convs():
        w = tensors[f"{conv}.weight"].cpu().numpy()
        codebook = np.ones(w.size)
        n_pruned = int(w.shape[0] * RATE)
        norm2 = np.linalg.norm(w.reshape(w.shape[0], -1), 2, axis=1)
        filter_index = norm2.argsort()[:n_pruned]
        kernel_length = w.shape[1] * w.shape[2] * w.shape[3]
        for x in range(len(filter_index)):
            codebook[filter_index[x] * kernel_length: (filter_index[x] + 1) * kernel_length] = 0
        codebooks[conv] = codebook
    return codebooks


def timed(fn, *args, repeats: int) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet101")
    groups = build_groups(model, "sfp")
    tensors = {k: v.detach() for k, v in model.named_parameters()}
    n_filters = sum(groups.sizes())
    print(f"resnet101 sfp: {len(groups)} groups, {n_filters} filters, P={RATE}, torch threads=1")
    ours_ms = timed(ours, groups, tensors, repeats=30)
    ref_ms = timed(authors, groups, tensors, repeats=5)
    print(f"authors' per-layer numpy loop: {ref_ms:.1f} ms (median of 5)")
    print(f"softprune scores+select+pack: {ours_ms:.1f} ms (median of 30)")
    print(f"masks for resnet101: ours {ours_ms:.1f} ms vs reference {ref_ms:.1f} ms -> "
          f"{ref_ms / ours_ms:.1f}x faster (target <= 50 ms and >= 5x)")


if __name__ == "__main__":
    main()
