"""Where DeepSpeed keeps each parameter's fp32 value and optimiser moments, for every setup.

A mask written only into the module is undone by the next `step()` whenever the optimiser steps
a separate fp32 master copy and copies it back. Three layouts exist with a torch optimiser:
- ZeRO 1/2 (and DeepSpeed's BF16_Optimizer): each rank owns a fragment of a flat fp32 partition,
  reached through `param._hp_mapping` and DeepSpeed's `safe_*` getters/setters (collective);
- stage 0 with bf16/fp16 (`FP16_UnfusedOptimizer`): one fp32 clone per parameter in
  `optimizer.fp32_groups`, parallel to `optimizer.fp16_groups`; the safe setters do not reach it;
- stage 0 fp32: the module parameter is the master and the optimiser's state is keyed by it.
`MasterCopy` hides the difference: read the full fp32 value, write it everywhere it lives, read
and write moments, and list the fp32 pieces this rank holds (for the divergence check), or hand
out this rank's own master and moment pieces (flat views) for row arithmetic without collectives.

The row arithmetic (`row_blocks`, `row_sums`, `row_absmax`, `zero_rows`, `scale_rows_`) works on a flat piece
that starts anywhere in a parameter flattened row-major (a ZeRO fragment may start and end in the
middle of a filter): a filter is one row of `per_row` elements.
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

    # -- this rank's own pieces, no collectives --------------------------------------------
    def module_is_master(self, p: nn.Parameter) -> bool:
        """Stage 0 fp32: the optimiser steps the module parameter itself."""
        return not self.partitioned(p) and id(p) not in self._clone

    def own_pieces(self, p: nn.Parameter, key: str | None = None) -> list[tuple[int, torch.Tensor]]:
        """(flat offset, flat writable view) of the fp32 master of `p` (or of its moment `key`) on
        this rank: its ZeRO fragment (none if this rank's partition holds no part of `p`), or the
        whole stage-0 clone or module parameter. Together over ranks they hold every element once."""
        if self.partitioned(p):
            mapping = p._hp_mapping
            if mapping is None:
                return []
            if key is None:
                return [(mapping.lp_fragment_address.start, mapping.get_hp_fragment().view(-1))]
            moments = mapping.optim_fragment or {}  # linked at the first step
            return [(mapping.lp_fragment_address.start, moments[key].view(-1))] if key in moments else []
        master = self._master(p)
        if key is None:
            return [(0, master.data.view(-1))]
        state = self.inner.state.get(master, {}) if self.inner is not None else {}
        return [(0, state[key].view(-1))] if key in state else []

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


# -- row arithmetic on flat pieces -----------------------------------------------------------
def row_blocks(start: int, numel: int, per_row: int) -> list[tuple[int, int, int, int]]:
    """The flat piece [start, start + numel) of a tensor with `per_row` elements per row, cut at
    row boundaries into (first row, lo, hi, rows) blocks of piece offsets: a partial first row,
    the whole rows, a partial last row. Block [lo, hi) views as (rows, (hi - lo) // rows)."""
    blocks, pos, row = [], 0, start // per_row
    lead = start % per_row
    if lead and numel:
        pos = min(per_row - lead, numel)
        blocks.append((row, 0, pos, 1))
        row += 1
    whole = (numel - pos) // per_row
    if whole:
        blocks.append((row, pos, pos + whole * per_row, whole))
        pos, row = pos + whole * per_row, row + whole
    if pos < numel:
        blocks.append((row, pos, numel, 1))
    return blocks


def row_sums(piece: torch.Tensor, start: int, per_row: int, rows: int, power: int) -> torch.Tensor:
    """Per row, the sum of |x| (power 1) or x^2 (power 2) over the elements of the row that
    `piece` holds: partial L1 / squared-L2 filter norms, fp32 on the piece's device. (A norm
    kernel, not abs()/square() then sum: no piece-sized temporary, ~10x faster on CPU.)"""
    out = torch.zeros(rows, dtype=torch.float32, device=piece.device)
    for row, lo, hi, k in row_blocks(start, piece.numel(), per_row):
        norm = torch.linalg.vector_norm(piece[lo:hi].float().view(k, -1), ord=power, dim=1)
        out[row:row + k] += norm if power == 1 else norm.square()
    return out


def row_absmax(piece: torch.Tensor, start: int, per_row: int, rows: int) -> torch.Tensor:
    """Per row, max |x| over the elements of the row that `piece` holds (0 for rows it does not
    reach; NaN propagates): a row is all zero here exactly where this is 0. (abs() then amax
    measured ~3.5x faster on CPU than `(x != 0).any(1)` and ~10x than an inf-norm kernel.)"""
    out = torch.zeros(rows, dtype=piece.dtype, device=piece.device)
    for row, lo, hi, k in row_blocks(start, piece.numel(), per_row):
        out[row:row + k] = torch.maximum(out[row:row + k], piece[lo:hi].view(k, -1).abs().amax(1))
    return out


def zero_rows(piece: torch.Tensor, start: int, per_row: int, drop: torch.Tensor) -> None:
    """Zero, in place, the elements of `piece` that lie in rows where `drop` (bool, per row) is
    set; only those rows are touched."""
    for row, lo, hi, k in row_blocks(start, piece.numel(), per_row):
        idx = torch.nonzero(drop[row:row + k]).flatten()
        if len(idx):
            piece[lo:hi].view(k, -1).index_fill_(0, idx.to(piece.device), 0)


def scale_rows_(piece: torch.Tensor, start: int, per_row: int, c: torch.Tensor, power: int = 1) -> None:
    """Multiply, in place, the elements of `piece` in row i by c[i] ** power (fp32 arithmetic, as
    `pruning.renorm.scale_rows` on the whole tensor)."""
    f = c.to(piece.device, torch.float32).pow(power)
    for row, lo, hi, k in row_blocks(start, piece.numel(), per_row):
        piece[lo:hi].view(k, -1).mul_(f[row:row + k, None])  # computed in fp32, stored in piece's dtype
