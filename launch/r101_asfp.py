"""ResNet-101 ASFP on ImageNet (He et al.): 100 epochs, global batch 256, SGD nesterov 0.9,
lr 0.1 / 10 at 30, 60, 90, weight decay 1e-4, L2 criterion, D=1/8, P=35% of the inner convs (the
paper prunes 30% of every conv; both cut about 42% of the MACs; add `pruning.authors=true
pruning.rate=0.3` for the paper's configuration).

On a cluster:
    ray job submit --working-dir . -- python launch/r101_asfp.py \
        --data s3://bucket/in1k/train --val s3://bucket/in1k/val --storage s3://bucket/runs --workers 8
On a laptop (local Ray, synthetic shards, ResNet-101 at 32 px on 2 CPU workers, a few minutes):
    python launch/r101_asfp.py --smoke
Running the same command again with the same --name and --storage resumes the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python launch/r101_asfp.py` (also under ray job submit) puts launch/ first
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from orchestrator.config import PRECISIONS, ZERO_STAGES  # the config's own values

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="train shard source (manifest path/URL, pipe:..., brace-expanded URLs)")
    p.add_argument("--val", help="validation shard source")
    p.add_argument("--storage", help="run storage: absolute path or URI (default: ./runs)")
    p.add_argument("--name", help="run name; the same name resumes (default: r101-asfp, or the smoke name)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 8; smoke 2)")
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--zero-stage", type=int, choices=ZERO_STAGES, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default=None)
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC batches (scaling.channels_last): the layout tensor cores convolve in")
    p.add_argument("--max-failures", type=int, default=None, help="worker-group restarts Ray may do")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="local Ray, synthetic shards, small ResNet-101 on CPU")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own logging (every report, checkpoint)")
    from launch.cmd_train import add_preflight_arguments

    add_preflight_arguments(p)
    p.add_argument("overrides", nargs="*", help="extra section.field=value overrides")
    return p.parse_args(argv)


def smoke_shards(root: Path) -> tuple[str, str]:
    """Synthetic shards for the smoke run (written once; later runs only re-verify them)."""
    from data import write_synthetic

    manifest = write_synthetic(root, classes=10, train=384, val=160, size=32, seed=0, shard_size=48)
    return str(manifest), str(manifest)


def build_config(args: argparse.Namespace):
    """Recipe + flags + overrides -> validated TrainConfig (raises ValueError before Ray starts)."""
    from launch import recipes
    from orchestrator.config import load_config

    workers = args.workers or (2 if args.smoke else 8)
    if args.smoke:
        base = recipes.smoke("resnet101", size=32, classes=10)
        base["scaling"]["gpus_per_worker"] = 0
    else:
        base = recipes.resnet101_asfp(workers)
    flags = {
        "data.train": args.data, "data.val": args.val, "storage": args.storage, "name": args.name,
        "scaling.workers": workers, "scaling.gpus_per_worker": args.gpus_per_worker,
        "scaling.cpus_per_worker": args.cpus_per_worker, "scaling.zero_stage": args.zero_stage,
        "scaling.precision": args.precision, "scaling.channels_last": True if args.channels_last else None,
        "scaling.max_failures": args.max_failures, "epochs": args.epochs,
        "tracking.verbose": True if args.verbose else None,
    }
    if args.smoke and not args.data:
        train, val = smoke_shards(ROOT / ".cache" / "smoke_shards")
        flags.update({"data.train": train, "data.val": val})
    if not args.storage:
        flags["storage"] = str(ROOT / "runs")
    from orchestrator.config import parse_override

    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(dict(parse_override(o) for o in args.overrides))
    cfg = load_config(base, overrides)
    if cfg.data.train is None:
        raise ValueError("--data is required (or use --smoke)")
    return cfg


def _default_env() -> None:
    """Keep caches, wandb files and temp dirs inside the checkout unless the user chose otherwise.
    DS_ACCELERATOR is left to each worker: the driver may run on a CPU-only head node."""
    from orchestrator.env import set_defaults

    set_defaults()


def train(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cfg = build_config(args)
    from orchestrator.preflight import preflight

    preflight(cfg, allow_config_change=args.allow_config_change, verify_shards=args.verify_shards)
    from orchestrator.driver import run_training
    from orchestrator.summary import print_summary

    summary = run_training(cfg, num_cpus=None)
    print_summary(summary)
    print(f"wall time: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _default_env()
    from launch.errors import run_cli  # bad input: one clear line, no traceback, exit status 2

    return run_cli("r101_asfp", lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
