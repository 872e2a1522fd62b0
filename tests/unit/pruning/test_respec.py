"""A traced user model's compact shape rebuilt from its spec (pruning/respec.py): the factory's dense
model, the masks that keep the spec's `kept` channels, `compact` again. The rebuilt model takes
the compacted model's state dict strictly and computes the same function; a factory that no
longer builds the spec's model is refused in one line. Factories: tests/user_models.py."""

from __future__ import annotations

import json

import pytest
import torch

from pruning import build_groups, compact, load_compact, save_compact
from pruning.respec import build, masks_from_kept, with_kwargs
from pruning.user_model import accepts
from pruning.user_model import build as build_user

from .helpers import random_masks, randomise_bn

NAME = "tests.user_models:small_net"
KWARGS = {"width": 4, "blocks": "plain"}
SIZE = 16


def _dense(seed: int = 0, blocks: str = "plain"):
    torch.manual_seed(seed)
    return randomise_bn(build_user(NAME, dict(KWARGS, blocks=blocks), 5, SIZE), seed=seed + 1).eval()


def _json(spec: dict) -> dict:
    return json.loads(json.dumps(spec))  # as arch.json and the checkpoint's state hold it


@pytest.mark.parametrize("which,policy", [("plain", "sfp"), ("full", "sfp"), ("full", "coupled"), ("full", "pfec"),
                                          ("resnet20", "coupled")])  # option-A streams: slots != channels
def test_masks_from_kept_are_the_masks_compaction_used(which, policy):
    from models import create_model

    model = create_model("resnet20", 4) if which == "resnet20" else _dense(blocks=which)
    groups = build_groups(model, policy)
    assert which != "resnet20" or any(m.slot is not None for g in groups for m in g.members)
    masks = random_masks(groups, 0.5, seed=3)
    _, spec = compact(model, groups, masks, "hard")
    assert masks_from_kept(groups, _json(spec)["kept"], epoch=masks.epoch) == masks
    full = masks_from_kept(groups, {})  # nothing listed: everything kept
    assert all(bool(k.all()) for k in full.keep.values())


@pytest.mark.parametrize("mode", ["hard", "faithful"])
@pytest.mark.parametrize("policy", ["sfp", "coupled"])
@pytest.mark.parametrize("blocks", ["plain", "full"])  # full: depthwise, squeeze-excite, torch.cat
def test_a_compacted_user_model_rebuilds_from_its_spec(blocks, policy, mode, tmp_path):
    model = _dense(blocks=blocks)
    groups = build_groups(model, policy)
    small, spec = compact(model, groups, random_masks(groups, 0.5, seed=4), mode)
    kwargs = dict(KWARGS, blocks=blocks)
    spec = _json(with_kwargs(spec, kwargs))
    assert spec["model"] == NAME and spec["model_kwargs"] == kwargs and spec["num_classes"] == 5
    rng = torch.random.get_rng_state()
    rebuilt = build(spec)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the factory's init does not move the seed
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    assert sum(p.numel() for p in rebuilt.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = small.eval()(x)
        assert want.abs().max() > 1e-2 and torch.equal(rebuilt.eval()(x), want)
    save_compact(tmp_path, small, spec, {"stage": "test"})  # what `final/` and `softprune export` read
    loaded, _, _ = load_compact(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def test_a_dense_user_spec_rebuilds_the_dense_model():
    from models import arch_spec

    model = _dense()
    rebuilt = build(_json(with_kwargs(arch_spec(model), KWARGS)))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.softprune_meta.family == "traced" and rebuilt.softprune_meta.convs == model.softprune_meta.convs


def test_a_spec_the_factory_no_longer_builds_is_one_line():
    model = _dense()
    groups = build_groups(model, "sfp")
    _, spec = compact(model, groups, random_masks(groups, 0.5, seed=4), "hard")
    spec = _json(with_kwargs(spec, KWARGS))
    for change, needle in [({"model_kwargs": dict(KWARGS, width=6)}, "no longer builds the model this spec describes"),
                           ({"num_classes": 7, "model_kwargs": KWARGS}, None)]:
        if needle is None:  # a factory that takes num_classes builds what the spec says
            assert build({**spec, **change}).fc.out_features == 7
            continue
        with pytest.raises(ValueError, match=needle) as info:
            build({**spec, **change})
        assert "\n" not in str(info.value)
    fixed = build_user("tests.user_models:fixed_head", {}, 9, SIZE)  # takes no num_classes: keeps its 3
    assert fixed.softprune_meta.num_classes == 3
    from tests import user_models

    assert accepts(user_models.small_net, "num_classes") and not accepts(user_models.fixed_head, "num_classes")
    assert accepts(lambda **kw: None, "num_classes") and not accepts(lambda num_classes, /: None, "num_classes")
    with pytest.raises(ValueError, match=r"builds a classifier of 3 classes, the spec has 9"):
        build({"model": "tests.user_models:fixed_head", "num_classes": 9, "input_size": SIZE})


def test_registered_specs_still_rebuild_through_the_registry():
    from models import create_model

    model = randomise_bn(create_model("resnet20", 4), seed=1).eval()
    groups = build_groups(model, "sfp")
    small, spec = compact(model, groups, random_masks(groups, 0.4, seed=2), "faithful")
    rebuilt = build(_json(with_kwargs(spec, {"ignored": 1})))
    assert "model_kwargs" not in with_kwargs(spec, {"ignored": 1})
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    assert type(rebuilt) is type(small)
