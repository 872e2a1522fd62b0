"""Layers that let a pruned model keep the exact function of the masked one.

A dense model never contains them (its state-dict keys stay torchvision's); compaction adds them
where a narrowed layer must still feed a full-width residual stream, or where a pruned channel's
constant output must be folded into its consumer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that can add the response to a constant all-ones input.

    Faithful compaction removes input channels that carried a constant value c. Their
    contribution, `conv(c * ones)`, is not a plain bias: zero padding makes it smaller near the
    borders. `const_kernel` (out, 1, kh, kw) holds the sum of `c * weight` over the removed
    channels, and the response is recomputed for each input size (a one-channel conv on a single
    image, ~1/in_channels of the layer's MACs).
    """

    def __init__(self, *args, const_input: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if const_input:
            kh, kw = self.kernel_size
            self.register_buffer("const_kernel", torch.zeros(self.out_channels, 1, kh, kw))
        else:
            self.const_kernel = None

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.const_kernel is None:
            return y
        ones = x.new_ones(1, 1, *x.shape[-2:])
        kernel = self.const_kernel.to(x.dtype)
        return y + F.conv2d(ones, kernel, None, self.stride, self.padding, self.dilation)


class Scatter(nn.Module):
    """Places a narrowed branch's channels at their positions in a wider stream.

    `forward(x, base)` returns `base` with `x` added at `index` (one `index_add`, no zero tensor);
    without `base` the other channels are zero. `bias` (width,) carries the constant that pruned
    channels still emit in the soft-masked model (faithful compaction); it is added everywhere.
    """

    def __init__(self, index: Sequence[int], width: int, bias: bool = False) -> None:
        super().__init__()
        if len(set(index)) != len(index) or (index and not 0 <= min(index) <= max(index) < width):
            raise ValueError(f"scatter index must be distinct positions in [0, {width})")
        self.width = width
        self.register_buffer("index", torch.tensor(list(index), dtype=torch.long))
        self.register_buffer("bias", torch.zeros(width) if bias else None)

    def forward(self, x: Tensor, base: Tensor | None = None) -> Tensor:
        if _channels_last(x):
            # On a channels_last tensor, index_add over dim 1 writes element by element and
            # returns NCHW (the next conv then reorders); over the last dim of the NHWC view it is
            # ~10x faster (bench_compact.py) and the output stays channels_last.
            n, _, h, w = x.shape
            base_nhwc = x.new_zeros(n, h, w, self.width) if base is None else base.permute(0, 2, 3, 1)
            out = base_nhwc.index_add(3, self.index, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            if base is None:
                base = x.new_zeros(x.shape[0], self.width, *x.shape[2:])
            out = base.index_add(1, self.index, x)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{len(self.index)} -> {self.width}, bias={self.bias is not None}"


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut of CIFAR ResNets, generalised to narrowed streams.

    The original subsamples by `stride` and zero-pads channels on both sides, so input channel
    `c` lands at output channel `c + pad`. Here input channel `src[i]` lands at output `dst[i]`;
    the dense model uses src = range(in), dst = range(pad, pad + in).
    """

    def __init__(self, src: Sequence[int], dst: Sequence[int], width: int, stride: int) -> None:
        super().__init__()
        if len(src) != len(dst):
            raise ValueError("option-A shortcut: src and dst must have the same length")
        self.width = width
        self.stride = stride
        self.src = list(src)
        self.dst = list(dst)
        self.register_buffer("_src", torch.tensor(self.src, dtype=torch.long), persistent=False)
        self.register_buffer("_dst", torch.tensor(self.dst, dtype=torch.long), persistent=False)

    def reset_index(self) -> None:
        """Rebuild the (non-persistent) index buffers from `src`/`dst`, e.g. after a model built
        on the meta device was given storage with `to_empty`."""
        device = self._src.device if self._src.device.type != "meta" else None
        self._src = torch.tensor(self.src, dtype=torch.long, device=device)
        self._dst = torch.tensor(self.dst, dtype=torch.long, device=device)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros(x.shape[0], self.width, *x.shape[2:])
        return out.index_copy(1, self._dst, x.index_select(1, self._src))

    def extra_repr(self) -> str:
        return f"{len(self.src)} -> {self.width}, stride={self.stride}"
