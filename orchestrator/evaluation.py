"""Evaluation with exact top-1/top-5 over ranks, BN buffer sync, and BN recalibration."""

from __future__ import annotations

import torch
from torch import nn

from . import watchdog
from .collectives import all_reduce_sum, rank_world


def to_input(images: torch.Tensor, mean, std, like: nn.Module, channels_last: bool = False) -> torch.Tensor:
    """uint8 batch -> normalised float batch on the model's device and dtype; NHWC in memory with
    `channels_last` (scaling.channels_last). Only the batch changes layout: a conv given an NHWC
    input runs NHWC whatever its weight's layout (cuDNN and oneDNN pick the format from either
    operand), so the parameters stay as DeepSpeed lays them out, in flat buffers at ZeRO 1/2."""
    from data import normalize

    p = next(like.parameters())
    x = normalize(images.to(p.device), mean, std).to(p.dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate(model: nn.Module, loader, mean, std, channels_last: bool = False) -> dict[str, float]:
    """Top-1/top-5/loss over the whole validation set. Exact across ranks: the counts are summed
    with one all-reduce (sync point), and padded samples (valid=False) are not counted."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, count, loss sum
    for images, labels, valid in loader:
        logits = model(to_input(images, mean, std, model, channels_last)).float().cpu()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        v = valid.bool()
        totals[0] += hit[:, :1].any(1)[v].sum()
        totals[1] += hit.any(1)[v].sum()
        totals[2] += v.sum()
        totals[3] += nn.functional.cross_entropy(logits[v], labels[v], reduction="sum").item() if v.any() else 0.0
        watchdog.beat()
    totals = all_reduce_sum(totals)  # sync point: every rank evaluates its share
    model.train(was_training)
    n = max(totals[2].item(), 1.0)
    return {"top1": totals[0].item() / n, "top5": totals[1].item() / n, "loss": totals[3].item() / n,
            "samples": int(totals[2].item())}


@torch.no_grad()
def sync_bn_buffers(model: nn.Module) -> None:
    """Average BN running statistics over ranks so every rank (and the saved model) agrees.
    Sync point: one all-reduce of all the buffers, flattened; cheap next to a training step."""
    _, world = rank_world()
    if world == 1:
        return
    bufs = [buf for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats for buf in (m.running_mean, m.running_var)]
    if not bufs:
        return
    flat = all_reduce_sum(torch.cat([b.detach().float().flatten() for b in bufs])) / world
    for buf, value in zip(bufs, flat.split([b.numel() for b in bufs])):
        buf.copy_(value.view_as(buf).to(buf.dtype))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, mean, std, limit: int, channels_last: bool = False) -> int:
    """Re-estimate BN running statistics with the current (masked) weights on training batches.

    Statistics are reset and accumulated as a plain average (momentum None), then averaged over
    ranks. Returns the number of batches used on this rank. `limit` 0 leaves them as they are
    (a reset without batches would leave BN at mean 0, variance 1: a chance-level model).
    """
    if limit <= 0:
        return 0
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    used = 0
    for item in batches:
        if used >= limit:
            break
        model(to_input(item[0], mean, std, model, channels_last))
        used += 1
        watchdog.beat()
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)
    sync_bn_buffers(model)
    return used
