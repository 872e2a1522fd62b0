"""CPU latency of compacted vs dense models: measured speed-up against the MACs ratio.

For each policy (`pfec`, the default; `coupled`; `sfp`) and each `round_to` (kept channel counts rounded up to that
multiple by `pruning.select`), the model pruned at P is compacted and timed beside the dense model
in three runtimes: torch eager NCHW, torch eager channels_last, and onnxruntime (both models
through `pruning.export.folded_for` and `write`, loaded with `load_runner`; `--runtimes` can add
`onnx_gather`, onnxruntime on the fold that keeps each sfp scatter a channel Gather). Eval mode, no
grad, torch's default threads (or --threads). In each runtime and batch, every model runs once per round (dense
first, then all compacted ones), after one untimed warm-up round; the speed-up is the median over
rounds of dense time / compact time of the same round, so a change in the machine's load falls on
both. Each row prints measured speed-up, theoretical (dense MACs / compact MACs, counted) and
their ratio, the figure: 1.0 means the compacted model runs at its MACs; "fastest" is the same
ratio from each model's fastest round (the least disturbed by other processes).

  python benchmarks/bench_compact.py                 # resnet50 224px, batches 1 and 8
  python benchmarks/bench_compact.py --quick         # resnet18 160px, round_to 1 and 8, batch 1 and 4
  python benchmarks/bench_compact.py --policies sfp --runtimes onnx,onnx_gather   # sfp's scatter two ways
  python benchmarks/bench_compact.py --ort-graph     # no timing: the ops onnxruntime's optimiser
                                                     # leaves in each model (why a runtime lags)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model
from pruning import build_groups, compact, count_flops, score, select
from pruning.export import folded_for, load_runner, write
from pruning.fold import fold_for_export
from pruning.latency import interleaved_seconds

RUNTIMES = ("eager", "channels_last", "onnx", "onnx_gather")
DEFAULT_RUNTIMES = RUNTIMES[:3]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rate", type=float, default=0.3)
    p.add_argument("--policies", default="pfec,coupled,sfp")
    p.add_argument("--round-to", default="1,4,8,16,auto", help="multiples, or auto (the training default)")
    p.add_argument("--batches", default="1,8", help="batch 1 (latency) and a throughput batch")
    p.add_argument("--runtimes", default=",".join(DEFAULT_RUNTIMES), help=f"any of {', '.join(RUNTIMES)}")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per runtime and batch")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads and onnxruntime intra-op threads (0: each runtime's default)")
    p.add_argument("--quick", action="store_true", help="resnet18 160px, round_to 1,8, batches 1,4, 3 rounds")
    p.add_argument("--ort-graph", action="store_true",
                   help="print the op counts of each model after onnxruntime's graph optimisation; no timing")
    a = p.parse_args()
    if a.quick:
        a.model, a.size, a.round_to, a.batches, a.repeats = "resnet18", 160, "1,8", "1,4", 3
    a.policies, a.runtimes = a.policies.split(","), a.runtimes.split(",")
    a.round_to = [v if v == "auto" else int(v) for v in a.round_to.split(",")]
    a.batches = [int(v) for v in a.batches.split(",")]
    unknown = set(a.runtimes) - set(RUNTIMES)
    if unknown:
        p.error(f"--runtimes: unknown {sorted(unknown)}; choose from {', '.join(RUNTIMES)}")
    return a


def compacted(dense, a) -> dict[str, torch.nn.Module]:
    """{"dense": dense, "<policy> r<round_to>": compacted model} in eval mode."""
    models = {"dense": dense}
    for policy in a.policies:
        groups = build_groups(dense, policy)
        scores = score(groups, dict(dense.named_parameters()), "l2")
        for r in a.round_to:
            masks = select(groups, scores, a.rate, round_to=r)
            models[f"{policy} r{r}"] = compact(dense, groups, masks, "hard", input_size=a.size)[0].eval()
    return models


def _scratch() -> Path:
    """Where exported models go: the checkout's .cache, not /tmp (a fresh clone has none yet)."""
    scratch = Path(__file__).resolve().parents[1] / ".cache"
    scratch.mkdir(exist_ok=True)
    return scratch


def runner(runtime: str, model, size: int, tmp: Path, name: str, threads: int = 0) -> Callable[[torch.Tensor], object]:
    if runtime.startswith("onnx"):  # the same thread count as torch's (0: each runtime's default)
        folded = folded_for(model, "onnx") if runtime == "onnx" else fold_for_export(model)
        path = write(folded, "onnx", tmp / f"{runtime}_{name.replace(' ', '_')}.onnx", size)
        return load_runner("onnx", path, threads)
    if runtime == "channels_last":
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> object:
        with torch.inference_mode():
            if runtime == "channels_last":  # the layout change is part of what a caller pays
                x = x.contiguous(memory_format=torch.channels_last)
            return model(x)

    return run


def rounds(runs: dict[str, Callable], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per forward, one of each run per round, after one untimed round."""
    return interleaved_seconds(runs, x, 1, repeats)


def main() -> None:
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dense = create_model(a.model).eval()
    models = compacted(dense, a)
    if a.ort_graph:
        return ort_graphs(models, a.size)
    macs = {name: count_flops(m, a.size).macs for name, m in models.items()}
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{a.model} {a.size}px P={a.rate}, torch {torch.__version__} threads={torch.get_num_threads()}, "
          f"{a.repeats} rounds, load average {' '.join(load)}")
    print(f"{'model':<14}{'runtime':<15}{'batch':>5}{'dense ms':>10}{'compact ms':>11}{'measured':>9}"
          f"{'theory':>8}{'meas/theory':>12}{'fastest':>8}")
    figures: dict[tuple[str, str, int], float] = {}
    compact_ms: dict[tuple[str, str, int], float] = {}
    with tempfile.TemporaryDirectory(dir=_scratch()) as tmp:
        for runtime in a.runtimes:
            runs = {name: runner(runtime, m, a.size, Path(tmp), name, a.threads) for name, m in models.items()}
            for batch in a.batches:
                x = torch.randn(batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(batch))
                t = rounds(runs, x, a.repeats)
                base = statistics.median(t["dense"]) * 1e3
                for name in models:
                    if name == "dense":
                        continue
                    measured = statistics.median(d / c for d, c in zip(t["dense"], t[name]))
                    theory = macs["dense"] / macs[name]
                    ms = statistics.median(t[name]) * 1e3
                    # on a loaded machine the fastest forward is the one least slowed by others
                    fastest = min(t["dense"]) / min(t[name]) / theory
                    figures[name, runtime, batch], compact_ms[name, runtime, batch] = measured / theory, ms
                    print(f"{name:<14}{runtime:<15}{batch:>5}{base:>10.1f}{ms:>11.1f}{measured:>8.2f}x"
                          f"{theory:>7.2f}x{measured / theory:>12.2f}{fastest:>8.2f}", flush=True)
    summary(a, figures, compact_ms)


def ort_graphs(models: dict[str, torch.nn.Module], size: int) -> None:
    """Op counts of each exported model as onnxruntime's CPU provider runs it (its default, full
    optimisation: convs become NCHWc-blocked Conv, and any op that needs the plain layout costs a
    ReorderInput/ReorderOutput of the whole activation)."""
    import collections

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(dir=_scratch()) as tmp:
        for name, model in models.items():
            path = write(folded_for(model, "onnx"), "onnx", Path(tmp) / f"{name.replace(' ', '_')}.onnx", size)
            options = ort.SessionOptions()
            options.log_severity_level = 3  # its warning that the saved graph is machine specific
            options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            nodes = onnx.load(options.optimized_model_filepath).graph.node
            ops = collections.Counter(n.op_type for n in nodes)
            print(f"{name:<14}" + ", ".join(f"{op} {k}" for op, k in sorted(ops.items())), flush=True)


def summary(a, figures: dict, compact_ms: dict) -> None:
    """Per policy and batch: the fastest compacted (round_to, runtime), and each runtime's figure
    at round_to 1 beside its best round_to."""
    for policy in a.policies:
        for batch in a.batches:
            keys = [k for k in compact_ms if k[0].startswith(policy + " ") and k[2] == batch]
            name, runtime, _ = min(keys, key=compact_ms.get)
            parts = []
            for rt in a.runtimes:
                best = max((k for k in keys if k[1] == rt), key=figures.get)
                parts.append(f"{rt} r1 {figures[f'{policy} r1', rt, batch]:.2f}"
                             f" best {best[0].split()[1]} {figures[best]:.2f}" if (f"{policy} r1", rt, batch)
                             in figures else f"{rt} best {best[0].split()[1]} {figures[best]:.2f}")
            print(f"{policy} batch {batch}: fastest {name.split()[1]} {runtime} "
                  f"({compact_ms[name, runtime, batch]:.1f} ms); meas/theory " + ", ".join(parts))


if __name__ == "__main__":
    main()
