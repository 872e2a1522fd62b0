"""How hard is the synthetic dev set? Train a CIFAR ResNet-20 on it and print the trajectory.

Writes a fresh shard set (`write_synthetic`, kind "scenes" unless --kind says otherwise) into a
temporary folder under the repo's .cache, then trains `resnet20` in this one plain PyTorch
process through the real loader (`make_train_loader` / `make_val_loader`, transform "cifar":
pad 4 + random crop + flip), one CPU thread: global batch 128, SGD lr 0.1 nesterov momentum 0.9,
weight decay 5e-4, lr x0.2 at 50% and 83% of the epochs (15 and 25 of 30). One line per epoch
(train loss, train accuracy, val top-1, seconds), per-class accuracy and the most confused
pairs, then (scenes only) cue probes: the trained model on fresh val-like images drawn with one
cue changed (colours drawn at random for every object, colours always from the class, no clutter),
which shows what the model leans on; and a final line.

The dev set is meant to land at 90-99% val top-1 after 30 epochs at the defaults, and well below
90% train accuracy after the first epoch (data/scenes.py has the calibrated numbers):

    nice -n 5 .venv/bin/python benchmarks/calibrate_devset.py --epochs 30
    .venv/bin/python benchmarks/calibrate_devset.py --size 64 --train 1000 --epochs 6
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import DataConfig, make_train_loader, make_val_loader, normalize, write_synthetic  # noqa: E402
from data.scenes import SceneTable, Style  # noqa: E402
from models.registry import create_model  # noqa: E402

# Style changes of the cue probes (data.scenes.Style fields).
PROBES = {
    "as trained": {},
    "colour at random": {"random_colour": 1.0},
    "colour from class": {"random_colour": 0.0},
    "no clutter": {"distractors": (0, 0), "occlusion": 0.0, "background_texture": (0.0, 0.0)},
}
PROBE_SPLIT = 7  # rng stream of the probe images: neither train (0) nor val (1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--val", type=int, default=500, help="validation images")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the model and the loader")
    p.add_argument("--kind", default="scenes", choices=("grating", "scenes"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def milestones(epochs: int) -> list[int]:
    """15 and 25 for 30 epochs, scaled for shorter runs."""
    return sorted({max(1, round(epochs * 15 / 30)), max(1, round(epochs * 25 / 30))})


def train_epoch(model, loader, opt, cfg) -> tuple[float, float]:
    model.train()
    loss_sum = correct = seen = 0
    for images, labels in loader:
        logits = model(normalize(images, cfg.mean, cfg.std))
        loss = nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    return loss_sum / seen, correct / seen


def val_top1(model, loader, cfg, classes: int) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy and the confusion matrix [true, predicted] over the valid val samples."""
    model.eval()
    confusion = torch.zeros(classes * classes, dtype=torch.long)
    with torch.no_grad():
        for images, labels, valid in loader:
            pred = model(normalize(images, cfg.mean, cfg.std)).argmax(1)
            confusion += torch.bincount((labels * classes + pred)[valid], minlength=classes * classes)
    confusion = confusion.view(classes, classes)
    return float(confusion.trace() / confusion.sum()), confusion


def probe(model, cfg, args, change: dict) -> float:
    """Val top-1 on `args.val` fresh scenes drawn with the Style `change`, JPEG round-tripped like
    the shards (quality 90)."""
    table = SceneTable.make(args.classes, args.seed, dataclasses.replace(Style(), **change))
    labels = np.arange(args.val) % args.classes
    images = []
    for i, label in enumerate(labels):
        buf = io.BytesIO()
        rng = np.random.default_rng([args.seed, PROBE_SPLIT, i])
        Image.fromarray(table.render(int(label), args.size, rng)).save(buf, format="JPEG", quality=90)
        images.append(np.asarray(Image.open(buf)))
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(normalize(x, cfg.mean, cfg.std)).argmax(1) for x in batch.split(args.batch_size)])
    return float((pred.numpy() == labels).mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    (ROOT / ".cache").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache", prefix="calibrate_devset-") as tmp:
        start = time.perf_counter()
        manifest = write_synthetic(Path(tmp) / "set", classes=args.classes, train=args.train, val=args.val,
                                   size=args.size, seed=args.seed, kind=args.kind)
        print(f"wrote {args.train} + {args.val} {args.kind} images of {args.size} px in {args.classes} classes "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
        return run(args, manifest)


def run(args, manifest: Path) -> int:
    cfg = DataConfig(train=str(manifest), val=str(manifest), image_size=args.size, transform="cifar",
                     batch_size=args.batch_size, num_workers=0, shuffle_buffer=args.train, seed=args.seed)
    train, val = make_train_loader(cfg, 0, 1), make_val_loader(cfg, 0, 1)
    torch.manual_seed(args.seed)
    model = create_model("resnet20", num_classes=args.classes)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = milestones(args.epochs)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, steps, gamma=0.2)
    print(f"resnet20, batch {args.batch_size}, lr {args.lr} x0.2 at epochs {steps}, "
          f"{args.epochs} epochs, {torch.get_num_threads()} thread(s)", flush=True)
    history, begin = [], time.perf_counter()
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        train.set_epoch(epoch)
        loss, acc = train_epoch(model, train, opt, cfg)
        sched.step()
        top1, confusion = val_top1(model, val, cfg, args.classes)
        history.append(top1)
        print(f"epoch {epoch + 1:3d}  train loss {loss:.4f}  train acc {acc:6.2%}  "
              f"val top-1 {top1:6.2%}  {time.perf_counter() - t0:5.1f} s", flush=True)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    print("per-class val top-1: " + " ".join(f"{c}:{float(a):.0%}" for c, a in enumerate(per_class)))
    off = confusion - torch.diag(confusion.diag())
    worst = [divmod(int(i), args.classes) for i in off.flatten().argsort(descending=True)[:5] if off.flatten()[i] > 0]
    print("most confused (true->predicted: count): " + ", ".join(f"{t}->{p}: {int(off[t, p])}" for t, p in worst))
    if args.kind == "scenes":
        print("cue probes (val top-1 on fresh images): " + ", ".join(
            f"{name} {probe(model, cfg, args, change):.2%}" for name, change in PROBES.items()), flush=True)
    print(f"final: val top-1 {history[-1]:.2%} (best {max(history):.2%}) after {args.epochs} epochs, "
          f"{args.size} px, {args.classes} classes, {args.train} train / {args.val} val, seed {args.seed}, "
          f"{time.perf_counter() - begin:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
