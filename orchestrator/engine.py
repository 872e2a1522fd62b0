"""DeepSpeed engine creation: model -> (torch optimiser, engine), plus the per-step LR.

Kept apart from the trainer because PFEC builds a second engine mid-run for the compacted model.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .config import LRConfig, OptimConfig, TrainConfig
from .deepspeed_config import deepspeed_config


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW over the model's parameters; norm weights and biases optionally
    without weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if (p.ndim <= 1 and not cfg.decay_norm_and_bias) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(epoch: float, cfg: LRConfig, total_epochs: int) -> float:
    """LR multiplier at a fractional epoch: warm-up, then step / multistep / cosine / constant."""
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (epoch + 1e-8) / cfg.warmup_epochs
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "step":
        return cfg.gamma ** int(epoch // cfg.step_size)
    if cfg.schedule == "cosine":
        span = max(total_epochs - cfg.warmup_epochs, 1e-8)
        return 0.5 * (1 + math.cos(math.pi * min((epoch - cfg.warmup_epochs) / span, 1.0)))
    return 1.0


def lr_at(epoch: float, cfg: TrainConfig) -> float:
    """Absolute LR at a fractional epoch; fine-tuning epochs after `epochs` keep the last LR."""
    base = cfg.optim.lr
    # frozen-mask fine-tuning after the last epoch runs at the last epoch's starting LR (a cosine
    # schedule would otherwise hand it an LR of ~0)
    value = base * lr_factor(min(epoch, cfg.epochs - 1.0) if epoch >= cfg.epochs else epoch, cfg.lr, cfg.epochs)
    return max(value, cfg.lr.min_lr) if cfg.lr.schedule == "cosine" else value


def set_lr(engine, lr: float) -> None:
    """Write the LR into every param group (DeepSpeed's ZeRO optimiser exposes the inner groups)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def _quiet_deepspeed() -> None:
    # Decided on the worker itself (before DeepSpeed picks its accelerator at import): the driver
    # that launched it may have no GPU while this node has.
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed.ops

    # The shm comm op only serves inference all-reduce; skipping it saves a 35-40 s JIT build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> None:
    """Let DeepSpeed adopt the process group Ray Train (or the test harness) created."""
    _quiet_deepspeed()
    import deepspeed

    if torch.cuda.is_available():
        # NCCL collectives (and DeepSpeed) use the current CUDA device: make it this rank's own.
        torch.cuda.set_device(_local_cuda_device())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def _local_cuda_device() -> torch.device:
    try:  # Ray Train knows which of the visible GPUs it gave this worker
        from ray.train.torch import get_device

        device = get_device()
        if device.type == "cuda":
            return device
    except Exception:  # noqa: BLE001 - outside a Ray Train worker (tests, torchrun)
        pass
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def build_engine(model: nn.Module, cfg: TrainConfig, world_size: int | None = None):
    """A DeepSpeed engine around `model` with a torch optimiser; collective on every rank."""
    _quiet_deepspeed()
    import deepspeed
    import deepspeed.utils

    deepspeed.utils.logger.setLevel("WARNING")
    optimizer = build_optimizer(model, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size)
    )
    return engine
