"""The pruning coordinator: rank 0 decides the masks, every rank applies the same masks.

Protocol of one pruning event (docs/design.md):
1. every rank sums per-filter partial norms (|x| or x^2) over the fp32 master pieces it owns,
   and ONE all-reduce of a flat vector of all convs' partial sums gives every rank the exact
   per-filter norms (nothing travels at stage 0, where every rank holds whole masters). Rank 0
   scores them (`pruning.FilterScores`), applies the rate and builds the masks. FPGM needs whole
   filters: for it the conv weights are gathered (a collective per conv under ZeRO). An exception
   on rank 0 reaches every rank at once as the same error (`collectives.run_on_rank`), instead of
   leaving them in a broadcast;
2. rank 0 broadcasts the bit-packed masks; every rank unpacks them;
3. every rank zeroes the pruned rows in the module (a full replica) and in the pieces of
   DeepSpeed's fp32 master copy it owns (and optionally of the optimiser moments), through
   `MasterCopy.own_pieces`, so the zeros survive the next `step()`; norm control scales the kept
   rows the same way, with factors from the same reduced norms. No full tensor is gathered or set;
4. every rank checks what it actually holds afterwards (`verify`): each pruned row must be zero
   in the module and in the master pieces this rank owns, and a digest of the zero rows it holds
   is compared across ranks. A rank whose apply went wrong is named in the error;
5. mask statistics (kept fraction per layer, churn, effective cost) go back to the caller.

`Coordinator(..., gather=True)` runs the previous protocol instead (full fp32 tensors gathered in
step 1 and written back in step 3): kept to check the partial-sum path against, and for the
benchmark (benchmarks/bench_coordinator.py).

Masks never depend on rank-local arithmetic: only rank 0's decision travels.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .collectives import RankDisagreement, all_reduce_sum, gather_to_all, run_on_rank
from .master import MasterCopy, row_absmax, row_sums, scale_rows_, zero_rows

NORM_POWER = {"l1": 1, "l2": 2}  # criterion -> the power of |x| its per-filter norm sums


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


class Coordinator:
    """Owns the channel groups of one model (or engine) and runs pruning events on it.

    `criterion` is what the chooser scores with: `choose` gets that criterion's `FilterScores`
    (per-filter norms for l1/l2) or, for fpgm, the full conv weights. `gather=True`: the previous
    protocol, `choose` gets the full fp32 tensors and they are written back whole."""

    def __init__(self, model: nn.Module, groups, engine=None, criterion: str = "l2", gather: bool = False):
        from pruning.config import CRITERIA

        if criterion not in CRITERIA:
            raise ValueError(f"Coordinator: criterion must be one of {CRITERIA}, got {criterion!r}")
        self.model = model  # the plain module (engine.module under DeepSpeed)
        self.groups = groups
        self.criterion = criterion
        self.gather = gather
        self.master = MasterCopy(engine)
        self.names = list(groups.param_names())
        self._params = dict(model.named_parameters())
        self._buffers = dict(model.named_buffers())

    # -- step 1: full fp32 tensors (gather path, FPGM) ------------------------------------
    def full_tensors(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Full fp32 values of every touched tensor (or of `names`). Collective under ZeRO 1/2
        (one all-reduce of the whole tensor per parameter): all ranks call it."""
        out = {}
        for name in self.names if names is None else names:
            if name in self._params:
                out[name] = self.master.full(self._params[name])
            else:
                out[name] = self._buffers[name].detach().float().cpu().clone()
        return out

    # -- step 1: per-filter norms, one all-reduce -----------------------------------------
    def filter_norms(self, kinds: tuple[str, ...] = ("l2",)) -> dict[str, dict[str, torch.Tensor]]:
        """kind ("l1"/"l2") -> conv -> (out_channels,) fp32 CPU filter norms of the fp32 master.
        Under ZeRO 1/2 each rank sums over the pieces it owns and one all-reduce of one flat
        vector (kinds x filters floats) completes them; at stage 0 nothing travels. Every rank
        gets the same values. Collective under ZeRO 1/2: all ranks call it."""
        parts: dict[bool, list[tuple[str, str, torch.Tensor]]] = {True: [], False: []}  # partitioned?
        for kind in kinds:
            for conv in self.groups.convs():
                p = self._params[f"{conv}.weight"]
                rows, per_row = p.shape[0], p.numel() // p.shape[0]
                sums = torch.zeros(rows, device=p.device)
                for start, piece in self.master.own_pieces(p):
                    sums += row_sums(piece, start, per_row, rows, NORM_POWER[kind]).to(p.device)
                parts[self.master.partitioned(p)].append((kind, conv, sums))
        norms: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in kinds}
        for reduce, entries in parts.items():
            if not entries:
                continue
            flat = torch.cat([s for _, _, s in entries]).cpu()  # one copy back from the device
            if reduce:  # sync point: the one collective of this step (stage 0: none)
                flat = all_reduce_sum(flat)
            for (kind, conv, _), sums in zip(entries, flat.split([len(s) for _, _, s in entries])):
                norms[kind][conv] = sums.sqrt() if kind == "l2" else sums
        return norms

    def choice_inputs(self, norms: dict[str, dict[str, torch.Tensor]] | None = None):
        """What `choose` gets: full tensors (gather path), the full conv weights (fpgm), or the
        criterion's `FilterScores` (from `norms` when given). Collective under ZeRO 1/2."""
        from pruning.importance import FilterScores

        if self.gather:
            return self.full_tensors()
        if self.criterion not in NORM_POWER:  # fpgm needs whole filters
            return self.full_tensors([f"{conv}.weight" for conv in self.groups.convs()])
        norms = norms if norms is not None and self.criterion in norms else self.filter_norms((self.criterion,))
        return FilterScores(self.criterion, norms[self.criterion])

    # -- steps 1-2: decide on rank 0, broadcast ---------------------------------------------
    def decide(self, choose: Callable[[Any], Any], norms=None):
        """Rank 0 runs `choose(inputs) -> MaskSet` (`choice_inputs`); every rank gets the same
        MaskSet back (or rank 0's exception as `RankFailure`). Returns (masks, inputs)."""
        from pruning import MaskSet

        inputs = self.choice_inputs(norms)
        data = run_on_rank(lambda: choose(inputs).pack(), src=0, what="mask selection")  # sync point
        return MaskSet.unpack(data, self.groups), inputs

    # -- step 3: apply to module, master copy and moments ---------------------------------
    def apply(self, masks, tensors: dict[str, torch.Tensor] | None = None, hard: bool = False,
              zero_moments: bool = False) -> None:
        """Zero the pruned rows in the module, the master copy (and the moments). Local: each
        rank edits the pieces it owns. With `tensors` (or `gather=True`): the previous protocol,
        masked full tensors written back (collective under ZeRO 1/2)."""
        if tensors is not None or self.gather:
            self._apply_gathered(masks, tensors, hard, zero_moments)
            return
        keys = self.master.moment_keys() if zero_moments else []
        with torch.no_grad():
            for name, drop in dropped_rows(self.groups, masks, hard).items():
                rows = torch.nonzero(drop).flatten()
                if name not in self._params:
                    self._buffers[name].index_fill_(0, rows.to(self._buffers[name].device), 0)
                    continue
                p = self._params[name]
                if not self.master.module_is_master(p):
                    p.data.index_fill_(0, rows.to(p.device), 0)  # the module is a full replica
                per_row = p.numel() // p.shape[0]
                for key in [None, *keys]:
                    for start, piece in self.master.own_pieces(p, key):
                        zero_rows(piece, start, per_row, drop)

    def _apply_gathered(self, masks, tensors, hard: bool, zero_moments: bool) -> dict[str, torch.Tensor]:
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
    def renormalise(self, masks, targets: dict[str, float], tensors: dict[str, torch.Tensor] | None = None,
                    norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Scale the kept filters of masked convs to `targets` in the module, the master copy,
        the BN running stats (local to each rank) and the moments; returns the factors. Every
        rank computes the same factors from the same reduced L2 filter `norms` (conv -> vector;
        computed here when not given: one all-reduce under ZeRO) and scales its own pieces.
        With `tensors` (or `gather=True`): the previous protocol on full tensors."""
        if tensors is not None or self.gather:
            return self._renormalise_gathered(masks, targets, tensors)
        from pruning.renorm import MOMENT_POWER, factors_from_norms, scale_rows

        norms = norms if norms is not None else self.filter_norms(("l2",))["l2"]
        factors = factors_from_norms(self.groups, masks, norms, targets)
        keys = [k for k in self.master.moment_keys() if k in MOMENT_POWER]
        with torch.no_grad():
            for conv, c in factors.items():
                bn = self.groups.member_of[conv][1].bn
                for name in (f"{bn}.running_mean", f"{bn}.running_var"):
                    if name in self._buffers:  # local to each rank
                        buf = self._buffers[name]
                        buf.copy_(scale_rows(buf, c, 2 if name.endswith("var") else 1))
                for name in (f"{conv}.weight", f"{conv}.bias"):
                    if name not in self._params:
                        continue
                    p = self._params[name]
                    if not self.master.module_is_master(p):
                        p.data.copy_(scale_rows(p.data, c))
                    per_row = p.numel() // p.shape[0]
                    for key in [None, *keys]:
                        for start, piece in self.master.own_pieces(p, key):
                            scale_rows_(piece, start, per_row, c, 1 if key is None else MOMENT_POWER[key])
        return factors

    def _renormalise_gathered(self, masks, targets, tensors) -> dict[str, torch.Tensor]:
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
        t = (self._params[name] if name in self._params else self._buffers[name]).detach()
        rows, per_row = t.shape[0], t.numel() // t.shape[0]
        nonzero = row_absmax(t.reshape(-1), 0, per_row, rows) != 0  # NaN counts as nonzero
        if name in self._params:  # a buffer has no master copy
            for start, piece in self.master.held_pieces(self._params[name]):
                nonzero |= (row_absmax(piece, start, per_row, rows) != 0).to(nonzero.device)
        return ~nonzero.cpu()

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
    def event(self, choose: Callable[[Any], Any], hard: bool = False,
              zero_moments: bool = False, previous=None,
              norm_targets: dict[str, float] | None = None) -> tuple[Any, dict[str, Any]]:
        """Decide, broadcast, apply (then norm control, given `norm_targets`), verify; returns
        (masks, stats). Collective on every rank."""
        from pruning.renorm import mean_factor

        start = time.perf_counter()
        if self.gather:
            masks, grown, factors = self._event_gathered(choose, hard, zero_moments, previous, norm_targets)
        else:
            masks, grown, factors = self._event_local(choose, hard, zero_moments, previous, norm_targets)
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

    def _event_local(self, choose, hard, zero_moments, previous, norm_targets):
        """Per-filter norms (one all-reduce), rank 0's masks (one broadcast), local row edits.
        The L2 norms taken before the apply serve regrowth and norm control too: the apply only
        zeroes pruned rows, and those get factor 1 whatever their norm."""
        from pruning.apply import regrowth_from_norms

        kinds = tuple(dict.fromkeys(
            ([self.criterion] if self.criterion in NORM_POWER else [])
            + (["l2"] if previous is not None or norm_targets else [])))
        norms = self.filter_norms(kinds) if kinds else {}
        masks, _ = self.decide(choose, norms)
        grown = regrowth_from_norms(self.groups, previous, norms["l2"]) if previous is not None else {}
        self.apply(masks, hard=hard, zero_moments=zero_moments)
        factors = self.renormalise(masks, norm_targets, norms=norms["l2"]) if norm_targets else {}
        return masks, grown, factors

    def _event_gathered(self, choose, hard, zero_moments, previous, norm_targets):
        """The previous protocol: full tensors gathered, scored, masked and written back whole."""
        from pruning import regrowth

        masks, tensors = self.decide(choose)
        grown = regrowth(self.groups, previous, tensors) if previous is not None else {}  # before apply
        new = self._apply_gathered(masks, tensors, hard, zero_moments)
        factors = self._renormalise_gathered(masks, norm_targets, {**tensors, **new}) if norm_targets else {}
        return masks, grown, factors


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
