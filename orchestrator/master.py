"""Where DeepSpeed keeps each parameter's fp32 value and optimiser moments, for every setup.

A mask written only into the module is undone by the next `step()` whenever the optimiser steps
a separate fp32 master copy and copies it back. Three layouts exist with a torch optimiser:
- ZeRO 1/2 (and DeepSpeed's BF16_Optimizer): each rank owns a fragment of a flat fp32 partition,
  reached through `param._hp_mapping` and DeepSpeed's `safe_*` getters/setters (collective);
- stage 0 with bf16/fp16 (`FP16_UnfusedOptimizer`): one fp32 clone per parameter in
  `optimizer.fp32_groups`, parallel to `optimizer.fp16_groups`; the safe setters do not reach it;
- stage 0 fp32: the module parameter is the master and the optimiser's state is keyed by it.
`MasterCopy` hides the difference: read the full fp32 value, write it everywhere it lives, read
and write moments, and list the fp32 pieces this rank holds (for the divergence check).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

MOMENT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


class MasterCopy:
    """The fp32 master values and moments behind an engine's parameters."""

    def __init__(self, engine):
        self.engine = engine
        self.optimizer = getattr(engine, "optimizer", None) if engine is not None else None
        self.inner = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch optimiser
        self._clone = _clone_masters(self.optimizer)  # id(module param) -> its fp32 clone (stage 0)

    @staticmethod
    def partitioned(p: nn.Parameter) -> bool:
        return hasattr(p, "_hp_mapping")

    def _master(self, p: nn.Parameter) -> torch.Tensor:
        return self._clone.get(id(p), p)

    # -- values --------------------------------------------------------------------------
    def full(self, p: nn.Parameter) -> torch.Tensor:
        """The full fp32 value on CPU. Collective under ZeRO 1/2: every rank calls it."""
        from deepspeed.utils import safe_get_full_fp32_param

        if self.partitioned(p):
            return safe_get_full_fp32_param(p).float().cpu()
        return self._master(p).detach().float().cpu().clone()

    def write(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """`value` into the module parameter and into the master copy, wherever it lives."""
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad():
            p.data.copy_(value.to(p.device, p.dtype))
            if self.partitioned(p):
                safe_set_full_fp32_param(p, value.to(p.device).float())  # this rank's fragment
            elif id(p) in self._clone:
                self._clone[id(p)].copy_(value.to(self._clone[id(p)].device, torch.float32))

    # -- moments -------------------------------------------------------------------------
    def moment_keys(self) -> list[str]:
        """The optimiser's moment names (empty before the first step: identical on every rank)."""
        if self.inner is None or getattr(self.engine, "global_steps", 1) == 0:
            return []
        for st in self.inner.state.values():
            return [k for k in MOMENT_KEYS if k in st]
        return []

    def moment(self, p: nn.Parameter, key: str) -> torch.Tensor | None:
        """The full moment `key` of `p` on CPU, or None. Collective under ZeRO 1/2."""
        from deepspeed.utils import safe_get_full_optimizer_state

        if self.partitioned(p):
            value = safe_get_full_optimizer_state(p, key)
            return None if value is None else value.float().cpu()
        state = self.inner.state.get(self._master(p), {})
        return state[key].float().cpu().clone() if key in state else None

    def set_moment(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if self.partitioned(p):
            safe_set_full_optimizer_state(p, value.to(p.device).float(), key)
            return
        target = self.inner.state[self._master(p)][key]
        target.copy_(value.to(target.device, target.dtype))

    # -- what this rank holds ------------------------------------------------------------
    def held_pieces(self, p: nn.Parameter) -> Iterator[tuple[int, torch.Tensor]]:
        """(flat offset, flat fp32 values) of the master pieces of `p` on this rank, besides the
        module parameter itself: a ZeRO fragment, or the stage-0 fp32 clone."""
        if self.partitioned(p):
            mapping = p._hp_mapping
            if mapping is not None:  # None: this rank's partition holds no part of p
                yield mapping.lp_fragment_address.start, mapping.get_hp_fragment().detach().flatten()
        elif id(p) in self._clone:
            yield 0, self._clone[id(p)].detach().flatten()


def _clone_masters(optimizer) -> dict[int, torch.Tensor]:
    """Stage-0 mixed precision keeps one fp32 clone per parameter; map each parameter to it."""
    if optimizer is None or not hasattr(optimizer, "fp32_groups") or not hasattr(optimizer, "fp16_groups"):
        return {}
    if hasattr(optimizer, "fp32_groups_flat"):  # the fused FP16_Optimizer: built for FusedAdam only
        raise ValueError("DeepSpeed's fused FP16_Optimizer is not supported (its masters are flat); "
                         "use a torch optimiser (optim.name=sgd|adamw)")
    pairs = {}
    for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):
        for p, master in zip(low, high):
            pairs[id(p)] = master
    return pairs
