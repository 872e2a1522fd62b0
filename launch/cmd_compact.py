"""`softprune compact RUN_DIR [--mode hard|faithful] [--out DIR]`: a deployable model from a
run's latest checkpoint (its masks applied hard, then compacted), without Ray or DeepSpeed.

RUN_DIR and --out may be local paths or object-storage URIs (`s3://bucket/prefix/run`; AWS
settings from the environment): the checkpoint is downloaded, the outputs uploaded."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pruning.config import COMPACT_MODES

    parser.add_argument("run_dir", help="<storage>/<name> of a run (a path or a URI such as s3://bucket/runs/name), "
                        "or one checkpoint directory in it")
    parser.add_argument("--mode", choices=COMPACT_MODES, default="hard")
    parser.add_argument("--out", default=None, help="output directory or URI (default: RUN_DIR/compact-<mode>)")


def run(args: argparse.Namespace) -> int:
    from orchestrator.saved_runs import compact_checkpoint

    out, report = compact_checkpoint(args.run_dir, args.out, args.mode)
    print(f"compacted ({args.mode}) from epoch {report['epoch']}: params {report['pruned']['params']:,} "
          f"(dense {report['dense']['params']:,}), MACs {report['pruned']['macs']:,} "
          f"(dense {report['dense']['macs']:,}) -> {out}")
    return 0
