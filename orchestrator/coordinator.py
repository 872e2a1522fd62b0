"""The pruning coordinator: rank 0 decides the masks, every rank applies the same masks.

Protocol of one pruning event (DESIGN.md):
1. every rank gathers the full fp32 tensors the groups touch (a collective under ZeRO); rank 0
   scores them, applies the rate and builds the masks;
2. rank 0 broadcasts the bit-packed masks; every rank unpacks them and the hashes are compared
   across ranks (a mismatch raises, naming the ranks);
3. every rank writes the masked tensors into the module AND DeepSpeed's fp32 master copy (and
   optionally the optimiser moments), so the zeros survive the next `step()`;
4. mask statistics (kept fraction per layer, churn, effective cost) go back to the caller.

Masks never depend on rank-local arithmetic: only rank 0's decision travels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MOMENT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


class MaskMismatchError(RuntimeError):
    """Ranks disagree on the masks after the broadcast."""


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_bytes(payload: bytes | None, src: int = 0) -> bytes:
    """Send `payload` from `src` to every rank as a uint8 tensor (length first). Sync point."""
    rank, world = rank_world()
    if world == 1:
        assert payload is not None
        return payload
    size = torch.tensor([len(payload) if rank == src else 0], dtype=torch.int64)
    dist.broadcast(size, src)
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if rank == src else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buf, src)
    return bytes(buf.numpy().tobytes())


def check_same_hash(local_hash: str) -> list[str]:
    """All-gather every rank's mask hash; raise naming the ranks that differ from rank 0. Sync point."""
    rank, world = rank_world()
    if world == 1:
        return [local_hash]
    hashes: list[Any] = [None] * world
    dist.all_gather_object(hashes, local_hash)
    bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if bad:
        raise MaskMismatchError(
            f"mask hash mismatch: ranks {bad} differ from rank 0 ({hashes[0]}): "
            + ", ".join(f"rank {r}={hashes[r]}" for r in bad)
        )
    return list(hashes)


class Coordinator:
    """Owns the channel groups of one model (or engine) and runs pruning events on it."""

    def __init__(self, model: nn.Module, groups, engine=None):
        self.model = model  # the plain module (engine.module under DeepSpeed)
        self.groups = groups
        self.engine = engine
        self.names = list(groups.param_names())
        self._params = dict(model.named_parameters())
        self._buffers = dict(model.named_buffers())

    # -- step 1: full fp32 tensors ------------------------------------------------------
    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Full fp32 values of every touched tensor. Collective under ZeRO 1/2: all ranks call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name in self.names:
            if name in self._params:
                p = self._params[name]
                full = safe_get_full_fp32_param(p)  # all-reduce of the fragments under ZeRO
                out[name] = (full if full is not None else p.detach()).float().clone().cpu()
            else:
                out[name] = self._buffers[name].detach().float().clone().cpu()
        return out

    # -- steps 1-2: decide on rank 0, broadcast, check -------------------------------------
    def decide(self, choose: Callable[[dict[str, torch.Tensor]], Any]):
        """Rank 0 runs `choose(full_tensors) -> MaskSet`; every rank gets the same MaskSet back.

        Returns (masks, tensors, rank_hashes). `tensors` are the full fp32 values on every rank.
        """
        from pruning import MaskSet

        rank, _ = rank_world()
        tensors = self.full_tensors()
        packed = choose(tensors).pack() if rank == 0 else None  # rank-dependent: only rank 0 scores
        data = broadcast_bytes(packed)  # sync point
        masks = MaskSet.unpack(data, self.groups)
        hashes = check_same_hash(masks.hash())  # sync point; raises naming the bad ranks
        return masks, tensors, hashes

    # -- step 3: apply to module, master copy and moments ---------------------------------
    def apply(self, masks, tensors: dict[str, torch.Tensor] | None = None, hard: bool = False,
              zero_moments: bool = False) -> None:
        """Write the masked values into the module and DeepSpeed's fp32 master partition.

        Every rank must call this (safe_set writes only the local partition, but the getter used
        for `tensors` is collective).
        """
        from deepspeed.utils import safe_set_full_fp32_param
        from pruning import masked_tensors

        tensors = tensors if tensors is not None else self.full_tensors()
        new = masked_tensors(self.groups, masks, tensors, hard=hard)
        with torch.no_grad():
            for name, value in new.items():
                if name in self._params:
                    p = self._params[name]
                    p.data.copy_(value.to(p.dtype))
                    safe_set_full_fp32_param(p, value.to(p.device).float())  # no-op without ZeRO
                else:
                    self._buffers[name].copy_(value.to(self._buffers[name].dtype))
        if zero_moments:
            self._zero_moments(masks, new, tensors)

    def _zero_moments(self, masks, new: dict, old: dict) -> None:
        """Zero the optimiser moments where the mask zeroed weights (the same slices).

        Under ZeRO each get/set is a collective, so the set of keys must be the same on every
        rank: it is read from the optimiser's own state (one entry per local partition), which
        exists on every rank once a step was taken, and from nowhere rank-specific.
        """
        from pruning import masked_tensors

        for key in self._moment_keys():
            moments = {n: m for n in new if n in self._params and (m := self._moment(n, key)) is not None}
            for name, value in masked_tensors(self.groups, masks, moments, hard=True).items():
                self._set_moment(name, key, value)

    def _moment_keys(self) -> list[str]:
        opt = self._optimizer()
        if opt is None or getattr(self.engine, "global_steps", 1) == 0:
            return []  # no step yet: no moments to zero (identical on every rank)
        inner = getattr(opt, "optimizer", opt)
        for st in inner.state.values():
            return [k for k in MOMENT_KEYS if k in st]
        return []

    def _optimizer(self):
        return getattr(self.engine, "optimizer", None) if self.engine is not None else None

    def _moment(self, name: str, key: str) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_optimizer_state

        p = self._params[name]
        if hasattr(p, "_hp_mapping"):  # ZeRO 1/2: collective gather of the partitioned state
            value = safe_get_full_optimizer_state(p, key)
            return None if value is None else value.float().clone().cpu()
        opt = self._optimizer()
        inner = getattr(opt, "optimizer", opt)
        state = inner.state.get(p, {}) if inner is not None else {}
        return state[key].float().clone().cpu() if key in state else None

    def _set_moment(self, name: str, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        p = self._params[name]
        if hasattr(p, "_hp_mapping"):
            safe_set_full_optimizer_state(p, value.to(p.device).float(), key)
            return
        opt = self._optimizer()
        inner = getattr(opt, "optimizer", opt)
        inner.state[p][key].copy_(value.to(inner.state[p][key].dtype))

    # -- the whole event ---------------------------------------------------------------
    def event(self, choose: Callable[[dict[str, torch.Tensor]], Any], hard: bool = False,
              zero_moments: bool = False, previous=None) -> tuple[Any, dict[str, Any]]:
        """Decide, broadcast, check, apply; returns (masks, stats). Collective on every rank."""
        start = time.perf_counter()
        masks, tensors, hashes = self.decide(choose)
        self.apply(masks, tensors, hard=hard, zero_moments=zero_moments)
        seconds = time.perf_counter() - start
        stats = {
            "hash": hashes[0],  # every rank's hash equals rank 0's: decide() checked it
            "rank_hashes": hashes,
            "kept_fraction": {str(k): float(v) for k, v in masks.kept_fraction().items()},
            "churn": float(masks.churn(previous)) if previous is not None else None,
            "seconds": seconds,
        }
        return masks, stats


class GradientFreezer:
    """Holds pruned weights' gradients at zero (frozen masks) with tensor hooks.

    The hooks run before DeepSpeed reduces the gradients, so the zero reaches every partition;
    with zeroed weights and moments the optimiser then leaves the pruned slices at exactly 0.
    """

    def __init__(self, model: nn.Module, groups, masks):
        from pruning import masked_tensors

        params = dict(model.named_parameters())
        ones = {n: torch.ones_like(params[n], dtype=torch.float32, device="cpu") for n in groups.param_names() if n in params}
        keep = masked_tensors(groups, masks, ones, hard=True)
        self._handles = []
        for name, mult in keep.items():
            if name in params and bool((mult == 0).any()):
                gate = mult.to(params[name].device, params[name].dtype)
                self._handles.append(params[name].register_hook(lambda g, gate=gate: g * gate))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
