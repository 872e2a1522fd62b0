"""Coupled groups combine scores of convs of different width, fan-in and scale: each member's
scores are normalised before they are combined, so no member decides alone and no stage empties.

Weights are "trained-looking" (`trained_looking`): at random init every criterion already differs
between stages by fan-in or width (L1, FPGM), and training adds a scale of its own to every conv.
"""

from __future__ import annotations

import functools

import pytest
import torch

import models
from pruning import build_groups, kept_count, score, select
from pruning.importance import CRITERIA
from pruning.select import SCOPES

from .helpers import dense_model, trained_looking

ALL = models.list_models()
RATE = 0.3


@functools.lru_cache(maxsize=1)  # the criteria of one model run one after the other
def _weights(name: str, seed: int) -> dict[str, torch.Tensor]:
    return trained_looking(dense_model(name), seed)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("name", ALL)
def test_coupled_groups_do_not_collapse_a_stream(name, criterion):
    """Per-layer scope: every stream of a coupled group keeps about what per-layer pruning (the
    `sfp` policy, floor rule) keeps of each of its convs. Before members were normalised, the
    option-A group of the CIFAR ResNets kept 1 of layer1's 16 channels (L1, FPGM)."""
    model = dense_model(name)
    groups = build_groups(model, "coupled")
    masks = select(groups, score(groups, _weights(name, 0), criterion), RATE)
    for g in groups:
        for stream, slot in (g.stream_slot or {g.name: torch.arange(g.size)}).items():
            width, kept = len(slot), int(masks.keep[g.name][slot].sum())
            floor_rule = kept_count(width, RATE)
            assert kept >= floor_rule - width // 4, (
                f"{name} {criterion}: {g.name} keeps {kept} of {stream}'s {width} channels; "
                f"per-layer pruning keeps {floor_rule}")


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("name", ALL)
def test_rescaling_a_conv_changes_no_score(name, criterion):
    """BN after every conv makes the network indifferent to a conv's weight scale, so scores must
    be too: each conv rescaled by its own power of two (exact in floating point) gives the same
    scores, bit for bit, and the same masks in either scope."""
    model = dense_model(name)
    groups = build_groups(model, "coupled")
    tensors = _weights(name, 1)
    rescaled = {n: t * 2.0 ** (i % 9 - 4) if t.dim() == 4 else t for i, (n, t) in enumerate(tensors.items())}
    assert any(not torch.equal(rescaled[n], t) for n, t in tensors.items())
    a, b = score(groups, tensors, criterion), score(groups, rescaled, criterion)
    for g in groups:
        assert torch.equal(a[g.name], b[g.name]), f"{name} {criterion}: {g.name} depends on a conv's scale"
    for scope in SCOPES:
        assert select(groups, a, RATE, scope) == select(groups, b, RATE, scope)

