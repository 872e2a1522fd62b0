"""`softprune train CONFIG [a.b=value ...]`: train (and prune) with Ray Train + DeepSpeed.

CONFIG is a YAML/JSON file or a recipe `module:function` (e.g. `launch.recipes:resnet56_sfp`).
Running the same command again with the same `name` and `storage` resumes the run; a changed
run-defining field (model, pruning, optimiser, schedule, data, ...) is refused unless
`--allow-config-change` is given (orchestrator/preflight.py).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML/JSON file or module:function recipe")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides (value read as YAML)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_preflight_arguments(parser)


def add_preflight_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the checks made before Ray starts (also used by launch/r101_asfp.py)."""
    parser.add_argument("--allow-config-change", action="store_true",
                        help="go on with a run whose name already holds a run started under other "
                        "run-defining values (the change is recorded in the run directory)")
    parser.add_argument("--verify-shards", action="store_true",
                        help="also compare every shard's sha256 with the manifest before starting "
                        "(reads the whole data set; sizes are always compared)")


def run(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config

    cfg = load_config(args.config, args.overrides)  # fails here, before Ray, on bad input
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=1))
        return 0
    from orchestrator.preflight import preflight

    preflight(cfg, allow_config_change=args.allow_config_change, verify_shards=args.verify_shards)
    from orchestrator.driver import run_training
    from orchestrator.summary import print_summary

    print_summary(run_training(cfg, num_cpus=args.num_cpus))
    return 0
