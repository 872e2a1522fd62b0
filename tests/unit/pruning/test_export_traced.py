"""Exporting compacted *traced* models (fx GraphModules: depthwise, concat, squeeze-excite,
grouped convs, BatchNorm on a concat or stream): the fold keeps their function, and the exported
files run in a process that has none of this project on its path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import Scatter
from pruning import attach_meta, build_groups, compact
from pruning.export import SUFFIX, write
from pruning.fold import AddBase, ChannelGather, fold_for_export
from tests.unit.launch.test_export import _run_isolated

from .helpers import random_masks
from .test_trace_patterns import PATTERNS, _image, _model

SIZE = 16


def _compacted(which: str, policy: str, mode: str):
    model = _model(which)
    groups = build_groups(model, policy, example_inputs=_image(SIZE))
    attach_meta(model, _image(SIZE))
    small, _ = compact(model, groups, random_masks(groups, 0.4, seed=9), mode)
    return small.eval()


@pytest.mark.parametrize("mode", ["hard", "faithful"])
@pytest.mark.parametrize("policy", ["sfp", "coupled"])
@pytest.mark.parametrize("which", list(PATTERNS))
def test_fold_of_a_traced_compact_model_keeps_its_function(which, policy, mode):
    small = _compacted(which, policy, mode)
    assert isinstance(small, torch.fx.GraphModule) and not hasattr(small, "softprune_meta")
    folded = fold_for_export(small)
    convs_with_bn = sum(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert left < convs_with_bn  # conv/BN pairs were found in the graph and folded
    assert left == {"mobilenet": 0, "dense": 1, "next": 1}[which]  # only the BN on a concat / stream
    x = torch.randn(3, 3, SIZE + 1, SIZE - 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = small(x), folded(x)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["hard", "faithful"])
@pytest.mark.parametrize("which", ["mobilenet", "next"])  # the patterns whose sfp compaction scatters
def test_traced_scatters_fold_into_their_convs(which, mode):
    small = _compacted(which, "sfp", mode)
    scatters = sum(isinstance(m, Scatter) for m in small.modules())
    folded = fold_for_export(small, scatter_into_conv=True)
    assert scatters > 0 and sum(isinstance(m, AddBase) for m in folded.modules()) == scatters
    x = torch.randn(3, 3, SIZE + 1, SIZE - 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), small(x), rtol=0, atol=1e-4)


class _Scattered(nn.Module):
    """conv -> BN -> Scatter; the kept channels cross the conv's group boundary (1 of group 0
    lands in group 1's half of the width), so a widened grouped conv would read the wrong inputs."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.scatter = Scatter([0, 3, 4, 5], 6)

    def forward(self, x):
        return self.scatter(self.bn(self.conv(x)))


class _ScatterLeaf(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Scatter) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("groups, widened", [(1, True), (2, False)])
def test_a_grouped_conv_keeps_its_gather(groups, widened):
    torch.manual_seed(groups)
    root = _Scattered(groups)
    root.bn.running_mean.uniform_(-1, 1)
    root.bn.running_var.uniform_(0.5, 2)
    gm = torch.fx.GraphModule(root, _ScatterLeaf().trace(root)).eval()
    folded = fold_for_export(gm, scatter_into_conv=True)
    kinds = {type(m) for m in folded.modules()}
    assert (AddBase in kinds) == widened and (ChannelGather in kinds) != widened
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), gm(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_exported_traced_models_run_without_the_project(fmt, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: small convolutions lose to thread start-up
    try:
        _export_both(fmt, tmp_path)
    finally:
        torch.set_num_threads(before)


def _export_both(fmt: str, tmp_path) -> None:
    for which in ("mobilenet", "dense"):
        small = _compacted(which, "sfp", "faithful")
        path = write(fold_for_export(small), fmt, tmp_path / f"{which}{SUFFIX[fmt]}", SIZE)
        x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = small(x)
        torch.testing.assert_close(_run_isolated(fmt, path, x, tmp_path), want, rtol=0, atol=1e-4)
