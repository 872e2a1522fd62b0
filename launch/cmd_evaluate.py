"""`softprune evaluate RUN_OR_DIR ... --data SOURCE`: top-1/top-5 of shipped models on a shard
source, in this process (on the GPU if there is one), with each run's own image preparation.

RUN_OR_DIR is a run directory <storage>/<name> (its final/ is scored) or a compacted-model
directory. Images are prepared as the run prepared its validation images (size, crop,
normalisation: the `data` section of the run's config.yaml, or of --config). SOURCE is a
manifest, shard URLs or a URI as for `softprune train`; its split is "test" unless SOURCE ends in
`#split` (`.../manifest.json#val` scores the validation split). The run's files are not changed;
--json FILE writes every figure."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data import DataConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_or_dir", nargs="+", help="run directories or compacted-model directories")
    parser.add_argument("--data", required=True, metavar="SOURCE",
                        help="shard source to score on (split 'test' unless SOURCE ends in #split)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a config (YAML) whose `data` section says how images are prepared "
                        "(default: the run's own config.yaml)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the figures of every model here")


def preparation(model_dir: Path, config: str | None) -> tuple[DataConfig, bool]:
    """How the run prepared its images: its `DataConfig`, and whether it fed them NHWC
    (`scaling.channels_last`: the val figures then match the run's to the last digit). From
    --config, else the run's config.yaml."""
    import yaml

    from data import DataConfig

    path = Path(config) if config else model_dir.parent / "config.yaml"
    if not path.is_file():
        where = f"--config {config}" if config else f"{model_dir}: no config.yaml in its run directory"
        raise ValueError(f"{where}: not found; give --config FILE (a config whose data section says "
                         f"how images are prepared)")
    tree = yaml.safe_load(path.read_text())
    if not isinstance(tree, dict) or not isinstance(tree.get("data"), dict):
        raise ValueError(f"{path}: no `data` section")
    scaling = tree.get("scaling") if isinstance(tree.get("scaling"), dict) else {}
    return DataConfig.model_validate(tree["data"]), bool(scaling.get("channels_last", False))


def run(args: argparse.Namespace) -> int:
    import json

    from launch.cmd_export import compacted_dir
    from orchestrator.heldout import check_heldout, score_model

    dirs = [compacted_dir(p) for p in args.run_or_dir]
    configs = [preparation(d, args.config) for d in dirs]  # every input checked before any scoring
    check_heldout(args.data)
    results = {}
    for model_dir, (data, channels_last) in zip(dirs, configs):
        figures = score_model(str(model_dir), data, args.data, channels_last=channels_last)
        results[str(model_dir)] = figures
        print(f"{model_dir}: top-1 {100 * figures['top1']:.2f}%  top-5 {100 * figures['top5']:.2f}%  "
              f"loss {figures['loss']:.4f}  on {figures['samples']} images of {args.data} "
              f"(split {figures['split']})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0
