"""`softprune export RUN_OR_DIR --format onnx|torchscript|pt2 [--out FILE] [--batch N]`: a compacted
model as one file that loads without this project (onnxruntime alone, `torch.jit.load` alone,
`torch.export.load` alone), BN and the compaction layers folded into standard operators.

RUN_OR_DIR is a compacted-model directory (a run's final/, or `softprune compact`'s output) or a
run directory (its final/ is used). The exported file is checked against the compacted model
(max abs difference <= 1e-4), then the dense and the compact model are timed on this CPU in torch
(eager) and in the exported format's runtime, at batch 1 and --batch: printed, and written to
FILE.latency.json. The run's own files are not changed."""

from __future__ import annotations

import argparse
from pathlib import Path

TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pruning.export import FORMATS

    parser.add_argument("run_or_dir", help="a compacted-model directory (arch.json, model.safetensors, "
                        "report.json) or a run directory <storage>/<name> (its final/)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", default=None, help="output file (default: DIR/model.<format suffix>)")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch size for the latency table")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before each measurement")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of both runtimes in the latency table (0: each runtime's default, every "
                             "core; 1: what one session per core serves). A compacted model's narrower convs "
                             "split worse across threads, so its speed-up is largest on one")
    parser.add_argument("--no-latency", dest="latency", action="store_false",
                        help="export and check the file only, without timing")


def compacted_dir(path: str) -> Path:
    """The compacted-model directory that `path` names: itself, or a run's final/."""
    if "://" in path:
        raise ValueError(f"{path}: export reads a local directory (download the run, or its final/, first)")
    root = Path(path)
    for candidate in (root, root / "final"):
        if (candidate / "arch.json").is_file():
            return candidate
    if not root.exists():
        raise ValueError(f"{path}: no such directory")
    raise ValueError(f"{path} is neither a compacted model (no arch.json) nor a run directory with final/arch.json")


def _check_args(args: argparse.Namespace) -> None:
    for field in ("batch", "repeats"):
        if getattr(args, field) < 1:
            raise ValueError(f"--{field} must be >= 1, got {getattr(args, field)}")
    for field in ("warmup", "threads"):
        if getattr(args, field) < 0:
            raise ValueError(f"--{field} must be >= 0, got {getattr(args, field)}")


def run(args: argparse.Namespace) -> int:
    import json

    from pruning.export import SUFFIX, require
    from pruning.io import load_compact
    from pruning.latency import table

    _check_args(args)
    require(args.format)  # before any work: a missing extra is one line
    src = compacted_dir(args.run_or_dir)
    small, spec, _ = load_compact(src)
    out = Path(args.out) if args.out else src / f"model{SUFFIX[args.format]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    size = _export(small, spec, args.format, out)
    diff = _max_diff(small, args.format, out, size)
    print(f"exported {spec['model']} ({spec.get('compact_mode', 'dense')}, {spec.get('policy', '?')}) "
          f"as {args.format} -> {out} (max |diff| vs the compacted model {diff:.1e})")
    if args.latency:
        report = {**_latency(small, spec, args, size, out), "max_abs_diff": diff}
        Path(f"{out}.latency.json").write_text(json.dumps(report, indent=1) + "\n")
        print(table(report))
        print(f"latency -> {out}.latency.json")
    return 0


def _input_size(spec: dict) -> tuple[int, int]:
    from pruning.macs import hw

    size = spec.get("input_size") or 224
    return hw(size if isinstance(size, int) else tuple(size))


def _export(small, spec: dict, fmt: str, out: Path):
    from pruning.export import folded_for, write

    size = _input_size(spec)
    write(folded_for(small, fmt), fmt, out, size)
    return size


def _max_diff(small, fmt: str, out: Path, size: tuple[int, int]) -> float:
    """The exported file against the compacted model, at batch 1 and 3 (the batch axis is free)."""
    import torch

    from pruning.export import load_runner

    runner = load_runner(fmt, out)
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = small(x)
        worst = max(worst, (runner(x) - want).abs().max().item())
    if not worst <= TOLERANCE:
        raise RuntimeError(f"export: {out} differs from the compacted model by {worst:.2e} (> {TOLERANCE})")
    return worst


def _latency(small, spec: dict, args: argparse.Namespace, size: tuple[int, int], out: Path) -> dict:
    """The latency table, with torch at `--threads` for its duration (given > 0)."""
    import torch

    from pruning.respec import dense_model

    dense = dense_model(spec).eval()  # registered or a user factory's; timing only: weights do not matter
    torch_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _timed(dense, small, spec, args, size, out)
    finally:
        torch.set_num_threads(torch_threads)


def _timed(dense, small, spec: dict, args: argparse.Namespace, size: tuple[int, int], out: Path) -> dict:
    import tempfile

    import torch

    from pruning.export import SUFFIX, folded_for, load_runner, runtime_name, write
    from pruning.latency import compare, machine
    from pruning.macs import count_flops

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".dense-export-") as tmp:
        dense_file = write(folded_for(dense, args.format), args.format, Path(tmp) / f"dense{SUFFIX[args.format]}", size)

        def eager(model):
            def run(x):
                with torch.no_grad():
                    return model(x)
            return run

        runners = {"torch eager": {"dense": eager(dense), "compact": eager(small)},
                   runtime_name(args.format): {"dense": load_runner(args.format, dense_file, args.threads),
                                               "compact": load_runner(args.format, out, args.threads)}}
        batches = sorted({1, args.batch})
        latency = compare(runners, size, batches, args.warmup, args.repeats)
    macs = {"dense": count_flops(dense, size).macs, "compact": count_flops(small, size).macs}
    macs["ratio"] = macs["dense"] / macs["compact"]
    return {"model": spec["model"], "format": args.format, "file": out.name, "input_size": list(size),
            "compact_mode": spec.get("compact_mode"), "policy": spec.get("policy"),
            "batches": batches, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads, "macs": macs,
            "latency": latency, "machine": machine()}
