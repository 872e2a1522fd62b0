"""Pure-PyTorch filter pruning: groups, importance, schedules, masks, compaction, FLOPs.

The three questions live apart (Torch-Pruning's split): what is coupled (`build_groups`), how
important each slot is (`score`), when and how much (`make_schedule`, `select`); and selection
is apart from action (`apply_masks` / `masked_tensors` zero, `compact` cuts). Models outside the
zoo get their dataflow from torch.fx (`trace_meta`, `attach_meta`, `build_groups(example_inputs=)`).
"""

from .apply import apply_masks, masked_tensors, regrowth
from .chooser import groups_from_config, make_chooser
from .compact import compact
from .config import PruningConfig
from .cost import masked_cost
from .macs import Counts, count_flops, count_params
from .groups import Group, GroupSet, Member, build_groups
from .importance import filter_scores, score
from .io import load_compact, save_compact
from .masks import MaskSet, full_masks
from .presets import PRESETS, preset_names, preset_rates
from .schedules import is_prune_epoch, make_schedule
from .select import kept_count, select
from .trace import attach_meta, trace_meta

__all__ = [
    "PRESETS", "Counts", "Group", "GroupSet", "MaskSet", "Member", "PruningConfig", "apply_masks", "attach_meta",
    "build_groups", "compact", "count_flops", "count_params", "filter_scores", "full_masks",
    "groups_from_config", "is_prune_epoch", "kept_count", "load_compact", "make_chooser", "make_schedule",
    "masked_cost", "masked_tensors", "regrowth",
    "preset_names", "preset_rates", "save_compact", "score", "select", "trace_meta",
]
