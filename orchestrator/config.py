"""The run's configuration: one pydantic v2 tree composed of every package's section.

`data` and `pruning` sections are owned by their packages; this module adds model, optimiser,
LR schedule, checkpoint, scaling and tracking, and the loaders that turn recipes (Python
functions), YAML/JSON files and `a.b=value` overrides into a validated `TrainConfig`.
Validation runs before Ray starts, so a bad value costs nothing but an error line that names
the dotted field and the value.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data.config import DataConfig
from pruning.config import PruningConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    """Which registered architecture to train."""

    name: str = "resnet20"
    num_classes: int | None = Field(None, ge=1)  # None: the data section's class count
    pretrained: str | None = None  # path to a state dict (torchvision key layout) to start from
    zero_init_residual: bool = False  # last BN of every residual block starts at 0 (deep nets train sooner)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from models import list_models

        if name not in list_models():
            raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
        return name


class OptimConfig(_Section):
    """Optimiser; the global batch is data.batch_size x scaling.workers x grad_accum."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    decay_norm_and_bias: bool = True  # the SFP/PFEC papers decay every parameter
    grad_clip: float | None = Field(None, gt=0)


class LRConfig(_Section):
    """Per-step learning-rate schedule, a pure function of the (fractional) epoch."""

    schedule: Literal["multistep", "step", "cosine", "constant"] = "multistep"
    milestones: list[int] = [30, 60, 90]  # multistep: epochs where lr *= gamma
    step_size: int = Field(30, ge=1)  # step: every step_size epochs lr *= gamma
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up from 0 over this many epochs
    min_lr: float = Field(0.0, ge=0)  # cosine floor


class CheckpointConfig(_Section):
    """What is reported to Ray as a checkpoint, and how many Ray keeps."""

    every_steps: int | None = Field(None, ge=1)  # also checkpoint every N steps within an epoch
    keep: int = Field(2, ge=1)


ZeroStage = Literal[0, 1, 2]
Precision = Literal["fp32", "bf16", "fp16"]
ZERO_STAGES, PRECISIONS = get_args(ZeroStage), get_args(Precision)


class ScalingConfig(_Section):
    """Workers and what each one gets; ZeRO stage and precision go into the DeepSpeed config."""

    workers: int = Field(2, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(None, ge=1)  # torch threads; None: cpus_per_worker
    zero_stage: ZeroStage = 0  # masks survive every stage x precision (orchestrator/master.py)
    precision: Precision = "fp32"
    grad_accum: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts Ray may do; -1: unlimited


class WatchdogConfig(_Section):
    """Deadlines that turn a hung rank into a failure Ray retries from the last checkpoint
    (orchestrator/watchdog.py). `timeout_s=0` turns the watchdog off."""

    timeout_s: float = Field(600.0, ge=0)  # no step, eval batch or pruning event may take longer
    checkpoint_timeout_s: float = Field(1800.0, gt=0)  # set-up/restore, one checkpoint, the final outputs
    grace_s: float = Field(30.0, gt=0)  # after the error, wait this long before ending a rank stuck in C


class TrackingConfig(_Section):
    """wandb settings; `mode="auto"` is online when logged in, offline otherwise, and
    WANDB_MODE in the environment always wins."""

    wandb: bool = True
    project: str = "softprune"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    log_every: int = Field(20, ge=1)  # steps between training-loss logs
    print_every_s: float = Field(60.0, gt=0)  # within a long epoch, a progress line this often
    verbose: bool = False  # also show Ray's own per-report and checkpoint logging
    tags: list[str] = []


class TrainConfig(_Section):
    """Everything one training run needs; saved with the run and sent to wandb."""

    name: str = Field("softprune-run", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    storage: str = "runs"  # local path or URI (s3://, gs://, ...) where Ray keeps the run
    epochs: int = Field(1, ge=1)
    seed: int = 0
    stop_after_epoch: int | None = Field(None, ge=0)  # end this invocation after that epoch (resume later)
    model: ModelConfig = ModelConfig()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    lr: LRConfig = LRConfig()
    pruning: PruningConfig = PruningConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    watchdog: WatchdogConfig = WatchdogConfig()

    @model_validator(mode="after")
    def _coherent(self) -> "TrainConfig":
        p = self.pruning
        if p.freeze_epoch is not None and p.freeze_epoch > self.epochs:
            raise ValueError(f"pruning.freeze_epoch={p.freeze_epoch} is after the last epoch ({self.epochs})")
        if p.method == "pfec" and p.prune_epoch >= self.epochs:
            raise ValueError(f"pruning.prune_epoch={p.prune_epoch} must be below epochs={self.epochs}")
        if self.scaling.precision == "fp16" and self.scaling.gpus_per_worker == 0:
            raise ValueError("scaling.precision='fp16' needs GPUs; use fp32 or bf16 on CPU workers")
        return self

    @property
    def storage_abspath(self) -> str:
        """Ray wants an absolute path or a URI; a relative path is taken from the current dir."""
        return self.storage if "://" in self.storage else str(Path(self.storage).expanduser().resolve())


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `dotted.field: message (got value)`."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "config"
        got = err.get("input")
        shown = "" if isinstance(got, Mapping) else f" (got {got!r})"
        lines.append(f"{where}: {err['msg']}{shown}")
    return "invalid config: " + "; ".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is read as YAML so 3, 0.1, true, [1,2] work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not of the form section.field=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _source_dict(source: Any) -> dict:
    if source is None:
        return {}
    if isinstance(source, TrainConfig):
        return source.model_dump(mode="json")
    if isinstance(source, Mapping):
        return json.loads(json.dumps(source, default=str))  # deep copy, JSON types only
    text = str(source)
    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"config file {text!r} does not exist")
        loaded = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {text!r} must hold a mapping at the top level")
        return loaded
    if ":" in text:  # a recipe: "package.module:function"
        module, _, func = text.partition(":")
        return _source_dict(getattr(importlib.import_module(module), func)())
    raise ValueError(f"config source {text!r} is neither a YAML/JSON file nor a module:function recipe")


def load_config(source: Any = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """Validate a recipe / file / mapping plus overrides into a `TrainConfig`.

    Raises ValueError with every bad field's dotted name and value, before anything is started.
    """
    tree = _source_dict(source)
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        _set_dotted(tree, key, value)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc)) from None


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """The resolved config as YAML, so `softprune train resolved.yaml` reproduces the run."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
