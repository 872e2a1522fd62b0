"""A compacted (or dense) model rewritten with standard operators only, for export.

`fold_for_export(model)` returns an eval-mode copy in which:
  * every conv's BatchNorm is folded into the conv (a plain `nn.Conv2d` with a bias; the BN
    becomes `nn.Identity`);
  * a faithful conv's `const_kernel` stays a convolution of an all-ones image: its response is a
    constant only away from the borders (zero padding makes it smaller there), so folding it into
    the bias would not be exact. It is scaled by the folded BN like the weights;
  * `Scatter` and `ShortcutA` become one channel gather: the narrowed input gets one extra zero
    channel and every output channel picks its source channel or that zero (ONNX `Gather`, no
    scatter op), then the residual base and the scatter's bias are added;
  * or, with `scatter_into_conv=True`, a Scatter that places one conv's output becomes part of
    that conv: zero filters at the positions it leaves empty, its bias in the conv's bias, and a
    plain add of the residual base. This costs the conv (width - kept) more filters, but the
    graph keeps the dense model's shape. onnxruntime needs that: a Gather on the channel axis
    takes every block out of its channel-blocked conv layout and back. The sfp-compacted
    ResNet-50 ran 1.2-1.3x faster this way at batch 8 (docs/results.md, "Compact latency").
A BatchNorm that follows no conv (one on a stream or a concat, in a traced model) stays: ONNX's
BatchNormalization is a standard op. The conv/BN pairs come from the zoo's declared metadata, or,
for a traced model's compacted copy (an fx GraphModule), from its graph.
The copy computes the same function as `model` in eval mode (within float rounding); it no longer
has a spec (it is for running, not for rebuilding or pruning further).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from models import Scatter, ShortcutA


class FoldedConv(nn.Conv2d):
    """Conv + BN in one conv with a bias; `const_kernel` (if any) adds its ones-image response."""

    def __init__(self, conv: nn.Conv2d, const_kernel: Tensor | None) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
        self.register_buffer("const_kernel", const_kernel)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.const_kernel is None:
            return y
        ones = torch.ones_like(x[:1, :1])  # one image, one channel: ~1/in_channels of the MACs
        return y + F.conv2d(ones, self.const_kernel, None, self.stride, self.padding, self.dilation)


class ChannelGather(nn.Module):
    """`out[:, j] = x[:, source[j]]` with source == len(x channels) meaning zero, plus `base` and
    `bias`. Replaces Scatter (`source` = inverse of its index) and ShortcutA (also subsamples)."""

    def __init__(self, source: Tensor, stride: int = 1, bias: Tensor | None = None) -> None:
        super().__init__()
        self.stride = stride
        self.register_buffer("source", source)
        self.register_buffer("bias", None if bias is None else bias.view(1, -1, 1, 1).clone())

    def forward(self, x: Tensor, base: Tensor | None = None) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        padded = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
        out = padded.index_select(1, self.source)
        if base is not None:
            out = out + base
        if self.bias is not None:
            out = out + self.bias
        return out


def _inverse(dst: Tensor, src: Tensor, width: int, n_in: int) -> Tensor:
    """For each of `width` output channels: the input channel landing there, or `n_in` (zero)."""
    source = torch.full((width,), n_in, dtype=torch.long)
    source[dst.long()] = src.long()
    return source


class AddBase(nn.Module):
    """What is left of a Scatter once its conv writes the full width: the residual add."""

    def forward(self, x: Tensor, base: Tensor | None = None) -> Tensor:
        return x if base is None else x + base


def _widened(conv: nn.Conv2d, scatter: Scatter) -> FoldedConv:
    """`scatter(conv(x))` as one conv: conv's filters at scatter's index, zero filters elsewhere,
    and scatter's bias (added at every position) in the conv's bias."""
    index, width = scatter.index.to(conv.weight.device), scatter.width
    shell = nn.Conv2d(conv.in_channels, width, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      conv.groups, bias=False, padding_mode=conv.padding_mode)
    kernel = getattr(conv, "const_kernel", None)
    if kernel is not None:
        kernel = kernel.new_zeros(width, *kernel.shape[1:]).index_copy(0, index, kernel)
    new = FoldedConv(shell, kernel).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_().index_copy_(0, index, conv.weight)
        new.bias.zero_()
        if scatter.bias is not None:
            new.bias.copy_(scatter.bias)
        if conv.bias is not None:
            new.bias.index_add_(0, index, conv.bias)
    return new


def _scatter_feeders(model: nn.Module, pairs: dict[str, str]) -> dict[str, str]:
    """Scatter module name -> the ungrouped conv whose output (through its BN) only it reads."""
    modules = dict(model.named_modules())
    if isinstance(model, fx.GraphModule):
        bn_conv = {bn: conv for conv, bn in pairs.items()}
        found = {}
        for node in model.graph.nodes:
            src = node.args[0] if node.op == "call_module" and node.args else None
            if not isinstance(modules.get(node.target), Scatter) or not isinstance(src, fx.Node) \
                    or src.op != "call_module" or len(src.users) != 1:
                continue
            conv = bn_conv.get(src.target, src.target if isinstance(modules[src.target], nn.Conv2d) else None)
            if conv is not None:
                found[node.target] = conv
    else:  # the zoo declares it: softprune_scatters maps the conv to the scatter that places it
        name_of = {id(m): n for n, m in modules.items()}
        found = {name_of[id(s)]: conv for conv, s in getattr(model, "softprune_scatters", dict)().items()}
    return {s: c for s, c in found.items() if modules[c].groups == 1}


def _from_scatter(mod: Scatter) -> ChannelGather:
    index = mod.index.cpu()
    source = _inverse(index, torch.arange(len(index)), mod.width, len(index))
    bias = None if mod.bias is None else mod.bias.detach().cpu()
    return ChannelGather(source, 1, bias)


def _from_shortcut(mod: ShortcutA, n_in: int) -> ChannelGather:
    source = _inverse(torch.tensor(mod.dst), torch.tensor(mod.src), mod.width, n_in)
    return ChannelGather(source, mod.stride)


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> FoldedConv:
    """Exact in eval mode: BN(conv(x) + r) = s * conv(x) + s * r + (beta - s * mean); float64
    arithmetic so that folding adds no rounding beyond float32's."""
    dtype = conv.weight.dtype
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    kernel = getattr(conv, "const_kernel", None)
    if kernel is not None:
        kernel = (kernel.double() * scale.view(-1, 1, 1, 1)).to(dtype)
    new = FoldedConv(conv, kernel)
    with torch.no_grad():
        new.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype))
        new.bias.copy_(((bias - bn.running_mean.double()) * scale + bn.bias.double()).to(dtype))
    return new.to(conv.weight.device)


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _shortcut_inputs(model: nn.Module) -> dict[str, int]:
    """Input channel count of every ShortcutA (its module does not record it), from one pass."""
    widths: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: widths.__setitem__(n, a[0].shape[1]))
             for n, m in model.named_modules() if isinstance(m, ShortcutA)]
    if hooks:
        p = next(model.parameters())
        meta = getattr(model, "softprune_meta", None)
        size = min(meta.input_size, 32) if meta is not None and isinstance(meta.input_size, int) else 32
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, 3, size, size, dtype=p.dtype, device=p.device))
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
    return widths


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """conv -> the BatchNorm2d that reads it alone: declared, or read off an fx graph."""
    meta = getattr(model, "softprune_meta", None)
    if meta is not None:
        return dict(meta.bn)
    if not isinstance(model, fx.GraphModule):
        raise ValueError(f"export: {type(model).__name__} has neither softprune_meta nor an fx graph")  # noqa: TRY004 - one-line user error
    modules = dict(model.named_modules())
    pairs = {}
    for node in model.graph.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        if isinstance(modules.get(node.target), nn.BatchNorm2d) and isinstance(src, fx.Node) \
                and src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d) and len(src.users) == 1:
            pairs[src.target] = node.target
    return pairs


def fold_for_export(model: nn.Module, scatter_into_conv: bool = False) -> nn.Module:
    """An eval-mode copy of `model` (a zoo or traced model, dense or compacted) with standard ops
    only. `scatter_into_conv`: widen the conv that feeds each Scatter instead of gathering (above)."""
    folded = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(folded)
    modules = dict(folded.named_modules())
    for conv, bn in pairs.items():
        if isinstance(modules[bn], nn.BatchNorm2d):
            _set(folded, conv, _folded_conv(modules[conv], modules[bn]))
            _set(folded, bn, nn.Identity())
    n_in = _shortcut_inputs(model)
    feeders = _scatter_feeders(model, pairs) if scatter_into_conv else {}
    for name, mod in modules.items():
        if isinstance(mod, Scatter) and name in feeders:
            _set(folded, feeders[name], _widened(folded.get_submodule(feeders[name]), mod))
            _set(folded, name, AddBase())
        elif isinstance(mod, Scatter):
            _set(folded, name, _from_scatter(mod))
        elif isinstance(mod, ShortcutA):
            _set(folded, name, _from_shortcut(mod, n_in[name]))
    for name, mod in folded.named_modules():  # what the rewrite must not leave behind
        if isinstance(mod, (Scatter, ShortcutA)) or name in pairs.values() and isinstance(mod, nn.BatchNorm2d):
            raise ValueError(f"export: {name} ({type(mod).__name__}) could not be folded")
    return folded
