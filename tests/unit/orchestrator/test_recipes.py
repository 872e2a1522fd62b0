"""Every recipe's pruning section works on its model: groups build (presets included), the
schedule reaches its goal, masks from real scores compact into a smaller model that runs."""

from __future__ import annotations

import pytest
import torch

RECIPES = ["resnet56_sfp", "resnet56_pfec", "vgg16_pfec", "resnet50_asfp", "smoke"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_prunes_its_model(recipe):
    from models import create_model
    from orchestrator.config import load_config
    from pruning import compact, count_flops, groups_from_config, make_chooser, make_schedule

    cfg = load_config(f"launch.recipes:{recipe}", ["data.train=/x/manifest.json"])
    p = cfg.pruning
    size = 32 if cfg.data.image_size <= 32 else 64  # ImageNet models checked at 64 px: same layers, less time
    torch.manual_seed(0)
    model = create_model(cfg.model.name, cfg.model.num_classes).eval()
    groups = groups_from_config(model, p)
    rate = make_schedule(p, cfg.epochs)(cfg.epochs - 1)
    assert rate > 0
    tensors = {n: t.detach() for n, t in model.state_dict().items()}
    masks = make_chooser(groups, p)(tensors, rate, cfg.epochs - 1)
    small, spec = compact(model, groups, masks, mode="hard", input_size=size)
    assert count_flops(small, size).params < count_flops(model, size).params
    with torch.no_grad():
        assert small(torch.randn(2, 3, size, size)).shape == (2, cfg.model.num_classes)
