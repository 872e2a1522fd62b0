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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from data.config import DataConfig
from pruning.config import PruningConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    """Which architecture to train: a registered one, or `package.module:factory`, a callable
    returning any CNN the tracer follows (pruning/user_model.py), called with `kwargs` (and
    `num_classes=` when the factory takes it). The factory is imported here; whether its model
    builds and traces is checked before Ray starts (orchestrator/preflight.py)."""

    name: str = "resnet20"
    kwargs: dict[str, Any] = {}  # keyword arguments of a factory (JSON values)
    num_classes: int | None = Field(None, ge=1)  # None: the data section's class count
    pretrained: str | None = None  # path to a state dict (torchvision key layout) to start from
    zero_init_residual: bool = False  # last BN of every residual block starts at 0 (deep nets train sooner)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from models import list_models
        from pruning.user_model import is_factory, resolve

        if is_factory(name):
            resolve(name)  # the module imports and the factory exists and is callable
        elif name not in list_models():
            raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}, "
                             f"or package.module:factory")
        return name

    @field_validator("kwargs")
    @classmethod
    def _for_factories(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from pruning.user_model import is_factory

        name = info.data.get("name")  # absent when the name itself was refused
        if kwargs and name is not None and not is_factory(name):
            raise ValueError(f"only a model factory (package.module:factory) takes kwargs; registered model "
                             f"{name!r} takes none")
        return kwargs


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
    """When the run checkpoints, and how many checkpoints Ray keeps.

    Spot capacity decides the defaults: a checkpoint after every epoch, one every `every_minutes`
    of training within an epoch (a reclaimed node loses at most that much work, whatever the
    step time), and one at the next step boundary after a preemption notice (Ray Train reports
    the drain of a node it runs on). The ranks agree on these decisions every `poll_s` seconds
    of training, in one small collective; `every_steps` adds a fixed step interval.
    """

    every_minutes: float | None = Field(10.0, gt=0)  # None: no time-based checkpoints
    every_steps: int | None = Field(None, ge=1)  # also checkpoint every N optimizer steps
    on_preemption: bool = True  # a just-in-time checkpoint when a node of the run is being drained
    poll_s: float = Field(10.0, gt=0)  # training seconds between two agreements of the ranks
    upload: Literal["async", "sync"] = "async"  # async: training goes on while Ray uploads
    keep: int = Field(2, ge=1)


ZeroStage = Literal[0, 1, 2]
Precision = Literal["fp32", "bf16", "fp16"]
ZERO_STAGES, PRECISIONS = get_args(ZeroStage), get_args(Precision)


class ScalingConfig(_Section):
    """Workers and what each one gets; ZeRO stage and precision go into the DeepSpeed config."""

    workers: int | tuple[int, int] = 2  # a fixed count, or [min, max]: an elastic group (see below)
    gpus_per_worker: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(None, ge=1)  # torch threads; None: cpus_per_worker
    zero_stage: ZeroStage = 0  # masks survive every stage x precision (orchestrator/master.py)
    precision: Precision = "fp32"
    # NHWC batches: the layout tensor cores and oneDNN convolve in. On the 2-core CPU an fp32
    # CIFAR ResNet step ran 1.18-1.29x faster, a bf16 ResNet-50/101 step 1.04-1.07x
    # (benchmarks/bench_layout.py); on GPUs not measured here. Only the batches change: weights
    # keep DeepSpeed's layout (orchestrator/evaluation.py).
    channels_last: bool = False
    grad_accum: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts Ray may do; -1: unlimited
    max_preemptions: int = Field(-1, ge=-1)  # restarts after a node reclaim (counted apart); -1: unlimited

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"workers must be >= 1, or [min, max] with 1 <= min <= max (got {value})")
        return value

    @property
    def min_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[0]

    @property
    def max_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[1]

    def accumulation(self, batch_size: int, world: int) -> tuple[int, float]:
        """(gradient accumulation steps, LR factor) at `world` workers.

        The reference global batch is batch_size x max_workers x grad_accum. At a smaller world
        the run accumulates more micro-batches to keep it: accum = reference / (batch_size x
        world) when that divides. When it does not, accum is the nearest whole number (>= 1) and
        the LR is scaled by the ratio of the global batch actually used to the reference (the
        linear scaling rule of Goyal et al., 2017), so the per-sample step size stays the same.
        """
        reference = batch_size * self.max_workers * self.grad_accum
        exact, rest = divmod(reference, batch_size * world)
        if rest == 0:
            return exact, 1.0
        accum = max(1, round(reference / (batch_size * world)))
        return accum, batch_size * world * accum / reference


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
    # Where wandb's files go (<dir>/wandb/), a local path or a URI. None: inside the run's storage,
    # <storage>/<name>/wandb (a URI storage gets them from a local staging directory, uploaded at
    # every checkpoint and at the end of the run: orchestrator/tracking.py).
    dir: str | None = None

    @field_validator("dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """A relative path is taken from the launching directory: Ray workers run elsewhere."""
        if value is None or "://" in value:
            return value
        return str(Path(value).expanduser().resolve())


class TrainConfig(_Section):
    """Everything one training run needs; saved with the run and sent to wandb."""

    name: str = Field("softprune-run", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    storage: str = Field("runs", validate_default=True)  # local path or URI (s3://, ...) where Ray keeps the run
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
        bound = ("pruning.freeze_epoch", p.freeze_epoch) if p.freeze_epoch is not None else ("epochs", self.epochs)
        if p.start_epoch and p.start_epoch >= bound[1]:
            raise ValueError(f"pruning.start_epoch={p.start_epoch} leaves no soft event: it must be below "
                             f"{bound[0]}={bound[1]}")
        if p.teacher == "self" and p.method in ("sfp", "asfp") and not self.model.pretrained and not p.start_epoch:
            # measured (docs/results.md, "Distillation"): distilling from weights one epoch old took
            # the frozen-mask epochs of a dev run from 82% to 36% top-1
            raise ValueError(f"pruning.teacher='self' is the run's weights before its first mask, and "
                             f"{p.method} masks from the first epoch, so they are untrained: set "
                             f"model.pretrained or pruning.start_epoch, or give a dense run's final/ directory")
        if self.scaling.precision == "fp16" and self.scaling.gpus_per_worker == 0:
            raise ValueError("scaling.precision='fp16' needs GPUs; use fp32 or bf16 on CPU workers")
        return self

    @field_validator("storage")
    @classmethod
    def _absolute_storage(cls, v: str) -> str:
        """A relative path is taken from the launching directory, here, where the config is first
        validated: Ray's workers validate it again in another working directory."""
        return v if "://" in v else str(Path(v).expanduser().resolve())

    @property
    def storage_abspath(self) -> str:
        """Ray wants an absolute path or a URI (the validator already made a local path absolute)."""
        return self.storage if "://" in self.storage else str(Path(self.storage).expanduser().resolve())


def format_validation_error(exc: ValidationError) -> str:
    """All problems on one line: `dotted.field: message (got value); ...`."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "config"
        got = err.get("input")
        # a whole section (a model-level check's input) would bury the message; a small mapping
        # where a value belongs (`epochs.max=3` made `epochs` one) is worth showing
        shown = "" if isinstance(got, Mapping) and (not err["loc"] or len(repr(got)) > 80) else f" (got {got!r})"
        message = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        lines.append(f"{where}: {message}{shown}")
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
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line source excerpt: `problem at line L, column C`."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        loaded = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {str(path)!r} is not valid YAML/JSON: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {str(path)!r} cannot be read: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level, "
                         f"not {type(loaded).__name__}")
    return loaded


def _where(exc: BaseException) -> str:
    """`file:line` of the innermost frame of `exc`'s traceback (where a recipe failed)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" ({Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})" if tb is not None else ""


def _run_recipe(text: str) -> dict:
    """`package.module:function` -> the config tree it returns; one-line ValueError naming the
    recipe for a missing module or function, a function that raises, or one that returns no config."""
    module_name, _, func_name = text.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ValueError(f"recipe {text!r}: no module named {module_name!r}") from None
        raise ValueError(f"recipe {text!r}: importing {module_name} failed: {exc}") from None
    except Exception as exc:  # a recipe module with an error of its own (syntax, import-time raise)
        raise ValueError(f"recipe {text!r}: importing {module_name} failed: "
                         f"{type(exc).__name__}: {exc}{_where(exc)}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        known = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module_name)
        what = "no function" if func is None else "a non-callable"
        raise ValueError(f"recipe {text!r}: module {module_name} has {what} {func_name!r}"
                         f"{' (it has: ' + ', '.join(known) + ')' if known else ''}")
    try:
        tree = func()
    except Exception as exc:  # whatever a user's recipe raises, reported as one line
        raise ValueError(f"recipe {text!r} failed: {type(exc).__name__}: {exc}{_where(exc)}") from None
    if not isinstance(tree, (Mapping, TrainConfig)):
        raise ValueError(f"recipe {text!r} returned {type(tree).__name__}, not a config mapping or TrainConfig")
    return _source_dict(tree)


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
        return _read_file(path)
    if ":" in text:  # a recipe: "package.module:function"
        return _run_recipe(text)
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
