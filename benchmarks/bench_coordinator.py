"""The pruning coordinator's event, old (gather full fp32 tensors) against new (per-filter partial
norms, one all-reduce, local row edits), in one run: ResNet-101, ZeRO-2, 2 gloo ranks, the
setting of benchmarks/bench_overhead.py's coordinator part.

Per path: the median event time (events alternate old/new, so drifting machine load hits both
alike), as a fraction of one training step of the same engine, and the collectives the event
issues on rank 0 (every torch.distributed call, DeepSpeed's included, counted with the bytes this
rank hands to it), from one extra counted event per path.

    python benchmarks/bench_coordinator.py [--events 3 --size 64 --batch 8 --threads 1]

The last line printed is the new/old time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce", "gather", "scatter", "all_to_all_single", "all_reduce_coalesced")


class WireCounter:
    """Counts torch.distributed collectives and the bytes this rank contributes to each (an
    all-gather's output list is not counted: it is what the other ranks send)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.real = dist, {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()

    def __enter__(self):
        import torch

        def wrap(name, real):
            def counted(*args, **kwargs):
                values = list(args) + list(kwargs.values())
                tensors = [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v])
                           if isinstance(t, torch.Tensor)]
                if name == "all_gather":  # (output list, input): this rank sends its input
                    tensors = [v for v in values if isinstance(v, torch.Tensor)]
                elif name == "all_gather_into_tensor":  # (output, input)
                    tensors = tensors[1:]
                elif name != "all_reduce_coalesced":  # one payload tensor
                    tensors = tensors[:1]
                size = sum(t.numel() * t.element_size() for t in tensors)
                self.calls[name] += 1
                self.bytes[name] += size
                return real(*args, **kwargs)
            return counted

        for name, real in self.real.items():
            setattr(self.dist, name, wrap(name, real))
        return self

    def __exit__(self, *exc):
        for name, real in self.real.items():
            setattr(self.dist, name, real)

    def summary(self) -> dict:
        return {"collectives": sum(self.calls.values()), "bytes": sum(self.bytes.values()),
                "by_kind": {n: [self.calls[n], self.bytes[n]] for n in sorted(self.calls)}}


def _worker(rank: int, port: int, args, out: str) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(args.threads)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from benchmarks.bench_overhead import _batches, _time_steps
    from models import create_model
    from orchestrator.config import load_config
    from orchestrator.coordinator import Coordinator
    from orchestrator.engine import build_engine, init_distributed
    from pruning import build_groups, score, select

    init_distributed()
    cfg = load_config({"data": {"train": "unused", "batch_size": args.batch},
                       "model": {"name": "resnet101", "num_classes": 10},
                       "optim": {"lr": 0.01}, "scaling": {"workers": 2, "zero_stage": 2}})
    torch.manual_seed(0)
    engine = build_engine(create_model("resnet101", 10), cfg, 2)

    def step(x, y):
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))  # sync point
        engine.step()

    step_s = 1.0 / _time_steps(step, _batches(args.size, args.batch, 10, rank, n=2), args.steps, 1)
    groups = build_groups(engine.module, policy="sfp")
    coords = {"old": Coordinator(engine.module, groups, engine, gather=True),
              "new": Coordinator(engine.module, groups, engine, criterion="l2")}
    choose = lambda t: select(groups, score(groups, t, "l2"), 0.3)  # rank 0 only
    times: dict[str, list[float]] = {"old": [], "new": []}
    wire, hashes = {}, {}
    for path, coord in coords.items():  # one counted event each (also the warm-up)
        with WireCounter() as counter:
            masks, _ = coord.event(choose, hard=False, zero_moments=True)
        wire[path], hashes[path] = counter.summary(), masks.hash()
    for _ in range(args.events):
        for path, coord in coords.items():
            times[path].append(coord.event(choose, hard=False, zero_moments=True)[1]["seconds"])
    if rank == 0:
        median = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
        Path(out).write_text(json.dumps({"step_s": step_s, "event_s": median, "times": times, "wire": wire,
                                         "same_masks": hashes["old"] == hashes["new"],
                                         "filters": sum(engine.module.get_parameter(f"{c}.weight").shape[0]
                                                        for c in groups.convs()),
                                         "conv_params": sum(engine.module.get_parameter(f"{c}.weight").numel()
                                                            for c in groups.convs())}))
    torch.distributed.barrier()
    os._exit(0)  # DeepSpeed/gloo threads may abort at interpreter teardown


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=3, help="timed events per path")
    p.add_argument("--size", type=int, default=64, help="input side for the step time")
    p.add_argument("--batch", type=int, default=8, help="batch per rank for the step time")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()
    import torch.multiprocessing as mp

    from orchestrator.driver import free_port
    from orchestrator.env import set_defaults

    set_defaults({"DS_ACCELERATOR": "cpu"})  # temp dirs and JIT builds under the checkout's .cache
    port = free_port()
    out = Path(tempfile.mkdtemp(prefix="bench_coord_")) / "result.json"
    start = time.perf_counter()
    mp.spawn(_worker, args=(port, args, str(out)), nprocs=2, join=True)
    r = json.loads(out.read_text())
    print(f"ResNet-101, ZeRO-2, 2 gloo ranks x {args.threads} thread(s); training step "
          f"{r['step_s'] * 1e3:.0f} ms at {args.size}px, batch {args.batch}/rank; {r['filters']} filters, "
          f"{r['conv_params'] / 1e6:.1f} M conv weights; same masks both paths: {r['same_masks']}; "
          f"run took {time.perf_counter() - start:.0f} s")
    for path in ("old", "new"):
        w = r["wire"][path]
        kinds = ", ".join(f"{n} {c}x {b / 1e6:.3f} MB" for n, (c, b) in w["by_kind"].items())
        print(f"{path}: {r['event_s'][path] * 1e3:8.1f} ms per event = {r['event_s'][path] / r['step_s']:.3f} x "
              f"one step (events: {', '.join(f'{t * 1e3:.0f}' for t in r['times'][path])} ms); "
              f"{w['collectives']} collectives, {w['bytes'] / 1e6:.3f} MB from rank 0 ({kinds})")
    print(f"bytes ratio (new/old): {r['wire']['new']['bytes'] / r['wire']['old']['bytes']:.5f}")
    print(f"time ratio (new/old): {r['event_s']['new'] / r['event_s']['old']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
