"""The `pruning` section of the run configuration (owned here, composed by orchestrator/).

Validation fails at config time, before any worker or GPU is taken, with the field and the value
in the message (pydantic adds the dotted location when the section is nested).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, field_validator, model_validator

# The allowed values, written once: the config, the pure functions and the CLI all read these.
Criterion = Literal["l1", "l2", "fpgm"]
Policy = Literal["sfp", "coupled", "pfec"]
Scope = Literal["layer", "global"]
CompactMode = Literal["hard", "faithful"]
CRITERIA, POLICIES, SCOPES, COMPACT_MODES = (get_args(t) for t in (Criterion, Policy, Scope, CompactMode))

_DERIVED_SCHEDULE = {"none": "constant", "sfp": "constant", "asfp": "asymptotic", "pfec": "one_shot"}


class PruningConfig(BaseModel, extra="forbid"):
    """What to prune, how to score it, and how the rate evolves over training."""

    method: Literal["none", "sfp", "asfp", "pfec"] = "none"
    criterion: Criterion = "l2"
    policy: Policy = "sfp"
    scope: Scope = "layer"
    rate: float = 0.3  # goal rate P in [0, 1)
    schedule: Literal["constant", "asymptotic", "linear", "cubic", "one_shot"] | None = None
    asymptotic_d: float = 0.125  # ASFP's D
    last_prune_epoch: int | None = None  # E of the schedule; None = the run's last epoch
    prune_epoch: int = 0  # one_shot: the epoch whose start prunes (PFEC)
    every: int = 1  # mask every N epochs (SFP's epoch_prune)
    include: list[str] = []  # fnmatch patterns on conv module names
    exclude: list[str] = []
    preset: str | None = None  # e.g. "resnet56-B" (PFEC's published configurations)
    min_keep: int = 1  # floor of kept channels per group
    round_to: int = 1  # kept counts rounded up to a multiple of this
    zero_moments: bool = False  # also zero optimizer moments of pruned filters
    freeze_epoch: int | None = None  # from this epoch on masks are frozen
    finetune_epochs: int = 0  # after a soft run: K epochs with frozen masks
    recalibrate_batches: int = 50  # BN recalibration batches at finalize
    compact_mode: Literal["best"] | CompactMode = "best"

    @field_validator("rate")
    @classmethod
    def _rate_in_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"rate must be in [0, 1) (a fraction of filters to prune), got {v}")
        return v

    @field_validator("asymptotic_d")
    @classmethod
    def _d_in_range(cls, v: float) -> float:
        if not 0.0 < v < 0.75:  # the curve reaches 3/4 of the goal at D*E: needs D < 3/4
            raise ValueError(f"asymptotic_d must be in (0, 0.75) (ASFP's D, default 1/8), got {v}")
        return v

    @field_validator("every", "min_keep", "round_to")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("prune_epoch", "finetune_epochs", "recalibrate_batches", "last_prune_epoch",
                     "freeze_epoch")
    @classmethod
    def _non_negative(cls, v: int | None, info) -> int | None:
        if v is not None and v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v}")
        return v

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from .presets import preset_names, resolve_preset_name

        name = resolve_preset_name(v)
        if name is None:
            raise ValueError(f"unknown preset {v!r}; known: {', '.join(preset_names())}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> PruningConfig:
        if self.preset is not None and self.policy != "pfec":
            raise ValueError(f"preset {self.preset!r} is a PFEC configuration: set policy='pfec' "
                             f"(got policy={self.policy!r})")
        if self.preset is not None and self.scope != "layer":
            raise ValueError("a preset fixes per-layer rates: scope must be 'layer'")
        return self

    @property
    def resolved_schedule(self) -> str:
        """The schedule to use: the explicit one, else the method's (sfp constant, asfp asymptotic,
        pfec one-shot)."""
        return self.schedule or _DERIVED_SCHEDULE[self.method]
