from __future__ import annotations

import torch
import torch.nn.functional as F

from models.layers import Conv2d, Scatter, ShortcutA


def test_const_kernel_equals_conv_of_constant_channels_with_zero_padding():
    torch.manual_seed(0)
    w = torch.randn(5, 4, 3, 3)
    const = torch.tensor([0.0, 1.5, 0.0, -2.0])  # channels 1 and 3 are constant maps
    x = torch.randn(2, 4, 9, 7)
    x[:, 1], x[:, 3] = 1.5, -2.0
    want = F.conv2d(x, w, stride=2, padding=1)
    conv = Conv2d(2, 5, 3, 2, 1, bias=False, const_input=True)
    conv.weight.data = w[:, [0, 2]].clone()
    conv.const_kernel.copy_((w * const.view(1, 4, 1, 1)).sum(1, keepdim=True))
    torch.testing.assert_close(conv(x[:, [0, 2]]), want, rtol=1e-5, atol=1e-5)


def test_scatter_adds_into_base_and_bias():
    s = Scatter([2, 0], width=4, bias=True)
    s.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.ones(1, 2, 1, 1) * torch.tensor([10.0, 20.0]).view(1, 2, 1, 1)
    base = torch.zeros(1, 4, 1, 1)
    assert s(x, base).flatten().tolist() == [21.0, 2.0, 13.0, 4.0]


def test_shortcut_a_dense_matches_option_a_padding():
    x = torch.randn(2, 16, 8, 8)
    ref = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    sc = ShortcutA(range(16), [c + 8 for c in range(16)], width=32, stride=2)
    torch.testing.assert_close(sc(x), ref)


def test_scatter_on_channels_last_input_matches_nchw_and_keeps_the_layout():
    g = torch.Generator().manual_seed(0)
    s = Scatter([5, 1, 3], width=6, bias=True)
    s.bias.copy_(torch.randn(6, generator=g))
    x = torch.randn(2, 3, 4, 5, generator=g)
    base = torch.randn(2, 6, 4, 5, generator=g)
    for b in (None, base):
        want = s(x, b)
        got = s(x.to(memory_format=torch.channels_last), None if b is None else b.to(memory_format=torch.channels_last))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
