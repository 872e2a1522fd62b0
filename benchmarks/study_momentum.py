"""Why soft pruning needs the pruned filters' momentum zeroed when events are few steps apart.

A plain PyTorch study (one process, no Ray or DeepSpeed) of SFP on a CIFAR ResNet-20, through
the same `pruning` functions the trainer uses. Variants: dense; SFP as the authors wrote it
(weights zeroed, momentum kept); SFP with the pruned rows' momentum zeroed (our default). Every
epoch-end event records, per variant:

  mom_ratio   momentum norm of the rows being pruned / of the rows kept (what a kept buffer
              would push back into a zeroed filter)
  back_cos    cosine between a pruned filter before zeroing and the same filter 1 step later:
              ~1 means the old velocity rebuilt the old filter, ~0 a fresh direction
  jump        norm of a pruned filter 1 step after zeroing / the kept filters' mean norm
  kept_norm   mean norm of the kept filters (BN makes them scale invariant: effective LR is
              lr / norm^2)
and every epoch train loss, val top-1 of the soft-masked model, and at the end the top-1 of the
hard-masked model after BN recalibration (what finalize starts from).

    python benchmarks/study_momentum.py --data DIR/manifest.json [--epochs 30] [--every-steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import DataConfig, make_train_loader, make_val_loader, normalize
from models import create_model
from orchestrator.evaluation import evaluate
from pruning import (
    PruningConfig,
    apply_masks,
    groups_from_config,
    make_chooser,
    make_schedule,
)
from pruning.masks import conv_keep
from pruning.norms import filter_norm_stats, summarize
from pruning.renorm import layer_norms, renormalise

VARIANTS = {"dense": None, "sfp_authors": False, "sfp_zeroed": True, "sfp_zeroed_renorm": True}


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().flatten(1)


class Study:
    def __init__(self, args, variant: str):
        self.args, self.variant = args, variant
        torch.manual_seed(args.seed)
        self.model = create_model("resnet20", num_classes=args.classes)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                   weight_decay=args.wd)
        self.zero_moments = VARIANTS[variant]
        p = PruningConfig(method="sfp" if self.zero_moments is not None else "none", rate=args.rate)
        self.groups = groups_from_config(self.model, p)
        self.choose = make_chooser(self.groups, p)
        self.rate = make_schedule(p, args.epochs)
        self.renorm = variant.endswith("_renorm")
        self.init_norm = layer_norms(self.groups, dict(self.model.named_parameters()))
        self.masks = None
        self.pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # conv -> (drop, weights before)
        self.events: list[dict] = []
        self.epochs: list[dict] = []

    def lr_at(self, epoch: float) -> float:
        a = self.args
        return a.lr * (0.2 ** sum(epoch >= m for m in (a.epochs // 2, a.epochs * 5 // 6)))

    def event(self, epoch: int) -> None:
        convs = dict(self.model.named_modules())
        tensors = dict(self.model.named_parameters())
        masks = self.choose(tensors, self.rate(epoch), epoch)
        keep = conv_keep(self.groups, masks)
        kept_mom, pruned_mom = [], []
        self.pending = {}
        for conv, k in keep.items():
            w = convs[conv].weight
            state = self.opt.state.get(w, {})
            buf = state.get("momentum_buffer")
            drop = ~k.bool()
            if buf is not None and drop.any():
                n = _rows(buf).norm(dim=1)
                kept_mom.append(float(n[~drop].mean()))
                pruned_mom.append(float(n[drop].mean()))
            self.pending[conv] = (drop, _rows(w).clone())
        apply_masks(self.model, self.groups, masks, hard=False, optimizer=self.opt,
                    zero_moments=self.zero_moments)
        self.masks = masks
        if self.renorm:  # the product's norm control (pruning.norm_control=init)
            renormalise(self.model, self.groups, masks, self.init_norm, self.opt)
        self.events.append({"epoch": epoch, "rate": self.rate(epoch),
                            "mom_ratio": sum(pruned_mom) / max(sum(kept_mom), 1e-12) if kept_mom else None})

    def after_first_step(self) -> None:
        """Where the zeroed filters went in the step after the event."""
        if not self.pending:
            return
        convs = dict(self.model.named_modules())
        cos, jump, kept = [], [], []
        for conv, (drop, before) in self.pending.items():
            now = _rows(convs[conv].weight)
            if drop.any():
                cos.append(float(F.cosine_similarity(now[drop], before[drop], dim=1).mean()))
                jump.append(float(now[drop].norm(dim=1).mean()))
            kept.append(float(now[~drop].norm(dim=1).mean()))
        mean_kept = sum(kept) / len(kept)
        self.events[-1].update(back_cos=sum(cos) / len(cos), jump=(sum(jump) / len(jump)) / mean_kept)
        self.pending = {}

    def norms(self) -> dict:
        convs = dict(self.model.named_modules())
        weights = {c: convs[c].weight for c in self.groups.convs()}
        return summarize(filter_norm_stats(weights, self.opt.param_groups[0]["lr"], self.groups, self.masks)
                         if self.masks is not None else filter_norm_stats(weights, self.opt.param_groups[0]["lr"]))


def _recalibrated_hard_top1(s: Study, train, val, cfg) -> float:
    apply_masks(s.model, s.groups, s.masks, hard=True)
    for m in s.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the recalibration batches
    s.model.train()
    with torch.no_grad():
        for i, (images, _) in enumerate(train):
            s.model(normalize(images, cfg.mean, cfg.std))
            if i >= 20:
                break
    return evaluate(s.model, val, cfg.mean, cfg.std)["top1"]


def run(args, variant: str) -> dict:
    cfg = DataConfig(train=args.data, val=args.data, image_size=args.size, transform="cifar",
                     batch_size=args.batch, num_workers=0, shuffle_buffer=512)
    train, val = make_train_loader(cfg, 0, 1), make_val_loader(cfg, 0, 1)
    s = Study(args, variant)
    step = 0
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        s.model.train()
        start, losses = time.perf_counter(), []
        for images, labels in train:
            for g in s.opt.param_groups:
                g["lr"] = s.lr_at(epoch)
            loss = F.cross_entropy(s.model(normalize(images, cfg.mean, cfg.std)), labels)
            s.opt.zero_grad(set_to_none=True)
            loss.backward()
            s.opt.step()
            s.after_first_step()
            losses.append(float(loss.detach()))
            step += 1
            if args.every_steps and s.zero_moments is not None and step % args.every_steps == 0:
                s.event(epoch)
        if not args.every_steps and s.zero_moments is not None:
            s.event(epoch)
        row = {"epoch": epoch, "loss": sum(losses) / len(losses), "top1": evaluate(s.model, val, cfg.mean, cfg.std)["top1"],
               "seconds": time.perf_counter() - start, **{f"kept_{k}": v for k, v in s.norms().items()}}
        s.epochs.append(row)
        print(f"{variant:12s} epoch {epoch:3d} loss {row['loss']:.3f} top1 {row['top1']:.3f} "
              f"norm {row['kept_norm']:.2f} eff_lr {row['kept_eff_lr']:.2e}"
              + (f" | event mom_ratio {s.events[-1]['mom_ratio'] or 0:.2f} back_cos "
                 f"{s.events[-1].get('back_cos', float('nan')):.2f} jump {s.events[-1].get('jump', float('nan')):.2f}"
                 if s.events else ""), flush=True)
    out = {"variant": variant, "epochs": s.epochs, "events": s.events, "soft_top1": s.epochs[-1]["top1"]}
    if s.masks is not None:
        out["hard_recalibrated_top1"] = _recalibrated_hard_top1(s, train, val, cfg)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="manifest.json of a shard set (train and val splits)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--rate", type=float, default=0.4)
    ap.add_argument("--every-steps", type=int, default=0, help="events every N steps (0: every epoch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write every figure as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [run(args, v) for v in args.variants.split(",")]
    print(f"\n{'variant':12s} {'soft top1':>9s} {'hard+recal':>10s} {'final norm':>10s} {'mom_ratio':>9s} "
          f"{'back_cos':>8s} {'jump':>6s}")
    for r in results:
        ev = [e for e in r["events"] if e.get("back_cos") is not None]
        def mean(k, ev=ev):
            return sum(e[k] or 0 for e in ev) / len(ev) if ev else float("nan")
        print(f"{r['variant']:12s} {r['soft_top1']:9.3f} {r.get('hard_recalibrated_top1', float('nan')):10.3f} "
              f"{r['epochs'][-1]['kept_norm']:10.2f} {mean('mom_ratio'):9.2f} {mean('back_cos'):8.2f} {mean('jump'):6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
