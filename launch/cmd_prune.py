"""`softprune prune`: one-shot hard prune of a dense model into a compacted one.

Scores the dense model's filters (its state dict from --weights, or a fresh initialisation),
selects the masks at --rate (or a PFEC --preset's per-layer rates), compacts, and writes
model.safetensors + arch.json + report.json into --out, then prints a one-line summary.
--model is a registered name or a `package.module:factory` (called with --model-kwargs, traced with
torch.fx at --input-size); a factory's arch.json carries its kwargs, so `load_compact` rebuilds it.
"""

from __future__ import annotations

import argparse

FACTORY_INPUT_SIZE = 224  # a factory's model has no input size of its own: traced and counted here by default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pruning.config import COMPACT_MODES, CRITERIA, POLICIES, SCOPES  # the config's own values

    parser.add_argument("--model", required=True, help="registered model name (e.g. resnet56), or "
                        "package.module:factory, a callable that returns the model (traced with torch.fx)")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help="keyword arguments of a factory, as a JSON object (e.g. '{\"width\": 16}')")
    parser.add_argument("--weights", help="dense state dict (.safetensors, .pt or .pth); default: fresh init")
    parser.add_argument("--num-classes", type=int, help="classifier width (default: the family's; a factory "
                        "gets it as num_classes= if it takes that keyword)")
    parser.add_argument("--policy", choices=POLICIES, default="pfec",
                        help="pfec (default): convs inside residual blocks; sfp: every conv but projections; "
                        "coupled: also the residual streams")
    parser.add_argument("--preset", help="PFEC configuration, e.g. resnet56-B (needs --policy pfec)")
    parser.add_argument("--criterion", choices=CRITERIA, default="l2")
    parser.add_argument("--rate", type=float, default=0.3, help="fraction of filters pruned, in [0, 1)")
    parser.add_argument("--scope", choices=SCOPES, default="layer")
    parser.add_argument("--min-keep", type=int, default=1)
    parser.add_argument("--round-to", type=_round_to, default="auto", help="round kept counts up to a multiple; "
                        "auto (default): 8 for groups of >= 64 channels, else 1")
    parser.add_argument("--include", action="append", default=[], help="fnmatch pattern on conv names")
    parser.add_argument("--exclude", action="append", default=[], help="fnmatch pattern on conv names")
    parser.add_argument("--mode", choices=COMPACT_MODES, default="hard",
                        help="hard: reproduce the hard-masked model; faithful: the soft-masked one")
    parser.add_argument("--input-size", type=int, help="input size recorded and counted (default: the model's; "
                        f"a factory's model is traced at it, default {FACTORY_INPUT_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of a fresh initialisation")
    parser.add_argument("--out", required=True, help="output directory")


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or auto, got {text!r}")
    return int(text)


def _model_kwargs(text: str, model: str) -> dict:
    import json

    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model-kwargs: not valid JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {type(kwargs).__name__}")
    from pruning.user_model import is_factory

    if kwargs and not is_factory(model):
        raise ValueError(f"--model-kwargs are for a model factory (package.module:factory), not {model!r}")
    return kwargs


def _dense_model(args: argparse.Namespace, kwargs: dict):
    """The registered model, or the factory's traced at --input-size (one line naming --model)."""
    from pruning.user_model import build, is_factory

    if not is_factory(args.model):
        from models import create_model

        return create_model(args.model, args.num_classes)
    try:
        return build(args.model, kwargs, args.num_classes, args.input_size or FACTORY_INPUT_SIZE)
    except ValueError as exc:
        raise ValueError(f"--model {args.model}: {exc}") from None


def _load_weights(path: str):
    from pathlib import Path

    import torch

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--weights {path}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors come in many types
        raise ValueError(f"--weights {path}: not a readable state dict ({exc})") from exc
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel prefixes


def _fit(model, state, path: str, model_name: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if keys]
        raise ValueError(f"--weights {path} do not fit {model_name}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.rate < 1.0:
        raise ValueError(f"--rate must be in [0, 1), got {args.rate}")
    import torch

    from pruning import (PruningConfig, compact, count_flops, groups_from_config, make_chooser, masked_cost,
                         save_compact)
    from pruning.presets import get_preset
    from pruning.respec import with_kwargs

    if args.preset is not None:
        preset = get_preset(args.preset)
        if args.policy != "pfec":
            raise ValueError(f"--preset {preset.name} is a PFEC configuration: use --policy pfec")
    kwargs = _model_kwargs(args.model_kwargs, args.model)
    torch.manual_seed(args.seed)
    model = _dense_model(args, kwargs).eval()
    if args.weights:
        _fit(model, _load_weights(args.weights), args.weights, args.model)
    size = args.input_size or model.softprune_meta.input_size
    cfg = PruningConfig(policy=args.policy, criterion=args.criterion, scope=args.scope, min_keep=args.min_keep,
                        round_to=args.round_to, include=args.include, exclude=args.exclude, preset=args.preset)
    groups = groups_from_config(model, cfg)
    if not len(groups):
        raise ValueError("nothing to prune: no conv matches the policy, preset and patterns")
    rate = 1.0 if args.preset else args.rate  # a preset's own rates, in full
    masks = make_chooser(groups, cfg)(dict(model.named_parameters()), rate, 0)
    small, spec = compact(model, groups, masks, args.mode, input_size=size)
    before, after = count_flops(model, size), count_flops(small, size)
    predicted = masked_cost(model, groups, masks, size, mode=args.mode)
    report = {
        "model": args.model, "model_kwargs": kwargs or None, "policy": args.policy, "preset": args.preset,
        "criterion": args.criterion,
        "rate": args.rate if args.preset is None else None, "scope": args.scope, "mode": args.mode,
        "weights": args.weights, "input_size": size, "masks_hash": masks.hash(),
        "kept_per_group": masks.kept_counts(), "dense": before.to_dict(), "compact": after.to_dict(),
        "predicted": predicted.to_dict(), **after.to_dict(),
    }
    out = save_compact(args.out, small, with_kwargs(spec, kwargs), report)
    print(f"{args.model} {args.policy} {args.criterion} "
          f"{'preset ' + args.preset if args.preset else f'P={args.rate:g}'} ({args.mode}): "
          f"params {_human(before.params)} -> {_human(after.params)} "
          f"({1 - after.params / before.params:.1%} fewer), MACs {_human(before.macs)} -> "
          f"{_human(after.macs)} ({1 - after.macs / before.macs:.1%} fewer) at {size}px -> {out}")
    return 0
