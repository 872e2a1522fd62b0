"""Recipes: Python functions that return a config tree (a dict that validates into TrainConfig).

Use them with `softprune train launch.recipes:NAME [a.b=value ...]`, or from launch scripts.
The hyper-parameters are the papers': SFP/ASFP (He et al., arXiv 1808.06866 and 1808.07471) and
PFEC (Li et al., ICLR 2017).
Data sources are left unset; pass `data.train=... data.val=...`.
"""

from __future__ import annotations

from typing import Any


def _imagenet(name: str, model: str, workers: int, epochs: int = 100) -> dict[str, Any]:
    """The ImageNet SGD recipe of SFP/ASFP: global batch 256, nesterov momentum 0.9, lr 0.1 / 10
    at 30, 60, 90, weight decay 1e-4."""
    if 256 % workers:
        raise ValueError(f"workers={workers} must divide the global batch of 256")
    return {
        "name": name, "epochs": epochs,
        "model": {"name": model, "num_classes": 1000},
        "data": {"batch_size": 256 // workers, "image_size": 224, "transform": "imagenet", "num_workers": 8},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
        "lr": {"schedule": "multistep", "milestones": [30, 60, 90], "gamma": 0.1},
        "scaling": {"workers": workers, "gpus_per_worker": 1, "cpus_per_worker": 8},
        "checkpoint": {"every_steps": 1000, "keep": 2},
    }


def resnet101_asfp(workers: int = 8) -> dict[str, Any]:
    """ResNet-101 ASFP on ImageNet: L2 criterion, D=1/8, P=35% of the inner convs (the default
    policy), which cuts about the MACs the paper's P=30% of every conv cuts (42% against 41%, kept
    counts rounded as by default).
    `pruning.authors=true pruning.rate=0.3` is the paper's configuration."""
    cfg = _imagenet("r101-asfp", "resnet101", workers)
    cfg["pruning"] = {"method": "asfp", "criterion": "l2", "rate": 0.35, "asymptotic_d": 0.125}
    return cfg


def resnet50_asfp(workers: int = 8) -> dict[str, Any]:
    """ResNet-50 ASFP on ImageNet: D=1/8, P=35% of the inner convs (38% of the MACs, as the paper's
    P=30% of every conv)."""
    cfg = _imagenet("r50-asfp", "resnet50", workers)
    cfg["pruning"] = {"method": "asfp", "criterion": "l2", "rate": 0.35, "asymptotic_d": 0.125}
    return cfg


def _cifar(name: str, model: str, epochs: int, milestones: list[int], gamma: float, wd: float) -> dict[str, Any]:
    return {
        "name": name, "epochs": epochs,
        "model": {"name": model, "num_classes": 10},
        "data": {"batch_size": 64, "image_size": 32, "transform": "cifar", "num_workers": 2,
                 "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": wd},
        "lr": {"schedule": "multistep", "milestones": milestones, "gamma": gamma},
        "scaling": {"workers": 2, "cpus_per_worker": 1},
    }


def resnet56_sfp() -> dict[str, Any]:
    """ResNet-56 SFP, CIFAR-style: 200 epochs, lr 0.1 x 0.2 at 60/120/160, wd 5e-4, soft masks
    every epoch, then finalize (hard mask, BN recalibration, 10 frozen epochs). P=53% of the inner
    convs cuts the half of the MACs the paper's P=40% of every conv cuts."""
    cfg = _cifar("r56-sfp", "resnet56", 200, [60, 120, 160], 0.2, 5e-4)
    cfg["pruning"] = {"method": "sfp", "criterion": "l2", "rate": 0.53, "finetune_epochs": 10}
    return cfg


def resnet56_pfec() -> dict[str, Any]:
    """ResNet-56 PFEC (pruned-B): 160 dense epochs, one L1 prune with the published per-stage
    rates, compaction, 40 retraining epochs at lr 0.001."""
    cfg = _cifar("r56-pfec", "resnet56", 200, [80, 120], 0.1, 1e-4)
    cfg["pruning"] = {"method": "pfec", "criterion": "l1", "policy": "pfec", "preset": "resnet56-B",
                      "prune_epoch": 160}
    return cfg


def vgg16_pfec() -> dict[str, Any]:
    """VGG-16 PFEC (pruned-A) on CIFAR-10: conv1 and conv8-13 at 50%, L1, retrain 40 epochs."""
    cfg = _cifar("vgg16-pfec", "vgg16_cifar", 200, [80, 120], 0.1, 5e-4)
    cfg["pruning"] = {"method": "pfec", "criterion": "l1", "policy": "pfec", "preset": "vgg16-A",
                      "prune_epoch": 160}
    return cfg


def smoke(model: str = "resnet101", size: int = 32, classes: int = 10) -> dict[str, Any]:
    """A few CPU epochs of ASFP at small resolution on synthetic shards (`--smoke`)."""
    return {
        "name": f"{model}-asfp-smoke", "epochs": 4,
        "model": {"name": model, "num_classes": classes, "zero_init_residual": True},
        "data": {"batch_size": 16, "image_size": size, "transform": "cifar", "num_workers": 0,
                 "shuffle_buffer": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        # AdamW + zero-init residuals: a from-scratch ResNet-101 learns within these few CPU steps
        # (SGD at the paper's lr diverges at batch 16 per rank).
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
        "lr": {"schedule": "cosine", "warmup_epochs": 0.5},
        "pruning": {"method": "asfp", "criterion": "l2", "rate": 0.35, "asymptotic_d": 0.125,
                    "finetune_epochs": 1, "recalibrate_batches": 8},
        "scaling": {"workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"keep": 1},  # a ResNet-101 checkpoint with AdamW state is ~0.65 GB
        "tracking": {"log_every": 5},
    }
