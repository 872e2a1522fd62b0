"""Selection: from slot scores and a rate to masks (which channels), kept apart from the action
(zeroing or cutting them) so one selection drives soft masking and compaction alike.

Rounding follows the papers: a layer of N filters at rate P loses floor(N*P) of them (a 1e-9
tolerance absorbs binary fractions such as 0.7*10 = 7.000000000000001). Ties are broken by the
lower channel index, through a stable sort, so every rank would pick the same channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .groups import GroupSet
from .masks import MaskSet

from .config import SCOPES

# round_to="auto" (the default): kept counts of groups of >= AUTO_MIN_CHANNELS channels go up to a
# multiple of AUTO_MULTIPLE, narrower groups are not rounded. Measured on this project's CPU with
# ResNet-50 at P=0.3 (benchmarks/bench_compact.py, docs/results.md "Compact latency"): kept counts
# rounded to 4 or 8 ran faster than unrounded ones in every runtime and batch although they keep
# 3-5% more MACs; 4 and 8 were within the noise of each other, and NVIDIA's tensor cores want
# bf16/fp16 channel counts in multiples of 8. Leaving the 64-channel convs unrounded (a 128-channel
# floor) cost up to 17% of the compact model's speed: ResNet-50's first stage runs at the largest
# resolution. Below 64 channels a multiple of 8 moves a layer's rate by more than an eighth of
# its filters (a 16-channel conv at rate 0.4 would keep all 16), so those stay exact.
AUTO_MULTIPLE, AUTO_MIN_CHANNELS = 8, 64
RoundTo = int | str  # a multiple >= 1, or "auto"


def multiple_for(n: int, round_to: RoundTo) -> int:
    """The multiple a group of `n` channels rounds its kept count up to."""
    if round_to == "auto":
        return AUTO_MULTIPLE if n >= AUTO_MIN_CHANNELS else 1
    return int(round_to)


def _round_up(kept: int, n: int, round_to: RoundTo) -> int:
    m = multiple_for(n, round_to)
    return min(n, -(-kept // m) * m)


def _preset_round(round_to: RoundTo) -> RoundTo:
    """A published configuration (a preset's per-layer rate) keeps its exact counts unless a
    multiple is asked for explicitly."""
    return 1 if round_to == "auto" else round_to


def pruned_count(n: int, rate: float) -> int:
    return int(math.floor(n * rate + 1e-9))


def kept_count(n: int, rate: float, min_keep: int = 1, round_to: RoundTo = 1) -> int:
    """Filters a group of `n` keeps at `rate`: n - floor(n*rate), at least `min_keep`, rounded up
    to a multiple of `round_to` (see `multiple_for` for "auto"), at most n."""
    return _round_up(max(n - pruned_count(n, rate), min(min_keep, n)), n, round_to)


def _keep_top(s: Tensor, kept: int) -> Tensor:
    order = torch.argsort(s, stable=True)  # ascending; equal scores: lower index pruned first
    keep = torch.ones(len(s), dtype=torch.bool)
    keep[order[: len(s) - kept]] = False
    return keep


def _check(groups: GroupSet, scores: Mapping[str, Tensor], rate: float, min_keep: int, round_to: RoundTo):
    if not 0.0 <= rate < 1.0 and not (rate == 1.0 and any(g.rate is not None for g in groups)):
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if min_keep < 1:
        raise ValueError(f"min_keep must be >= 1, got {min_keep}")
    if round_to != "auto" and not (isinstance(round_to, int) and round_to >= 1):
        raise ValueError(f"round_to must be an integer >= 1 or 'auto', got {round_to!r}")
    for g in groups:
        if g.name not in scores or len(scores[g.name]) != g.size:
            raise ValueError(f"scores for group {g.name!r} missing or of the wrong length")


def select(groups: GroupSet, scores: Mapping[str, Tensor], rate: float, scope: str = "layer",
           min_keep: int = 1, round_to: RoundTo = 1, epoch: int = 0) -> MaskSet:
    """Masks keeping the highest-scoring slots. `scope="layer"`: each group loses floor(N*rate);
    a group with a preset rate loses floor(N * group.rate * rate) (the schedule then runs to 1.0).
    `scope="global"`: one ranking over all groups of scores normalised by their group's mean,
    each group keeping at least `min_keep`; the total pruned is floor(total * rate)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    _check(groups, scores, rate, min_keep, round_to)
    if scope == "layer":
        keep = {}
        for g in groups:
            r, rt = (rate, round_to) if g.rate is None else (g.rate * rate, _preset_round(round_to))
            keep[g.name] = _keep_top(scores[g.name].cpu(), kept_count(g.size, r, min_keep, rt))
        return MaskSet(epoch, _stream_floor(groups, scores, keep, min_keep))
    if any(g.rate is not None for g in groups):
        raise ValueError("global scope cannot honour a preset's per-layer rates; use scope='layer'")
    return MaskSet(epoch, _stream_floor(groups, scores, _global(groups, scores, rate, min_keep, round_to),
                                        min_keep))


def _stream_floor(groups: GroupSet, scores, keep: dict[str, Tensor], min_keep: int) -> dict[str, Tensor]:
    """A coupled group spanning option-A-linked streams keeps at least `min_keep` channels of each
    stream, not only of the group: the narrow first stage maps onto a third of the slots, and
    emptying it would leave a zero-width layer."""
    for g in groups:
        for slot in g.stream_slot.values():
            k = keep[g.name]
            need = min(min_keep, len(slot)) - int(k[slot].sum())
            if need > 0:
                s = scores[g.name].cpu()[slot].masked_fill(k[slot], float("-inf"))
                k[slot[torch.argsort(s, descending=True, stable=True)[:need]]] = True
    return keep


def _global(groups: GroupSet, scores, rate: float, min_keep: int, round_to: RoundTo) -> dict[str, Tensor]:
    normed = []
    for g in groups:
        s = scores[g.name].cpu().float()
        # `score` already gives each member conv mean 1 (a no-op for single convs, close to one
        # for coupled groups); kept for scores from elsewhere, whose scale `select` cannot know
        s = s / s.mean().clamp_min(1e-12)
        floor = min(min_keep, g.size)
        if floor:  # the floor's best slots can never be pruned
            s = s.clone()
            s[torch.argsort(s, descending=True, stable=True)[:floor]] = float("inf")
        normed.append(s)
    flat = torch.cat(normed)
    total = len(flat)
    n_prune = min(pruned_count(total, rate), int(torch.isfinite(flat).sum()))
    keep = torch.ones(total, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:n_prune]] = False
    out = dict(zip(groups.names(), torch.split(keep, groups.sizes())))
    for g, s in zip(groups, normed):  # round each group's kept count up, re-keeping its best pruned slots
        if multiple_for(g.size, round_to) > 1:
            out[g.name] = _keep_top(s, _round_up(int(out[g.name].sum()), g.size, round_to))
    return {k: v.clone() for k, v in out.items()}
