"""The pruning config section validates before anything runs."""

from __future__ import annotations

import pydantic
import pytest

from pruning import PruningConfig


def test_defaults_and_derived_schedule():
    cfg = PruningConfig()
    assert cfg.method == "none" and cfg.rate == 0.3 and cfg.policy == "sfp"
    assert PruningConfig(method="asfp").resolved_schedule == "asymptotic"
    assert PruningConfig(method="pfec").resolved_schedule == "one_shot"
    assert PruningConfig(method="asfp", schedule="cubic").resolved_schedule == "cubic"


@pytest.mark.parametrize("field,value,needle", [
    ("rate", 1.0, "rate must be in [0, 1)"),
    ("rate", -0.1, "rate must be in [0, 1)"),
    ("asymptotic_d", 0.9, "asymptotic_d"),
    ("every", 0, "every must be >= 1"),
    ("round_to", 0, "round_to must be >= 1"),
    ("prune_epoch", -1, "prune_epoch must be >= 0"),
    ("preset", "resnet57-A", "unknown preset"),
    ("criterion", "taylor", "criterion"),
    ("surprise", 1, "surprise"),
])
def test_bad_values_name_the_field(field, value, needle):
    with pytest.raises(pydantic.ValidationError) as err:
        PruningConfig(**{field: value})
    assert needle in str(err.value) and field in str(err.value)


def test_preset_is_normalised_and_needs_pfec_layer_scope():
    assert PruningConfig(policy="pfec", preset="ResNet56_b").preset == "resnet56-B"
    with pytest.raises(pydantic.ValidationError, match="policy='pfec'"):
        PruningConfig(preset="resnet56-B")
    with pytest.raises(pydantic.ValidationError, match="scope"):
        PruningConfig(policy="pfec", preset="resnet56-B", scope="global")
