"""From a `PruningConfig` and a model to what a pruning event needs: the channel groups, and a
chooser that turns full tensors (or per-filter scores) and a rate into masks. The trainer's coordinator, `softprune
compact` and `softprune prune` all start here, so they cannot read the config differently."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from .config import PruningConfig
from .groups import GroupSet, build_groups
from .importance import FilterScores, score
from .masks import MaskSet
from .select import select

Chooser = Callable[[Mapping[str, Tensor] | FilterScores, float, int], MaskSet]


def groups_from_config(model: nn.Module, cfg: PruningConfig) -> GroupSet:
    """The channel groups the config's policy, patterns and preset select in `model`."""
    return build_groups(model, policy=cfg.policy, include=tuple(cfg.include), exclude=tuple(cfg.exclude),
                        preset=cfg.preset)


def make_chooser(groups: GroupSet, cfg: PruningConfig) -> Chooser:
    """`choose(tensors, rate, epoch) -> MaskSet`: score with the config's criterion, select at
    `rate` with its scope, floor and rounding. `tensors` are weights by name, or the criterion's
    `FilterScores` (what the coordinator hands over under ZeRO: per-filter norms, no gathered
    weights). Pure: the same tensors give the same masks."""

    def choose(tensors: Mapping[str, Tensor] | FilterScores, rate: float, epoch: int = 0) -> MaskSet:
        scores = score(groups, tensors, criterion=cfg.criterion)
        return select(groups, scores, rate, scope=cfg.scope, min_keep=cfg.min_keep, round_to=cfg.round_to,
                      epoch=epoch)

    return choose
