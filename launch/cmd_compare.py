"""`softprune compare SPEC.yaml [a.b=value ...]`: train several configurations on the same data,
budget and seeds, one after another in one Ray session, then write a table and plots.

The spec (orchestrator/compare.py `CompareSpec`) names a base config or recipe, overrides for
every run, the seeds and each run's own overrides; see launch/compare_dev.yaml. Overrides on the
command line apply to every run, after the spec's (e.g. `data.train=... data.val=...`). Every run
is built and checked before the first one starts. Running the same command again reuses finished
runs (their report.json) and resumes unfinished ones, so an interrupted comparison picks up where
it stopped. The comparison goes to `<storage>/<name>/`: compare.json, compare.md, top1_vs_macs.png,
curves.png, rate.png, churn.png. With a held-out source (`--test`, or the spec's `test`), every shipped model
is also scored on images no run saw (orchestrator/heldout.py). Under
`ray job submit -- softprune compare SPEC.yaml` it is one Ray job.
"""

from __future__ import annotations

import argparse

from launch.cmd_train import add_preflight_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="comparison spec (YAML)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides for every run")
    parser.add_argument("--only", nargs="+", metavar="RUN", default=None,
                        help="train only these runs of the spec (the comparison still covers every "
                        "finished run)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", default=None,
                        help="train only these seeds; seeds the spec does not list are added to it for "
                        "this command (more replicates; give them again with --report-only)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--test", metavar="SOURCE", default=None,
                        help="also score every finished run's shipped model on this held-out shard source "
                        "(split 'test' unless SOURCE ends in #split; replaces the spec's `test`); scores "
                        "are kept in <storage>/<name>/heldout.json and redone only for changed runs")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rebuild the table and plots from the reports there are")
    add_preflight_arguments(parser)


def _split_only(only: list[str] | None, overrides: list[str]) -> tuple[list[str] | None, list[str]]:
    """`--only a b x.y=1` also swallows the overrides that follow it: give them back."""
    if only is None:
        return None, overrides
    return [r for r in only if "=" not in r], overrides + [r for r in only if "=" in r]


def run(args: argparse.Namespace) -> int:
    from orchestrator.compare import load_spec, markdown_table, plan_runs, run_compare

    only, overrides = _split_only(args.only, list(args.overrides))
    spec = load_spec(args.spec).with_seeds(args.seeds)
    if args.test is not None:
        spec = spec.model_copy(update={"test": args.test or None})
    plan = plan_runs(spec, overrides)  # every run's config, validated before anything starts
    comparison = run_compare(spec, plan, only=only, num_cpus=args.num_cpus, report_only=args.report_only,
                             allow_config_change=args.allow_config_change, verify_shards=args.verify_shards,
                             seeds=args.seeds)
    if comparison is not None:
        print("\n" + markdown_table(comparison), flush=True)
        print(f"comparison written to {spec.out_dir} (compare.json, compare.md, top1_vs_macs.png, "
              f"curves.png, rate.png, churn.png)", flush=True)
    return 0
