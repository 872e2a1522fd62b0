"""`softprune flops MODEL`: parameters and counted MACs of a registered model, or of the model a
`package.module:factory` returns (with `--model-kwargs`)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="registered model name, or package.module:factory")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help="keyword arguments of a factory, as a JSON object")
    parser.add_argument("--input-size", type=int, default=None,
                        help="square input side in pixels (default: the model's, 32 or 224)")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from pruning import count_flops

    model = _model(args)
    size = args.input_size or model.softprune_meta.input_size
    if size < 8:
        raise ValueError(f"--input-size must be at least 8 pixels, got {size}")
    counts = count_flops(model, size)
    if args.json:
        print(json.dumps({"model": args.model, "input_size": size, **counts.to_dict()}))
        return 0
    print(f"{args.model} @ {size}px: params {counts.params / 1e6:.3f} M, "
          f"MACs {counts.macs / 1e9:.4g} G (conv {counts.conv_macs / 1e9:.4g} G, "
          f"linear {counts.linear_macs / 1e9:.4g} G); FLOPs = 2 x MACs")
    return 0


def _model(args: argparse.Namespace):
    from launch.cmd_prune import FACTORY_INPUT_SIZE, _model_kwargs
    from pruning.user_model import build, is_factory

    kwargs = _model_kwargs(args.model_kwargs, args.model)
    if is_factory(args.model):  # traced at the counted size, so a model that cannot trace says so
        return build(args.model, kwargs, args.num_classes, args.input_size or FACTORY_INPUT_SIZE)
    from models import create_model

    return create_model(args.model, args.num_classes)
