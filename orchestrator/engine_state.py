"""An engine's training state in a form that does not depend on the world size.

DeepSpeed's own checkpoint stores each rank's ZeRO partition; it loads only at the world size
that wrote it (or after an offline conversion to its "universal" format). This module gathers
the same information into full tensors keyed by parameter name instead:

- `model`: every parameter's fp32 master value (not the bf16/fp16 module copy) and every buffer;
- `optimizer`: every parameter's full moments (`momentum_buffer`, `exp_avg`, ...), the optimiser's
  scalar state (AdamW's `step`), each param group's LR, the engine's step counters, under fp16
  the loss scale, and under bf16/fp16 the module's own low-precision copy (`module`). That copy
  is usually the master rounded, but not after a norm-control event: the event scales the module
  rows locally, rounding module x c where the master holds master x c (orchestrator/master.py),
  until the next step() copies the master back. Restoring the copy itself makes a resumed run
  take the same first step as the run that was not interrupted.

Loading scatters it into an engine of any world size through the same `MasterCopy` the pruning
coordinator uses, so whatever layout DeepSpeed chose (ZeRO 1/2 fragments, stage-0 fp32 clones,
plain fp32) receives the values where its `step()` reads them. Train-time compaction
(orchestrator/compaction.py) gathers an engine's state, cuts it to the kept channels and loads it
into the compacted model's engine the same way.

Cost: gathering is one all-reduce of each parameter's size per tensor kind under ZeRO 1/2
(values, then each moment); rank 0 holds the full fp32 model and moments on CPU while writing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .master import MOMENT_KEYS, MasterCopy


def gather(engine, keep: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(model state, optimizer state) on CPU where `keep` (rank 0 for a checkpoint; every rank
    for compaction), None elsewhere. Collective: every rank calls it and walks the parameters in
    the same order."""
    master = MasterCopy(engine)
    module: nn.Module = engine.module
    keys = master.moment_keys()
    model: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in module.named_parameters():
        value = master.full(p)  # sync point under ZeRO 1/2
        per_key = {k: master.moment(p, k) for k in keys}  # sync points under ZeRO 1/2
        if keep:
            model[name] = value
            moments[name] = {k: v for k, v in per_key.items() if v is not None}
    if not keep:
        return None
    low = {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.dtype != torch.float32}
    for name, buf in persistent_buffers(module).items():
        model[name] = buf.detach().cpu().clone().float() if buf.is_floating_point() else buf.detach().cpu().clone()
    return model, {"moments": moments, "scalars": _scalars(master), "global_steps": int(engine.global_steps),
                   "global_samples": int(getattr(engine, "global_samples", 0)),
                   "loss_scale": _loss_scale(engine),
                   "lrs": [float(g["lr"]) for g in engine.optimizer.param_groups], "module": low}


def load(engine, model: dict[str, torch.Tensor], optimizer: dict[str, Any] | None) -> None:
    """Write a gathered state into `engine` (any world size, ZeRO stage or precision).

    Raises ValueError naming the first mismatching tensor when the state is of another model.
    """
    module: nn.Module = engine.module
    check_shapes(module, model)
    master = MasterCopy(engine)
    for name, p in module.named_parameters():
        master.write(p, model[name])
    with torch.no_grad():
        for name, buf in persistent_buffers(module).items():
            buf.copy_(model[name].to(buf.device, buf.dtype))
    lrs = (optimizer or {}).get("lrs")  # the trainer also sets the LR at every step
    if lrs is not None and len(lrs) == len(engine.optimizer.param_groups):
        for group, lr in zip(engine.optimizer.param_groups, lrs):
            group["lr"] = lr
    if optimizer and optimizer.get("moments"):  # none when saved before the first step
        _load_optimizer(engine, master, optimizer)
    _load_low_precision_copy(module, (optimizer or {}).get("module") or {})


def _load_optimizer(engine, master: MasterCopy, optimizer: dict[str, Any]) -> None:
    module: nn.Module = engine.module
    _prime(master)  # the moments exist now; MasterCopy looks them up live
    for name, p in module.named_parameters():
        for key, value in optimizer["moments"].get(name, {}).items():
            master.set_moment(p, key, value)
    for st in master.inner.state.values():
        for key, value in optimizer.get("scalars", {}).items():
            st[key] = torch.tensor(value, dtype=torch.float32) if torch.is_tensor(st.get(key)) else value
    engine.global_steps = optimizer.get("global_steps", 0)
    engine.global_samples = optimizer.get("global_samples", 0)
    if optimizer.get("loss_scale") is not None and hasattr(engine.optimizer, "cur_scale"):
        engine.optimizer.cur_scale = optimizer["loss_scale"]


def _load_low_precision_copy(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """The module's bf16/fp16 values as they were saved (see the module docstring), where this
    engine keeps the same precision; elsewhere the master's values, written above, stand."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            value = saved.get(name)
            if value is not None and value.dtype == p.dtype and value.shape == p.shape:
                p.copy_(value.to(p.device))


def check_shapes(module: nn.Module, model: dict[str, torch.Tensor]) -> None:
    """One clear line when a saved state does not fit `module` (another model or width)."""
    own = {**dict(module.named_parameters()), **persistent_buffers(module)}
    missing = sorted(set(own) - set(model))
    extra = sorted(set(model) - set(own))
    if missing or extra:
        raise ValueError(f"checkpoint holds another model: {len(missing)} tensors missing "
                         f"(first {missing[:1]}), {len(extra)} unexpected (first {extra[:1]})")
    for name, tensor in own.items():
        if tuple(model[name].shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint holds another model: {name} is {tuple(model[name].shape)} "
                             f"there and {tuple(tensor.shape)} here")


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict holds (BN statistics); non-persistent ones are rebuilt by the model."""
    params = {name for name, _ in module.named_parameters()}
    return {name: t for name, t in module.state_dict(keep_vars=True).items() if name not in params}


def _scalars(master: MasterCopy) -> dict[str, float]:
    """Per-parameter scalars of the optimiser (AdamW's `step`): equal for every parameter."""
    for st in (master.inner.state.values() if master.inner is not None else ()):
        return {k: float(v) for k, v in st.items() if k not in MOMENT_KEYS and (not torch.is_tensor(v) or v.numel() == 1)}
    return {}


def _loss_scale(engine) -> float | None:
    scale = getattr(engine.optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None


def _prime(master: MasterCopy) -> None:
    """Create the optimiser's per-parameter state without changing any value.

    torch optimisers create moments lazily at their first step, and DeepSpeed links its ZeRO
    fragments to them only after that step; a fresh engine has neither. One step of the inner
    torch optimiser with zero gradients, lr 0 and weight decay 0 creates zero moments and leaves
    every parameter as it is (SGD: buf = 0, p -= 0; AdamW: p *= 1, update 0 / (0 + eps) * 0).
    """
    inner = master.inner
    saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in inner.param_groups]
    params = [p for g in inner.param_groups for p in g["params"]]
    for g in inner.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    inner.step()
    for p in params:
        p.grad = None
    for g, (lr, wd) in zip(inner.param_groups, saved):
        g["lr"], g["weight_decay"] = lr, wd
    link = getattr(master.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO 1/2: point each parameter's fragment at the new moments
        link()
