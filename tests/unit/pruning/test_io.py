"""Compacted models round-trip through model.safetensors + arch.json + report.json."""

from __future__ import annotations

import json

import pytest
import torch

from pruning import build_groups, compact, load_compact, save_compact

from .helpers import dense_model, random_masks


@pytest.mark.parametrize("name,policy,mode", [("resnet20", "coupled", "faithful"),
                                              ("resnet18", "sfp", "faithful"),
                                              ("vgg16_cifar", "pfec", "hard")])
def test_save_load_round_trip(tmp_path, name, policy, mode):
    model = dense_model(name)
    groups = build_groups(model, policy)
    small, spec = compact(model, groups, random_masks(groups, 0.5, 1), mode, input_size=36)
    save_compact(tmp_path / "out", small, spec, {"note": "test"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["arch.json", "model.safetensors",
                                                                    "report.json"]
    loaded, spec2, report = load_compact(tmp_path / "out")
    assert spec2 == json.loads(json.dumps(spec)) and report == {"note": "test"}
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        assert torch.equal(loaded(x), small.eval()(x))


def test_incomplete_directory_is_rejected(tmp_path):
    (tmp_path / "arch.json").write_text("{}")
    with pytest.raises(ValueError, match="missing model.safetensors, report.json"):
        load_compact(tmp_path)
