"""`softprune shards imagenet SRC OUT` and `softprune shards synthetic OUT`: write webdataset shards."""

from __future__ import annotations

import argparse
import json

DEFAULT_MAX_SIDE = 384
# data.synthetic.KINDS, spelled out so that building the parser imports no numpy or PIL (a unit
# test checks the two agree).
SYNTHETIC_KINDS = ("grating", "scenes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", required=True)
    imnet = sub.add_parser("imagenet", help="ILSVRC-2012 folders -> shuffled shards + manifest",
                           description="ILSVRC-2012 folders (train/<wnid>/*.JPEG, val/<wnid>/ or a "
                           "flat val/ with a labels file) -> shuffled tar shards + manifest.json. "
                           "Re-running after an interruption keeps finished shards.")
    imnet.add_argument("src", help="folder holding train/ and/or val/")
    imnet.add_argument("out", help="output folder (shards + manifest.json)")
    imnet.add_argument("--shard-size", type=int, default=None, help="samples per shard")
    imnet.add_argument("--shard-mb", type=float, default=None,
                       help="target MiB per shard (default 128 when --shard-size is not given)")
    imnet.add_argument("--max-side", type=int, nargs="?", const=DEFAULT_MAX_SIDE, default=None,
                       metavar="N",
                       help=f"downscale images whose longer side exceeds N px and re-encode them; "
                       f"bare --max-side means {DEFAULT_MAX_SIDE}, which keeps the short side of 4:3 "
                       f"images >= 256 (the standard val resize never upsamples) and made our 1-worker "
                       f"loader ~2.4x faster than a naive pipeline on the originals "
                       f"(benchmarks/bench_loader.py). Default: store the original JPEG bytes")
    imnet.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    imnet.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards")
    imnet.add_argument("--workers", type=int, default=None, help="writer processes (default: all CPUs)")
    imnet.add_argument("--val-labels", default=None, help="labels file for a flat val/ folder")
    imnet.add_argument("--no-progress", action="store_true", help="no progress bar")
    syn = sub.add_parser("synthetic", help="learnable synthetic images in the same format",
                         description="Synthetic class-structured JPEGs in the ImageNet shard format.")
    syn.add_argument("out", help="output folder")
    syn.add_argument("--kind", choices=SYNTHETIC_KINDS, default="grating",
                     help="grating: oriented gratings (easy); scenes: textured shapes among clutter, "
                     "harder (a CIFAR ResNet-20 reaches ~95%% val top-1 in 30 epochs on 2,000 "
                     "images; data/scenes.py)")
    syn.add_argument("--classes", type=int, required=True)
    syn.add_argument("--train", type=int, required=True, help="training images")
    syn.add_argument("--val", type=int, required=True, help="validation images")
    syn.add_argument("--test", type=int, default=0,
                     help="held-out test images (split 'test'; train and val do not depend on it), "
                     "for `softprune compare --test`")
    syn.add_argument("--size", type=int, required=True, help="image side in pixels")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    syn.add_argument("--workers", type=int, default=1, help="writer processes")
    syn.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.source == "imagenet":
        from data.imagenet_writer import write_imagenet_shards

        path = write_imagenet_shards(
            args.src, args.out, shard_size=args.shard_size, shard_mb=args.shard_mb,
            max_side=args.max_side, quality=args.quality, seed=args.seed, workers=args.workers,
            val_labels=args.val_labels, progress=not args.no_progress)
    else:
        from data.synthetic import write_synthetic

        path = write_synthetic(args.out, args.classes, args.train, args.val, args.size, seed=args.seed,
                               shard_size=args.shard_size, workers=args.workers,
                               progress=not args.no_progress, kind=args.kind, test=args.test)
    _summary(path)
    return 0


def _summary(path) -> None:
    manifest = json.loads(path.read_text())
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['samples']} samples in {len(split['shards'])} shards, "
              f"{split['bytes'] / 2**20:.1f} MiB, {len(split['bad_files'])} unreadable files skipped")
        for bad in split["bad_files"][:10]:
            print(f"  skipped {bad['path']}: {bad['error']}")
    print(f"manifest: {path}")
