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
    # Which convs are pruned. "pfec" (the default): the convs inside residual blocks only, as in
    # PFEC; "sfp": every conv but the projections, as in the SFP/ASFP papers (authors=true);
    # "coupled": also the residual streams, one mask per stream. PFEC's choice measured best for
    # SFP and ASFP too, with few and with many steps between events (docs/results.md, "Policy").
    # It cuts fewer MACs at a rate: about 0.53 cuts on a CIFAR ResNet what 0.4 cuts on "sfp".
    policy: Policy = "pfec"
    scope: Scope = "layer"
    rate: float = 0.3  # goal rate P in [0, 1)
    schedule: Literal["constant", "asymptotic", "linear", "cubic", "one_shot"] | None = None
    asymptotic_d: float = 0.125  # ASFP's D
    last_prune_epoch: int | None = None  # E of the schedule; None = the run's last epoch
    prune_epoch: int = 0  # one_shot: the epoch whose start prunes (PFEC)
    # SFP/ASFP: the first epoch at whose end masks are chosen; the epochs before it train dense.
    # 0 is the papers' "from scratch"; a later start is their "from a pretrained model" inside the
    # run's own budget. The rate curve starts here (ASFP: 0 at start_epoch, the goal at E).
    start_epoch: int = 0
    every: int = 1  # mask every N epochs (SFP's epoch_prune)
    # mask every N optimizer steps instead (the schedule then reads the fractional epoch): the
    # papers had 391 (CIFAR) to ~5,000 (ImageNet) steps between events, whatever the data size
    every_steps: int | None = None
    include: list[str] = []  # fnmatch patterns on conv module names
    exclude: list[str] = []
    preset: str | None = None  # e.g. "resnet56-B" (PFEC's published configurations)
    min_keep: int = 1  # floor of kept channels per group
    # kept counts rounded up to a multiple of this; "auto": 8 for groups of >= 64 channels, else 1
    # (chosen by measurement: pruning/select.py, multiple_for)
    round_to: int | Literal["auto"] = "auto"
    # Also zero the optimizer moments (SGD momentum, Adam's) of the filters each event zeroes.
    # The authors' code zeroes weights only (False): the old momentum then pushes a pruned filter
    # straight back and the run ships a far worse model when events are few steps apart
    # (docs/design.md, "Momentum at mask events").
    zero_moments: bool = True
    # Norm control at soft events (pruning/renorm.py): "init" scales every kept filter of a masked
    # conv back to that conv's mean filter norm at the start of training, the function unchanged
    # (BN follows). Regrowing filters otherwise ratchet the norms up and the effective LR down.
    # Default (None): "init" for sfp/asfp, "none" otherwise. The authors' code has none.
    norm_control: Literal["none", "init"] | None = None
    # The SFP/ASFP authors' semantics in one flag: zero_moments=false, norm_control=none, policy=sfp.
    authors: bool = False
    freeze_epoch: int | None = None  # from this epoch on masks are frozen
    finetune_epochs: int = 0  # after a soft run: K epochs with frozen masks
    # Distillation while the masks are frozen (and while PFEC retrains): "self" (the run's weights
    # just before its first mask event: PFEC's dense phase, or model.pretrained for SFP/ASFP, which
    # mask from the first epoch) or a finished run's final/ directory (path or URI); in a compare
    # spec, "run:<name>" is that comparison's run <name> at the same seed
    teacher: str | None = None
    distill_alpha: float = 0.5  # weight of the teacher's term; the labels' cross-entropy gets 1 - alpha
    distill_temperature: float = 4.0
    recalibrate_batches: int = 50  # BN recalibration batches at finalize
    compact_mode: Literal["best"] | CompactMode = "best"
    # At the freeze (soft methods) go on training the hard-compacted model in a new engine whose
    # optimizer moments are the old ones at the kept channels: the frozen-mask epochs then cost the
    # compact model's MACs. False trains the full-size model with frozen masks (gradient hooks) instead.
    compact_at_freeze: bool = True

    @field_validator("rate")
    @classmethod
    def _rate_in_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"rate must be in [0, 1) (a fraction of filters to prune), got {v}")
        return v

    @field_validator("distill_alpha")
    @classmethod
    def _alpha_in_range(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {v}")
        return v

    @field_validator("distill_temperature")
    @classmethod
    def _temperature_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {v}")
        return v

    @field_validator("asymptotic_d")
    @classmethod
    def _d_in_range(cls, v: float) -> float:
        if not 0.0 < v < 0.75:  # the curve reaches 3/4 of the goal at D*E: needs D < 3/4
            raise ValueError(f"asymptotic_d must be in (0, 0.75) (ASFP's D, default 1/8), got {v}")
        return v

    @field_validator("every", "min_keep", "round_to", "every_steps")
    @classmethod
    def _positive(cls, v: int | str | None, info) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("prune_epoch", "start_epoch", "finetune_epochs", "recalibrate_batches", "last_prune_epoch",
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
        if self.teacher is not None and self.method == "none":
            raise ValueError("teacher is used while masks are frozen or PFEC retrains: set a pruning method")
        if self.authors:
            if self.method not in ("sfp", "asfp"):
                raise ValueError(f"authors=true selects the SFP/ASFP authors' semantics: set method sfp "
                                 f"or asfp (got method={self.method!r})")
            if "zero_moments" in self.model_fields_set and self.zero_moments:
                raise ValueError("authors=true keeps the pruned filters' moments: drop zero_moments=true")
            if self.norm_control == "init":
                raise ValueError("authors=true has no norm control: drop norm_control=init")
            if "policy" in self.model_fields_set and self.policy != "sfp":
                raise ValueError(f"authors=true prunes every conv but the projections (policy sfp): "
                                 f"drop policy={self.policy}")
            self.zero_moments, self.norm_control, self.policy = False, "none", "sfp"
        if self.norm_control is None:
            self.norm_control = "init" if self.method in ("sfp", "asfp") else "none"
        if self.norm_control != "none" and self.method not in ("sfp", "asfp"):
            raise ValueError(f"norm_control acts at soft mask events: set method sfp or asfp "
                             f"(got method={self.method!r})")
        if self.start_epoch and self.method not in ("sfp", "asfp"):
            raise ValueError(f"start_epoch delays soft mask events: set method sfp or asfp (got method="
                             f"{self.method!r}; PFEC prunes at prune_epoch)")
        if self.last_prune_epoch is not None and self.start_epoch and self.last_prune_epoch <= self.start_epoch:
            raise ValueError(f"last_prune_epoch={self.last_prune_epoch} must be after start_epoch="
                             f"{self.start_epoch} (the schedule runs from one to the other)")
        if self.every_steps is not None and self.every != 1:
            raise ValueError(f"set either every (epochs) or every_steps (optimizer steps), not both "
                             f"(got every={self.every}, every_steps={self.every_steps})")
        if self.preset is not None and self.scope != "layer":
            raise ValueError("a preset fixes per-layer rates: scope must be 'layer'")
        return self

    @property
    def resolved_schedule(self) -> str:
        """The schedule to use: the explicit one, else the method's (sfp constant, asfp asymptotic,
        pfec one-shot)."""
        return self.schedule or _DERIVED_SCHEDULE[self.method]
