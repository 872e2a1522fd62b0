"""`softprune` command line: one module per subcommand (launch/cmd_<name>.py).

Each command module exposes `add_arguments(parser)` and `run(args) -> int`. Only the module of
the command being run is imported, and it imports its heavy dependencies inside `run`, so
`softprune --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "flops": "count parameters and MACs of a registered model",
    "shards": "write webdataset shards (ImageNet or synthetic)",
    "prune": "one-shot hard prune of a dense model into a compact one",
    "train": "train (and prune) with Ray Train + DeepSpeed from a config",
    "compact": "compact a finished run's checkpoint into a deployable model",
    "export": "export a compacted model to ONNX, TorchScript or pt2, with measured latency",
    "evaluate": "score shipped models on a shard source (a held-out split) as their runs prepare images",
    "compare": "train several configurations on the same data and seeds; table and plots",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s own arguments are loaded."""
    parser = argparse.ArgumentParser(prog="softprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"launch.cmd_{name}")
            module.add_arguments(sp)
            sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    from launch.errors import run_cli  # bad input: one clear line, no traceback

    return run_cli(f"softprune {args.command}", lambda: args._module.run(args))


if __name__ == "__main__":
    sys.exit(main())
