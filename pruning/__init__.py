"""Pure-PyTorch filter pruning: groups, importance, schedules, masks, compaction, FLOPs."""

from .flops import Counts, count_flops, count_params

__all__ = ["Counts", "count_flops", "count_params"]
