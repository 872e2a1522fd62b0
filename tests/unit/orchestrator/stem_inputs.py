"""What layout the batches a model is fed arrive in, seen at its stem conv (any module, any model)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def stem_batches() -> Iterator[list[tuple[bool, bool]]]:
    """(module.training, NHWC) of every call of a 3-channel-input conv on more than one image while
    the block runs. count_flops' one-image probes (MACs kept) are not batches: left out."""
    seen: list[tuple[bool, bool]] = []

    def note(module, args):
        x = args[0]
        if isinstance(module, torch.nn.Conv2d) and x.dim() == 4 and x.shape[1] == 3 and x.shape[0] > 1:
            seen.append((module.training, x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(note)
    try:
        yield seen
    finally:
        handle.remove()
