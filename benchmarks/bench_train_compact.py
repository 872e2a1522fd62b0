"""Training step time of the compacted model against the full-size one: what `compact_at_freeze`
buys the frozen-mask epochs.

One training step = forward, backward and an SGD step with momentum (plain torch, CPU, one process,
a fixed number of threads, train mode). Models: ResNet-50 dense; the same with frozen hard masks and
gradient hooks (what `compact_at_freeze: false` trains: it costs the dense MACs); and the hard-
compacted model at P=0.4 under `coupled`, `sfp` and `pfec` (the default), with the optimizer state
cut to fit (`pruning.reslice`), with kept counts as chosen (round_to 1) and rounded up to multiples
of 8 and 16 (`pruning.round_to`: oneDNN's fp32 kernels work in blocks of 8 or 16 channels and pad
the rest, so an odd width pays for the padding). Each model's step time is the fastest of its timed
steps, in interleaved rounds after warm-up (on a shared CPU other processes only ever add time).
Printed against the MACs ratio (dense / compacted, counted): achieved speed-up / theoretical. Target
>= 0.9 on `coupled`. This is CPU only: on a GPU small layers are launch- and bandwidth-bound, so the
ratio there is its own measurement. The last line is the figure.

Denormal floats are flushed to zero: a few training steps of a fresh ResNet-50 leave tiny values
whose slow path made single steps 5x slower at random (seen: 3.4 s rising to 19 s), which would
measure the denormals, not the shapes. One thread by default: on a CPU shared with other
processes, oneDNN's threads wait for each other at every layer whenever one is descheduled.

Environment: BENCH_MODEL (resnet50), BENCH_SIZE (224), BENCH_BATCH (8), BENCH_THREADS (1),
BENCH_REPEATS (2 steps per round), BENCH_ROUNDS (4).
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
from pruning import apply_masks, build_groups, compact, count_flops, score, select  # noqa: E402
from pruning.compact import compaction_index  # noqa: E402
from pruning.reslice import slice_moments  # noqa: E402

RATE = 0.4
MODEL = os.environ.get("BENCH_MODEL", "resnet50")
SIZE = int(os.environ.get("BENCH_SIZE", "224"))
BATCH = int(os.environ.get("BENCH_BATCH", "8"))
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "4"))


class Trainee:
    """A model, its optimizer and a fixed batch: `step()` is one timed training step."""

    def __init__(self, model, x, y, hooks=None):
        self.model, self.x, self.y = model.train(), x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        self.hooks = hooks

    def step(self) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()
        return (time.perf_counter() - start) * 1e3

    def moments(self) -> dict:
        return {n: dict(self.opt.state[p]) for n, p in self.model.named_parameters() if p in self.opt.state}


# pfec (inner convs only) is the default policy: the residual streams keep their width
VARIANTS = (("coupled", 1), ("coupled", 8), ("coupled", 16), ("sfp", 1), ("sfp", 8), ("pfec", 1), ("pfec", 8))


def compacted(dense: Trainee, policy: str, round_to: int, x, y) -> tuple[Trainee, int]:
    """The hard-compacted trainee at RATE under `policy`, its momentum cut from `dense`'s."""
    groups = build_groups(dense.model, policy)
    masks = select(groups, score(groups, dict(dense.model.named_parameters()), "l2"), RATE, round_to=round_to)
    model, _ = compact(dense.model, groups, masks, "hard", input_size=SIZE)
    small = Trainee(model, x, y)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    cut = slice_moments(dense.moments(), compaction_index(dense.model, groups, masks, "hard"), shapes)
    for name, p in model.named_parameters():
        small.opt.state[p] = cut[name]
    return small, count_flops(model.eval(), SIZE).macs


def masked(dense_model, x, y) -> Trainee:
    """Full size with frozen hard masks (`compact_at_freeze: false`): gradient hooks on the pruned rows."""
    import copy

    from orchestrator.coordinator import GradientFreezer

    model = copy.deepcopy(dense_model)
    groups = build_groups(model, "coupled")
    masks = select(groups, score(groups, dict(model.named_parameters()), "l2"), RATE)
    apply_masks(model, groups, masks, hard=True)
    return Trainee(model, x, y, hooks=GradientFreezer(model, groups, masks))


def main() -> None:
    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model, x = create_model(MODEL), torch.randn(BATCH, 3, SIZE, SIZE)
    with torch.no_grad():
        classes = model.eval()(x[:1]).shape[1]
    y = torch.randint(0, classes, (BATCH,))
    dense = Trainee(model, x, y)
    dense.step()  # momentum buffers exist: compaction cuts them
    dense_macs = count_flops(dense.model.eval(), SIZE).macs
    dense.model.train()
    trainees = {"dense": dense, "masked (coupled)": masked(dense.model, x, y)}
    macs = {"dense": dense_macs, "masked (coupled)": dense_macs}
    for policy, round_to in VARIANTS:
        name = f"compact {policy} r{round_to}"
        trainees[name], macs[name] = compacted(dense, policy, round_to, x, y)
    for t in trainees.values():
        t.step()  # warm-up: oneDNN primitives, the other moments
    runs: dict[str, list[float]] = {k: [] for k in trainees}
    names = list(trainees)
    for r in range(ROUNDS):  # each round starts with another model: no model always follows the same one
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name] += [trainees[name].step() for _ in range(REPEATS)]
    print(f"{MODEL} training step (forward + backward + SGD step), batch {BATCH}, {SIZE}px, P={RATE}, CPU, "
          f"torch threads={torch.get_num_threads()}, fastest of {ROUNDS} x {REPEATS} steps")
    base = min(runs["dense"])
    print(f"{'model':20s} {'GMACs':>7s} {'step ms':>8s} {'median/min':>10s} {'speed-up':>9s} {'MACs ratio':>10s} "
          f"{'achieved/theory':>15s}")
    figures = []
    for name, times in runs.items():
        ms, theory = min(times), dense_macs / macs[name]
        achieved = base / ms
        print(f"{name:20s} {macs[name] / 1e9:7.2f} {ms:8.0f} {statistics.median(times) / ms:10.2f} "
              f"{achieved:8.2f}x {theory:9.2f}x {achieved / theory:15.2f}")
        if name.startswith("compact"):
            figures.append(f"{' '.join(name.split()[1:])} {achieved:.2f}x/{theory:.2f}x = {achieved / theory:.2f}")
    print(f"training step speed-up achieved/theoretical at P={RATE}: " + ", ".join(figures)
          + " (target coupled >= 0.9)")


if __name__ == "__main__":
    main()
