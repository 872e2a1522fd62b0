"""The pruning config section validates before anything runs."""

from __future__ import annotations

import pydantic
import pytest

from pruning import PruningConfig


def test_defaults_and_derived_schedule():
    cfg = PruningConfig()
    assert cfg.method == "none" and cfg.rate == 0.3 and cfg.policy == "pfec" and cfg.round_to == "auto"
    assert PruningConfig(round_to="8").round_to == 8  # a CLI override arrives as text
    assert PruningConfig(method="asfp").resolved_schedule == "asymptotic"
    assert PruningConfig(method="pfec").resolved_schedule == "one_shot"
    assert PruningConfig(method="asfp", schedule="cubic").resolved_schedule == "cubic"


@pytest.mark.parametrize("field,value,needle", [
    ("rate", 1.0, "rate must be in [0, 1)"),
    ("rate", -0.1, "rate must be in [0, 1)"),
    ("asymptotic_d", 0.9, "asymptotic_d"),
    ("every", 0, "every must be >= 1"),
    ("round_to", 0, "round_to must be >= 1"),
    ("round_to", "nearest", "round_to"),
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
        PruningConfig(policy="sfp", preset="resnet56-B")
    with pytest.raises(pydantic.ValidationError, match="scope"):
        PruningConfig(policy="pfec", preset="resnet56-B", scope="global")


@pytest.mark.parametrize("fields, words", [
    ({"every_steps": 0}, "every_steps must be >= 1"),
    ({"every_steps": 300, "every": 2}, "not both"),
])
def test_step_counted_events_are_validated(fields, words):
    with pytest.raises(ValueError, match=words):
        PruningConfig(method="sfp", **fields)


def test_moments_of_pruned_filters_are_zeroed_by_default():
    # the authors' code leaves them (zero_moments=false); see docs/design.md for why we differ
    assert PruningConfig(method="sfp").zero_moments is True


@pytest.mark.parametrize("method", ["none", "pfec"])
def test_norm_control_needs_soft_events(method):
    with pytest.raises(ValueError, match="norm_control acts at soft mask events"):
        PruningConfig(method=method, norm_control="init")
    assert PruningConfig(method="asfp", norm_control="init").norm_control == "init"


def test_norm_control_is_on_for_soft_methods_by_default_and_authors_turns_it_off():
    assert PruningConfig(method="sfp").norm_control == "init"
    assert PruningConfig(method="asfp").norm_control == "init"
    assert PruningConfig(method="pfec").norm_control == "none" and PruningConfig().norm_control == "none"
    authors = PruningConfig(method="asfp", authors=True)
    assert (authors.zero_moments, authors.norm_control) == (False, "none")
    assert PruningConfig.model_validate(authors.model_dump()) == authors  # a saved config reads back


@pytest.mark.parametrize("fields, words", [
    ({"method": "pfec", "authors": True}, "authors=true selects the SFP/ASFP authors' semantics"),
    ({"method": "sfp", "authors": True, "zero_moments": True}, "drop zero_moments=true"),
    ({"method": "sfp", "authors": True, "norm_control": "init"}, "drop norm_control=init"),
])
def test_authors_flag_refuses_contradictions(fields, words):
    with pytest.raises(ValueError, match=words):
        PruningConfig(**fields)


def test_authors_flag_selects_the_papers_layer_policy():
    assert PruningConfig(method="asfp").policy == "pfec"
    authors = PruningConfig(method="asfp", authors=True)
    assert (authors.policy, authors.zero_moments, authors.norm_control) == ("sfp", False, "none")
    assert PruningConfig(method="sfp", authors=True, policy="sfp").policy == "sfp"
    with pytest.raises(pydantic.ValidationError, match="drop policy=pfec"):
        PruningConfig(method="sfp", authors=True, policy="pfec")
