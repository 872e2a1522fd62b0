"""The pruning coordinator: rank 0 decides the masks, every rank applies the same masks.

Protocol of one pruning event (docs/design.md):
1. every rank reads the full fp32 tensors the groups touch (a collective under ZeRO); rank 0
   scores them, applies the rate and builds the masks. An exception there reaches every rank
   at once as the same error (`collectives.run_on_rank`), instead of leaving them in a broadcast;
2. rank 0 broadcasts the bit-packed masks; every rank unpacks them;
3. every rank writes the masked tensors into the module AND DeepSpeed's fp32 master copy (and
   optionally the optimiser moments) through `MasterCopy`, so the zeros survive the next `step()`;
4. every rank checks what it actually holds afterwards (`verify`): each pruned row must be zero
   in the module and in the master pieces this rank owns, and a digest of the zero rows it holds
   is compared across ranks. A rank whose apply went wrong is named in the error;
5. mask statistics (kept fraction per layer, churn, effective cost) go back to the caller.

Masks never depend on rank-local arithmetic: only rank 0's decision travels.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .collectives import RankDisagreement, gather_to_all, run_on_rank
from .master import MasterCopy


class MaskMismatchError(RankDisagreement):
    """After applying, ranks do not hold the masks they were sent."""


def dropped_rows(groups, masks, hard: bool) -> dict[str, torch.Tensor]:
    """Parameter/buffer name -> bool vector over dim 0: the rows the masks set to zero."""
    from pruning.apply import tensor_names
    from pruning.masks import conv_keep

    out = {}
    for conv, keep in conv_keep(groups, masks).items():
        for name in tensor_names(groups.member_of[conv][1], hard):
            out[name] = ~keep.bool()
    return out


def _rows_touched(flags: torch.Tensor, start: int, per_row: int, rows: int) -> torch.Tensor:
    """Rows (of `per_row` flat elements) in which a flat piece starting at `start` has a True
    flag: padded to whole rows and reduced, O(piece) with no index sort."""
    lead = start % per_row
    padded = torch.cat([flags.new_zeros(lead), flags, flags.new_zeros(-(lead + len(flags)) % per_row)])
    out = torch.zeros(rows, dtype=torch.bool)
    first = start // per_row
    touched = padded.view(-1, per_row).any(1)
    out[first:first + len(touched)] = touched
    return out


class Coordinator:
    """Owns the channel groups of one model (or engine) and runs pruning events on it."""

    def __init__(self, model: nn.Module, groups, engine=None):
        self.model = model  # the plain module (engine.module under DeepSpeed)
        self.groups = groups
        self.master = MasterCopy(engine)
        self.names = list(groups.param_names())
        self._params = dict(model.named_parameters())
        self._buffers = dict(model.named_buffers())

    # -- step 1: full fp32 tensors ------------------------------------------------------
    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Full fp32 values of every touched tensor. Collective under ZeRO 1/2: all ranks call it."""
        out = {}
        for name in self.names:
            if name in self._params:
                out[name] = self.master.full(self._params[name])
            else:
                out[name] = self._buffers[name].detach().float().cpu().clone()
        return out

    # -- steps 1-2: decide on rank 0, broadcast ---------------------------------------------
    def decide(self, choose: Callable[[dict[str, torch.Tensor]], Any]):
        """Rank 0 runs `choose(full_tensors) -> MaskSet`; every rank gets the same MaskSet back
        (or rank 0's exception as `RankFailure`). Returns (masks, tensors)."""
        from pruning import MaskSet

        tensors = self.full_tensors()
        data = run_on_rank(lambda: choose(tensors).pack(), src=0, what="mask selection")  # sync point
        return MaskSet.unpack(data, self.groups), tensors

    # -- step 3: apply to module, master copy and moments ---------------------------------
    def apply(self, masks, tensors: dict[str, torch.Tensor] | None = None, hard: bool = False,
              zero_moments: bool = False) -> dict[str, torch.Tensor]:
        """Write the masked values into the module and the master copy; returns them. Every rank
        must call this (the getters used for `tensors` and the moments are collective under ZeRO)."""
        from pruning import masked_tensors

        tensors = tensors if tensors is not None else self.full_tensors()
        new = masked_tensors(self.groups, masks, tensors, hard=hard)
        with torch.no_grad():
            for name, value in new.items():
                if name in self._params:
                    self.master.write(self._params[name], value)
                else:
                    self._buffers[name].copy_(value.to(self._buffers[name].dtype))
        if zero_moments:
            self._zero_moments(masks, new)
        return new

    def _zero_moments(self, masks, new: dict) -> None:
        """Zero the optimiser moments where the mask zeroed weights (the same rows). Under ZeRO
        each get/set is a collective, so the keys come from the optimiser's own state, which is
        the same on every rank once a step was taken."""
        from pruning import masked_tensors

        for key in self.master.moment_keys():
            moments = {n: m for n in new if n in self._params
                       and (m := self.master.moment(self._params[n], key)) is not None}
            for name, value in masked_tensors(self.groups, masks, moments, hard=True).items():
                self.master.set_moment(self._params[name], key, value)

    # -- step 3b: norm control (pruning/renorm.py) ------------------------------------------
    def renormalise(self, masks, targets: dict[str, float],
                    tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Scale the kept filters of masked convs to `targets` in the module, the master copy,
        the BN running stats (local to each rank) and the moments; returns the factors. Every
        rank computes the same factors from the same full tensors. Collective under ZeRO."""
        from pruning.renorm import (
            MOMENT_POWER,
            renorm_factors,
            rescaled_tensors,
            scale_rows,
        )

        tensors = tensors if tensors is not None else self.full_tensors()
        factors = renorm_factors(self.groups, masks, tensors, targets)
        new = rescaled_tensors(self.groups, factors, {**tensors, **self._buffers})
        with torch.no_grad():
            for name, value in new.items():
                if name in self._params:
                    self.master.write(self._params[name], value)
                else:
                    self._buffers[name].copy_(value)
        rows = {n: factors[n.rsplit(".", 1)[0]] for n in new if n in self._params}
        for key in self.master.moment_keys():
            for name, c in rows.items():
                moment = self.master.moment(self._params[name], key)
                if moment is not None and key in MOMENT_POWER:
                    self.master.set_moment(self._params[name], key, scale_rows(moment, c, MOMENT_POWER[key]))
        return factors

    # -- step 4: check what every rank holds ------------------------------------------------
    def held_state(self, masks, hard: bool) -> tuple[str, list[str]]:
        """(digest of the zero rows this rank holds, names whose pruned rows are not zero here).

        A row counts as zero only if it is zero in the module and in every master piece this
        rank owns, so a master copy that kept old values changes this rank's digest."""
        digest, bad = hashlib.sha256(), []
        for name, drop in sorted(dropped_rows(self.groups, masks, hard).items()):
            zero = self._zero_rows(name)
            digest.update(name.encode() + zero.numpy().tobytes())
            if bool((drop & ~zero).any()):
                bad.append(name)
        return digest.hexdigest()[:16], bad

    def _zero_rows(self, name: str) -> torch.Tensor:
        if name not in self._params:
            flat = self._buffers[name].detach()
            return (flat.reshape(flat.shape[0], -1) == 0).all(1).cpu()
        p = self._params[name]
        rows = p.shape[0]
        nonzero = (p.detach().reshape(rows, -1) != 0).any(1).cpu()
        per_row = p.numel() // rows
        for start, piece in self.master.held_pieces(p):
            nonzero |= _rows_touched(piece.detach().cpu() != 0, start, per_row, rows)
        return ~nonzero

    def verify(self, masks, hard: bool) -> list[str]:
        """Every rank's digest of what it holds; raise naming the ranks that are wrong. Sync point."""
        held = gather_to_all(self.held_state(masks, hard))
        bad = {r: names for r, (_, names) in enumerate(held) if names}
        if bad:
            raise MaskMismatchError("pruned rows are not zero after applying the masks on "
                                    + "; ".join(f"rank {r} ({', '.join(n[:3])})" for r, n in bad.items()))
        digests = [d for d, _ in held]
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise MaskMismatchError(f"ranks {differ} hold other zero rows than rank 0 after applying the "
                                    "masks: " + ", ".join(f"rank {r}={d}" for r, d in enumerate(digests)))
        return digests

    # -- the whole event ---------------------------------------------------------------
    def event(self, choose: Callable[[dict[str, torch.Tensor]], Any], hard: bool = False,
              zero_moments: bool = False, previous=None,
              norm_targets: dict[str, float] | None = None) -> tuple[Any, dict[str, Any]]:
        """Decide, broadcast, apply (then norm control, given `norm_targets`), verify; returns
        (masks, stats). Collective on every rank."""
        from pruning import regrowth
        from pruning.renorm import mean_factor

        start = time.perf_counter()
        masks, tensors = self.decide(choose)
        grown = regrowth(self.groups, previous, tensors) if previous is not None else {}  # before apply
        new = self.apply(masks, tensors, hard=hard, zero_moments=zero_moments)
        factors = self.renormalise(masks, norm_targets, {**tensors, **new}) if norm_targets else {}
        held = self.verify(masks, hard)
        stats = {
            "hash": masks.hash(),
            "rank_hashes": held,  # per rank: digest of the zero rows it holds (equal: verify checked)
            "kept_fraction": {str(k): float(v) for k, v in masks.kept_fraction().items()},
            "churn": float(masks.churn(previous)) if previous is not None else None,
            "churn_per_group": masks.churn_per_group(previous) if previous is not None else {},
            "regrowth": grown,  # of the previous event's pruned filters, since that event
            "norm_scale": mean_factor(factors) if norm_targets else None,  # < 1: filters had grown
            "seconds": time.perf_counter() - start,
        }
        return masks, stats


class GradientFreezer:
    """Holds pruned weights' gradients at zero (frozen masks) with tensor hooks.

    The hooks run before DeepSpeed reduces the gradients, so the zero reaches every partition;
    with zeroed weights and moments the optimiser then leaves the pruned slices at exactly 0.
    """

    def __init__(self, model: nn.Module, groups, masks):
        params = dict(model.named_parameters())
        self._handles = []
        for name, drop in dropped_rows(groups, masks, hard=True).items():
            if name in params and bool(drop.any()):
                p = params[name]
                gate = (~drop).to(p.device, p.dtype).view(-1, *([1] * (p.dim() - 1)))
                self._handles.append(p.register_hook(lambda g, gate=gate: g * gate))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


__all__ = ["Coordinator", "GradientFreezer", "MaskMismatchError", "dropped_rows"]
