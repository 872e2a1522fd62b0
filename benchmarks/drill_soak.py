"""Soak drill: a real 2-rank training job on a local Ray, through the normal launch path
(`orchestrator.driver.run_training`), with loader worker processes on every rank and a train
pass plus a val pass every epoch: many passes, to show that the loaders neither hang nor slow
down (a per-pass fork from the threaded Ray Train worker once hung a run, 1 run in 7).

ResNet-20 at 16 px on a very small synthetic shard set, `data.num_workers` loader processes per
rank and loader, SFP pruning (so the finalize step also plays a partial pass: BN recalibration).
Every file goes under the checkout's ignored .cache/drill_soak (shards, run storage) and .cache/
(Ray, wandb offline, temp dirs). Not part of the test suite.

    python benchmarks/drill_soak.py [--epochs 80] [--loader-workers 2] [--timeout 3600]

Prints the passes done, the total time and the seconds per pass, then the train passes' own
times; exits 1 if the run did not finish every epoch or its last passes took over 3x its first
ones (2 if it ran past --timeout, 3 on a bad argument).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".cache"
WORK = CACHE / "drill_soak"


def cache_env() -> None:
    """Caches, temp dirs and wandb's files inside the checkout's .cache; wandb offline."""
    from orchestrator.env import set_defaults

    set_defaults({"WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=80, help="epochs (each a train pass and a val pass)")
    p.add_argument("--loader-workers", type=int, default=2, help="data.num_workers (per rank and loader)")
    p.add_argument("--ranks", type=int, default=2, help="Ray Train workers")
    p.add_argument("--train", type=int, default=64, help="synthetic train images")
    p.add_argument("--val", type=int, default=32, help="synthetic val images")
    p.add_argument("--batch", type=int, default=8, help="data.batch_size per rank")
    p.add_argument("--pruning", default="sfp", choices=["none", "sfp", "asfp"])
    p.add_argument("--timeout", type=float, default=3600.0, help="give up (exit 2) after this many seconds")
    args = p.parse_args(argv)
    for name in ("epochs", "loader_workers", "ranks", "train", "val", "batch"):
        if getattr(args, name) < (0 if name == "loader_workers" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def build_config(args: argparse.Namespace, shards: str):
    from orchestrator.config import load_config

    tree = {
        "name": "soak", "storage": str(WORK / "runs"), "epochs": args.epochs, "seed": 0,
        "model": {"name": "resnet20", "num_classes": 4},
        "data": {"train": shards, "val": shards, "batch_size": args.batch, "image_size": 16,
                 "transform": "cifar", "num_workers": args.loader_workers, "shuffle_buffer": 16},
        "optim": {"lr": 0.05}, "lr": {"schedule": "cosine"},
        "checkpoint": {"keep": 1},
        "scaling": {"workers": args.ranks, "cpus_per_worker": 1},
        "tracking": {"mode": "offline", "log_every": 1000, "print_every_s": 3600},
        "watchdog": {"timeout_s": 300.0},  # a stuck pass fails the run instead of hanging it
    }
    if args.pruning != "none":
        tree["pruning"] = {"method": args.pruning, "rate": 0.3, "finetune_epochs": 1, "recalibrate_batches": 2}
    return load_config(tree)


def give_up_after(seconds: float) -> None:
    """Last resort against a hang: report and end the process (Ray's own processes follow their
    driver out)."""
    def fire():
        print(f"drill_soak: FAILED, still running after {seconds:.0f} s (a hang?)", flush=True)
        os._exit(2)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def main(argv=None) -> int:
    args = parse_args(argv)
    cache_env()
    from data import write_synthetic

    shards = str(write_synthetic(WORK / "shards", classes=4, train=args.train, val=args.val, size=16,
                                 seed=0, shard_size=16))
    try:
        cfg = build_config(args, shards)
    except ValueError as exc:
        print(f"drill_soak: error: {exc}", file=sys.stderr)
        return 3
    shutil.rmtree(WORK / "runs" / cfg.name, ignore_errors=True)  # a fresh run, never a resume
    from orchestrator.algorithms import total_epochs
    from orchestrator.driver import run_training

    give_up_after(args.timeout)
    start = time.perf_counter()
    summary = run_training(cfg, num_cpus=args.ranks)
    wall = time.perf_counter() - start
    report = summary.get("report") or {}
    epochs = len(report.get("history", []))
    passes = 2 * epochs  # one train and one val pass per epoch (finalize plays a few more)
    print(f"drill_soak: {args.ranks} ranks x {args.loader_workers} loader workers per loader, "
          f"{epochs}/{total_epochs(cfg)} epochs, {passes} train+val passes per rank in {wall:.1f} s "
          f"({wall / max(passes, 1):.2f} s per pass, Ray start and finalize included)", flush=True)
    if epochs != total_epochs(cfg):
        print(f"drill_soak: FAILED, the run did not finish (report: {'yes' if report else 'none'}, "
              f"checkpoint {summary.get('checkpoint')})", flush=True)
        return 1
    return 0 if passes_steady([e["epoch_seconds"] for e in report["history"]]) else 1


def passes_steady(seconds: list[float], window: int = 10, factor: float = 3.0) -> bool:
    """Print the train passes' own times (the wall time above is mostly Ray: its start, and its
    intake of one checkpoint report per worker every 2 s, docs/design.md); False when the last
    `window` passes take over `factor` times the first ones (after the first: the loader
    workers' start-up), a loader that slows down over the run."""
    rest = seconds[1:]
    if len(rest) < 2:
        return True
    head, tail = rest[:window], rest[-window:]
    early, late = statistics.median(head), statistics.median(tail)
    print(f"drill_soak: train passes took {sum(seconds):.1f} s: the first {seconds[0]:.2f} s (loader start-up), "
          f"then median {early:.3f} s over the first {len(head)} and {late:.3f} s over the last {len(tail)}, "
          f"slowest {max(rest):.3f} s", flush=True)
    if late > factor * early:
        print(f"drill_soak: FAILED, the passes slowed down {late / early:.1f}x over the run", flush=True)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
