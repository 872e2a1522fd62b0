"""What softprune's own training loop costs per step, in one run: the real loop
(`orchestrator.trainer.train_epoch`: LR schedule, the algorithm's loss and `on_step_end`, faults,
watchdog beat, logging, checkpoint policy) against a bare loop over the same loader and engine
(to_input, forward, cross-entropy, backward, step, nothing else).

One process, a gloo group of one, a real DeepSpeed engine (ZeRO-0) and real synthetic shards
read in-process (no loader workers, so both loops decode the same images on the same core).
Epochs alternate bare/ours for --rounds rounds; each round's figure is ours/bare time per step,
so a drift in the machine's load falls on both. This is the "our per-step Python" part of the
loop-against-DDP gap that benchmarks/bench_overhead.py (which calls the engine directly) leaves
out.

    python benchmarks/bench_loop.py [--rounds 5 --method sfp --images 1280 --size 32 --batch 32]

The last line printed is the median ratio (bare steps/s over ours: 1.0 means the loop costs nothing).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(a, shards: str, storage: str):
    from orchestrator.config import load_config

    method = {"none": {}, "sfp": {"pruning.method": "sfp", "pruning.rate": 0.3},
              "sfp_steps": {"pruning.method": "sfp", "pruning.rate": 0.3, "pruning.every_steps": 10**6}}[a.method]
    return load_config({"name": "bench-loop", "storage": storage, "epochs": 10**6, "seed": 0,
                        "model": {"name": a.model, "num_classes": 10},
                        "data": {"train": shards, "val": shards, "batch_size": a.batch, "image_size": a.size,
                                 "transform": "cifar", "num_workers": 0, "shuffle_buffer": a.batch},
                        "scaling": {"workers": 1}, "tracking": {"wandb": False}, "watchdog": {"timeout_s": 0},
                        "checkpoint": {"every_minutes": None}}, method)


def bare_epoch(run) -> tuple[float, int]:
    """The same loader and engine with nothing of ours around the step: (seconds, steps)."""
    import torch

    from orchestrator.evaluation import to_input

    loader, engine, cfg = run.train_loader, run.engine, run.cfg
    loader.set_epoch(run.state.epoch)
    steps = 0
    start = time.perf_counter()
    for images, labels in loader:
        logits = engine(to_input(images, cfg.data.mean, cfg.data.std, engine.module, cfg.scaling.channels_last))
        engine.backward(torch.nn.functional.cross_entropy(logits, labels))
        engine.step()
        steps += 1
    return time.perf_counter() - start, steps


def ours_epoch(run, algo, progress, profile: cProfile.Profile | None = None) -> tuple[float, int]:
    from orchestrator.trainer import train_epoch

    before = run.state.step
    if profile is not None:
        profile.enable()
    metrics = train_epoch(run, algo, progress)
    if profile is not None:
        profile.disable()
    return metrics["epoch_seconds"], run.state.step - before


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="epochs of each loop, alternating")
    p.add_argument("--method", default="sfp", choices=("none", "sfp", "sfp_steps"),
                   help="the algorithm whose per-step hook runs (sfp_steps: step-counted events, none due)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--images", type=int, default=1280, help="training images (steps = images / batch)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="cProfile our loop's last epoch; print our functions")
    a = p.parse_args()

    import torch

    from data import write_synthetic
    from orchestrator import trainer
    from orchestrator.algorithms import make_algorithm
    from orchestrator.driver import free_port
    from orchestrator.env import set_defaults
    from orchestrator.progress import Progress
    from orchestrator.worker import Run

    set_defaults({"DS_ACCELERATOR": "cpu"})  # temp dirs and JIT builds under the checkout's .cache
    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    work = Path(tempfile.mkdtemp(prefix="bench_loop_", dir=ROOT / ".cache"))
    shards = str(write_synthetic(work / "shards", classes=10, train=a.images, val=a.batch, size=a.size, seed=0,
                                 shard_size=256))
    cfg = _config(a, shards, str(work / "storage"))
    trainer.setup_worker(cfg)
    torch.set_num_threads(a.threads)
    run = Run(cfg)
    algo = run.algorithm = make_algorithm(cfg)
    run.policy = trainer.CheckpointPolicy(cfg.checkpoint, run.rank, lambda: False)
    algo.load_state_dict({})
    trainer.event(algo.on_train_start, run)
    progress = Progress(cfg.epochs, 0, False)
    bare_epoch(run)  # warm-up: first-touch allocations, DeepSpeed's first step
    ratios, per_step = [], {"bare": [], "ours": []}
    for r in range(a.rounds):
        for name in ("bare", "ours") if r % 2 == 0 else ("ours", "bare"):
            seconds, steps = bare_epoch(run) if name == "bare" else ours_epoch(run, algo, progress)
            per_step[name].append(seconds / steps)
            run.state.epoch += 1
        ratios.append(per_step["bare"][-1] / per_step["ours"][-1])
    profile = cProfile.Profile() if a.profile else None
    profiled_steps = 0
    if profile is not None:  # an extra, untimed epoch: the profiler's own cost stays out of the ratio
        profiled_steps = ours_epoch(run, algo, progress, profile)[1]
    run.close()
    bare, ours = (statistics.median(per_step[k]) * 1e3 for k in ("bare", "ours"))
    print(f"{a.model} @ {a.size}px, batch {a.batch}, {a.images // a.batch} steps per epoch, 1 rank x {a.threads} "
          f"thread(s), ZeRO-0, method {a.method}, {a.rounds} rounds, load average "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"bare loop: {bare:.2f} ms per step (median; rounds {', '.join(f'{t * 1e3:.1f}' for t in per_step['bare'])})")
    print(f"our loop:  {ours:.2f} ms per step (median; rounds {', '.join(f'{t * 1e3:.1f}' for t in per_step['ours'])})")
    if profile is not None:
        _print_ours(profile, ROOT, profiled_steps, ours)
    print(f"steps/s ratio (ours / bare, median over rounds [min-max]): {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}-{max(ratios):.3f}]")
    return 0


def _print_ours(profile: cProfile.Profile, root: Path, steps: int, step_ms: float) -> None:
    """Own time (callees excluded) of our packages' functions in the profiled epoch, per step: the
    loop's (orchestrator/, pruning/) and the loader's (data/, which the bare loop runs too)."""
    stats = pstats.Stats(profile, stream=io.StringIO()).stats
    for label, dirs in (("the loop (orchestrator/, pruning/)", ("orchestrator", "pruning")), ("the loader (data/)", ("data",))):
        mine = {k: v for k, v in stats.items() if any(str(root / d) + os.sep in k[0] for d in dirs)}
        own = sum(v[2] for v in mine.values()) / steps * 1e3
        print(f"own time of {label}: {own:.3f} ms per step = {own / step_ms:.4f} of a step; the largest:")
        for (path, line, func), v in sorted(mine.items(), key=lambda kv: -kv[1][2])[:5]:
            print(f"  {Path(path).relative_to(root)}:{line} {func}: {v[2] / steps * 1e3:.3f} ms own per step, "
                  f"{v[1]} calls")


if __name__ == "__main__":
    sys.exit(main())
