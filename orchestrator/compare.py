"""`softprune compare`: several configurations trained on the same data, budget and seeds, then
one table and a few plots.

A spec (`CompareSpec`, YAML) names a base config, overrides for every run, the seeds, and each
run's own overrides. Every (run, seed) pair becomes one training run `<spec>-<run>-s<seed>` under
the spec's storage, built and validated before anything starts (`plan_runs`). `run_compare`
trains them one after another in this process's Ray session; a run whose report.json exists is
reused, an unfinished one resumes through `run_training` (same name and storage). `aggregate`
turns the reports into the comparison (a pure function of the report dicts), and
`write_comparison` puts compare.json, compare.md and the plots in `<storage>/<spec name>/`.

`TrainConfig.seed` seeds only the model's initial weights (torch.manual_seed on every rank);
shard order, shuffling and augmentation follow `data.seed`. By default a replicate sets both, so
the spread over seeds covers the data order too, while the runs of one seed see the same
initialisation and the same batches (a paired comparison).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import storage
from .config import TrainConfig, format_validation_error, load_config, parse_override

NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"  # TrainConfig.name's: the run names are built from these
SET_BY_COMPARE = ("name", "storage", "seed")  # every run gets its own; overrides may not set them
DATA_SOURCES = ("data.train", "data.val")


# -- the spec ---------------------------------------------------------------------------------
def _check_overrides(items: Iterable[str], forbidden: Sequence[str]) -> list[str]:
    """Each item is `a.b=value`, and none sets a field the comparison sets itself."""
    items = list(items)
    for item in items:
        key, _ = parse_override(item)  # a malformed override: ValueError naming it
        if key in forbidden:
            raise ValueError(f"override {item!r}: {key} is set by compare for every run")
    return items


class CompareSpec(BaseModel):
    """What `softprune compare` runs: `runs` x `seeds`, each `base` + `overrides` + its own."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    storage: str = "runs"  # local path (from the current directory, like `softprune train`) or URI
    base: str  # a YAML/JSON config file (relative to the spec's folder) or a module:function recipe
    overrides: list[str] = []  # applied to every run, before the run's own
    seeds: list[int] = Field([0], min_length=1)
    data_seed: bool = True  # a replicate's seed also sets data.seed (see the module docstring)
    runs: dict[str, list[str]] = Field(min_length=1)  # run name -> its overrides
    baseline: str | None = None  # the run deltas are taken against; None: the first run
    # a held-out shard source (split "test" unless `#split` says otherwise) every finished run's
    # shipped model is also scored on (orchestrator/heldout.py); None: validation top-1 only
    test: str | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"seeds must be distinct and >= 0 (got {seeds})")
        return seeds

    @model_validator(mode="after")
    def _coherent(self) -> CompareSpec:
        import re

        forbidden = self.forbidden()
        _check_overrides(self.overrides, forbidden)
        for run, items in self.runs.items():
            if not re.match(NAME_PATTERN, run):
                raise ValueError(f"run name {run!r} may hold only letters, digits, '_', '.' and '-'")
            try:
                _check_overrides(items, forbidden)
            except ValueError as exc:
                raise ValueError(f"runs.{run}: {exc}") from None
        if self.baseline is None:
            self.baseline = next(iter(self.runs))
        elif self.baseline not in self.runs:
            raise ValueError(f"baseline {self.baseline!r} is not one of the runs ({', '.join(self.runs)})")
        return self

    def with_seeds(self, seeds: Sequence[int] | None) -> CompareSpec:
        """This spec with `seeds` added after its own: more replicates, asked for on the command
        line, without editing the spec (runs of the other seeds are then listed as missing)."""
        extra = [s for s in dict.fromkeys(seeds or ()) if s not in self.seeds]
        if not extra:
            return self
        if min(extra) < 0:
            raise ValueError(f"--seeds must be >= 0 (got {min(extra)})")
        return self.model_copy(update={"seeds": [*self.seeds, *extra]})

    def forbidden(self) -> tuple[str, ...]:
        return SET_BY_COMPARE + (("data.seed",) if self.data_seed else ())

    def run_name(self, run: str, seed: int) -> str:
        return f"{self.name}-{run}-s{seed}"

    @property
    def out_dir(self) -> str:
        """`<storage>/<name>`: where compare.json, compare.md and the plots go."""
        return storage.join(_absolute(self.storage), self.name)


def _absolute(location: str) -> str:
    return location if storage.is_uri(location) else str(Path(location).expanduser().resolve())


def load_spec(path: str | Path) -> CompareSpec:
    """Read and validate a spec file; one-line ValueError naming the file (and the field)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"compare spec {str(path)!r} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"compare spec {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"compare spec {str(path)!r} must hold a mapping at the top level")
    try:
        spec = CompareSpec.model_validate(tree)
    except ValidationError as exc:
        raise ValueError(f"compare spec {str(path)!r}: "
                         f"{format_validation_error(exc).removeprefix('invalid config: ')}") from None
    local = path.parent / spec.base  # a base file is read from the spec's folder (a recipe is no file)
    if local.is_file():
        spec.base = str(local)
    return spec


# -- the runs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    run: str
    seed: int
    cfg: TrainConfig
    teacher_run: str | None = None  # the spec's run this one distils from (`pruning.teacher=run:<name>`)

    @property
    def label(self) -> str:
        return f"{self.run} seed {self.seed}"

    @property
    def run_dir(self) -> str:
        return storage.join(self.cfg.storage_abspath, self.cfg.name)

    @property
    def output(self) -> str:
        from .outputs import output_uri

        return output_uri(self.cfg.storage_abspath, self.cfg.name)


def plan_runs(spec: CompareSpec, extra: Sequence[str] = ()) -> list[PlannedRun]:
    """Every (run, seed) config, validated. `extra` (the command line's overrides) apply to every
    run after the run's own. Raises ValueError naming the run, the seed and the field."""
    _check_overrides(extra, spec.forbidden())
    plan = []
    for run, items in spec.runs.items():
        for seed in spec.seeds:
            fixed = [f"seed={seed}", f"name={json.dumps(spec.run_name(run, seed))}",
                     f"storage={json.dumps(spec.storage)}"]  # JSON strings: YAML reads them back verbatim
            fixed += [f"data.seed={seed}"] if spec.data_seed else []
            try:
                own, teacher = _teacher_runs(spec, run, seed, items)
                cfg = load_config(spec.base, [*spec.overrides, *own, *extra, *fixed])
            except ValueError as exc:
                raise ValueError(f"compare {spec.name}: run {run!r} (seed {seed}): {exc}") from None
            plan.append(PlannedRun(run, seed, cfg, teacher))
    return plan


TEACHER_RUN = "pruning.teacher=run:"


def _teacher_runs(spec: CompareSpec, run: str, seed: int, items: Sequence[str]) -> tuple[list[str], str | None]:
    """`pruning.teacher=run:<name>` names this comparison's run <name>: replaced by that run's
    final/ directory at the same seed (a dense baseline per seed teaches its own seed)."""
    out, teacher = [], None
    for item in items:
        if not item.startswith(TEACHER_RUN):
            out.append(item)
            continue
        teacher = item.removeprefix(TEACHER_RUN)
        if teacher not in spec.runs or teacher == run:
            raise ValueError(f"pruning.teacher=run:{teacher}: no other run named {teacher!r} in the spec "
                             f"(runs: {', '.join(spec.runs)})")
        final = storage.join(_absolute(spec.storage), spec.run_name(teacher, seed), "final")
        out.append(f"pruning.teacher={json.dumps(final)}")
    return out, teacher


def check_finished(planned: PlannedRun) -> None:
    """A finished run is reused only if it ran this run's config: a report of other values would
    go into the table under this run's name. Data sources the command line leaves out (say with
    --report-only) are not compared."""
    from .preflight import _short, config_changes

    config_file = storage.join(planned.run_dir, "config.yaml")
    try:
        previous = yaml.safe_load(storage.read_text(config_file))
    except (FileNotFoundError, storage.StorageError, yaml.YAMLError):
        return  # nothing to compare with
    if not isinstance(previous, dict):
        return
    changes = {k: v for k, v in config_changes(previous, planned.cfg).items()
               if not (k in DATA_SOURCES and v[1] is None)}
    if changes:
        shown = ", ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items())
        raise ValueError(f"{planned.label}: {planned.run_dir} finished under another config ({shown}); "
                         f"give the spec another name to compare the new values")


def _seconds(s: float) -> str:
    return f"{s:.0f}s" if s < 60 else f"{int(s // 60)}m{s % 60:02.0f}s"


def _finished_line(report: dict) -> str:
    stage = shipped_stage(report)
    macs = _cut(report, "macs")
    return (f"shipped top-1 {100 * report['stages'][stage]['top1']:.2f}% ({stage})"
            + (f", MACs cut {100 * macs:.1f}%" if macs is not None else ""))


def _has_checkpoint(run_dir: str) -> bool:
    """Whether Ray Train has a checkpoint of the run to resume from (`checkpoint_<time>` folders)."""
    return any(name.startswith("checkpoint_") for name in storage.list_dirs(run_dir))


def train_runs(todo: Sequence[PlannedRun], reports: dict, num_cpus: int | None,
               say: Callable[[str], None]) -> None:
    """Train `todo` one after another in one Ray session (started here unless one is up, e.g.
    under `ray job submit`); fills `reports` with each finished run's report."""
    import ray

    from .driver import ensure_ray, run_training

    started = ensure_ray(num_cpus)  # run_training then finds Ray up and leaves it up
    try:
        for i, p in enumerate(todo, 1):
            how = "resuming" if _has_checkpoint(p.run_dir) else "starting"
            say(f"{p.label}: {how} ({i}/{len(todo)}) in {p.run_dir}")
            t0 = time.monotonic()
            report = run_training(p.cfg, num_cpus=num_cpus).get("report")
            took = _seconds(time.monotonic() - t0)
            if report is None:
                say(f"{p.label}: stopped before finishing after {took}; run compare again to resume")
            else:
                reports[(p.run, p.seed)] = report
                say(f"{p.label}: finished in {took}, {_finished_line(report)}")
    finally:
        if started:
            ray.shutdown()


def runs_to_train(plan: Sequence[PlannedRun], reports: Mapping[tuple[str, int], Any],
                  only: Sequence[str] | None = None, report_only: bool = False,
                  seeds: Sequence[int] | None = None) -> list[PlannedRun]:
    """The planned runs (of `only` and `seeds`, if given) that have no report yet; none with
    `report_only`."""
    if report_only:
        return []
    todo = [p for p in plan if (not only or p.run in only) and (not seeds or p.seed in seeds)
            and reports.get((p.run, p.seed)) is None]
    pending = {(p.run, p.seed) for p in todo}
    for p in todo:
        if p.teacher_run and reports.get((p.teacher_run, p.seed)) is None and (p.teacher_run, p.seed) not in pending:
            raise ValueError(f"{p.label} distils from run {p.teacher_run!r}, which has not finished at seed "
                             f"{p.seed}: train it too (--only {p.teacher_run} {p.run})")
    teachers = {(p.teacher_run, p.seed) for p in todo if p.teacher_run}
    return sorted(todo, key=lambda p: (p.run, p.seed) not in teachers)  # stable: teachers first


def run_compare(spec: CompareSpec, plan: Sequence[PlannedRun], only: Sequence[str] | None = None,
                num_cpus: int | None = None, report_only: bool = False, allow_config_change: bool = False,
                verify_shards: bool = False, say: Callable[[str], None] | None = None,
                seeds: Sequence[int] | None = None) -> dict | None:
    """Train what `plan` (restricted to the runs `only` and the `seeds`) still lacks, then
    aggregate every report of the spec and write the comparison. Returns it, or None while no
    run has finished."""
    from .driver import read_report
    from .heldout import check_heldout
    from .preflight import preflight

    say = say or (lambda line: print(f"[compare] {line}", flush=True))
    if spec.test:
        check_heldout(spec.test, plan[0].cfg.model.num_classes if plan else None)
    unknown = sorted(set(only or ()) - set(spec.runs))
    if unknown:
        raise ValueError(f"--only: no run named {', '.join(map(repr, unknown))} in the spec "
                         f"(runs: {', '.join(spec.runs)})")
    if set(seeds or ()) - set(spec.seeds):
        raise ValueError(f"--seeds: {sorted(set(seeds) - set(spec.seeds))} not among the spec's seeds {spec.seeds}")
    reports = {(p.run, p.seed): read_report(p.output) for p in plan}
    for p in plan:
        if reports[(p.run, p.seed)] is not None:
            check_finished(p)
    todo = runs_to_train(plan, reports, only, report_only, seeds)
    waiting = {(p.run, p.seed) for p in todo}
    for p in todo:  # every check before the first run starts: a bad input costs nothing
        cfg = p.cfg  # a teacher this invocation trains first is checked when that run has finished
        if (p.teacher_run, p.seed) in waiting:
            cfg = cfg.model_copy(update={"pruning": cfg.pruning.model_copy(update={"teacher": None})})
        try:
            preflight(cfg, allow_config_change=allow_config_change, verify_shards=verify_shards)
        except ValueError as exc:
            raise ValueError(f"{p.label}: {exc}") from None
    for p in plan:
        if (not only or p.run in only) and (not seeds or p.seed in seeds) and reports[(p.run, p.seed)] is not None:
            say(f"{p.label}: reused ({p.output}, {_finished_line(reports[(p.run, p.seed)])})")
    if todo:
        train_runs(todo, reports, num_cpus, say)
    by_run = {run: {seed: reports[(run, seed)] for seed in spec.seeds} for run in spec.runs}
    if not any(r is not None for seeds in by_run.values() for r in seeds.values()):
        say("no run has finished yet: nothing to compare")
        return None
    heldout = score_heldout(spec, plan, reports, say) if spec.test else None
    comparison = aggregate(spec.name, by_run, spec.baseline, heldout)
    write_comparison(comparison, spec.out_dir)
    return comparison


def score_heldout(spec: CompareSpec, plan: Sequence[PlannedRun], reports: Mapping[tuple[str, int], Any],
                  say: Callable[[str], None]) -> dict[str, dict[int, dict[str, Any]]]:
    """Every finished run's shipped model scored on the spec's held-out source: `{run: {seed: figures}}`."""
    from .heldout import score_runs

    finished = {(p.run, p.seed): (p.output, p.cfg.data, reports[(p.run, p.seed)])
                for p in plan if reports.get((p.run, p.seed)) is not None}
    scored = score_runs(finished, spec.test, spec.out_dir, say)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for (run, seed), figures in scored.items():
        out.setdefault(run, {})[seed] = figures
    return out


# -- aggregation (pure) -----------------------------------------------------------------------
def shipped_stage(report: Mapping[str, Any]) -> str:
    """The stage whose model the run shipped: `compacted_<mode>` for a compacted model (soft
    pruning picks hard or faithful; PFEC ships hard), `final` for a dense model."""
    mode, stages = report.get("compact_mode"), report.get("stages") or {}
    key = "final" if mode in (None, "dense") else f"compacted_{mode}"
    for candidate in (key, "final"):
        if isinstance(stages.get(candidate), Mapping) and "top1" in stages[candidate]:
            return candidate
    raise ValueError(f"report of run {report.get('name')!r}: no top-1 for its shipped stage {key!r} "
                     f"(compact_mode {mode!r}; stages: {', '.join(stages) or 'none'})")


def _cut(report: Mapping[str, Any], key: str) -> float | None:
    """Fraction of the dense count the shipped model removed (0.0: nothing)."""
    dense, pruned = (report.get("dense") or {}).get(key), (report.get("pruned") or {}).get(key)
    return 1.0 - pruned / dense if dense and pruned is not None else None


def stats(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; None below two values) of the values given."""
    present = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) > 1 else None, "n": len(present)}


def _event_value(events: Sequence[Mapping], epoch: int, value: Callable[[Mapping], float | None],
                 before: float) -> float:
    """The value of the last event at or before `epoch` that has one (`before` if none)."""
    found = before
    for event in events:
        if event.get("epoch", 0) <= epoch and value(event) is not None:
            found = value(event)
    return found


def pruning_by_epoch(report: Mapping[str, Any], epochs: Sequence[int]) -> dict[str, list[float]]:
    """The rate of the latest mask event at each epoch's end (0 before any; frozen events, which
    hold the masks, carry no rate and keep the last one), and the MACs the masks keep."""
    events = sorted(report.get("mask_history") or [], key=lambda e: e.get("epoch", 0))
    dense = (report.get("dense") or {}).get("macs")

    def kept(event: Mapping) -> float | None:
        return event["macs"] / dense if dense and event.get("macs") is not None else None

    return {"rate": [_event_value(events, e, lambda ev: ev.get("rate"), 0.0) for e in epochs],
            "macs_kept": [_event_value(events, e, kept, 1.0) for e in epochs]}


# A soft event that flips fewer than this fraction of the mask slots leaves the masks as they were,
# near enough: on ResNet-20 that is one filter in a hundred
SETTLED_CHURN = 0.01


def _soft_events(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The soft mask events (rate set, not hard), in the order they happened."""
    return sorted((e for e in report.get("mask_history") or [] if not e.get("hard") and e.get("rate") is not None),
                  key=lambda e: (e.get("epoch", 0), e.get("global_step") or 0))


def churn_by_epoch(report: Mapping[str, Any], epochs: Sequence[int]) -> list[float]:
    """Per epoch, the fraction of the mask slots that the soft events of that epoch flipped
    (summed when several events fall in one epoch; 0 where none did)."""
    flipped = {e: 0.0 for e in epochs}
    for event in _soft_events(report):
        if event.get("epoch", 0) in flipped:
            flipped[event.get("epoch", 0)] += event.get("churn") or 0.0
    return [flipped[e] for e in epochs]


def mask_settling(report: Mapping[str, Any]) -> dict[str, float | None]:
    """When the soft masks stopped moving: `settled_epoch`, the epoch of the earliest soft event
    from which on every soft event flipped fewer than SETTLED_CHURN of the slots (None without
    soft events, or when the last one still flipped more), and `churn_total`, the flips summed
    over all soft events (None without soft events)."""
    events = _soft_events(report)
    if not events:
        return {"settled_epoch": None, "churn_total": None}
    churn = [e.get("churn") or 0.0 for e in events]
    settled = None
    for event, flips in zip(reversed(events), reversed(churn)):
        if flips >= SETTLED_CHURN:
            break
        settled = event.get("epoch", 0)
    return {"settled_epoch": settled, "churn_total": sum(churn)}


def seed_figures(report: Mapping[str, Any]) -> dict[str, Any]:
    """One seed's numbers: shipped top-1 and stage, sizes, curves and pruning per epoch."""
    stage = shipped_stage(report)
    soft = (report.get("stages") or {}).get("soft")
    history = sorted(report.get("history") or [], key=lambda h: h["epoch"])
    epochs = [h["epoch"] for h in history]
    return {
        "top1": report["stages"][stage]["top1"], "stage": stage, "compact_mode": report.get("compact_mode"),
        "soft_top1": soft.get("top1") if isinstance(soft, Mapping) else None,
        "dense": dict(report.get("dense") or {}), "pruned": dict(report.get("pruned") or {}),
        "macs_cut": _cut(report, "macs"), "params_cut": _cut(report, "params"),
        "epochs": epochs, "val_top1": [h.get("val_top1") for h in history],
        "train_loss": [h.get("train_loss") for h in history],
        **pruning_by_epoch(report, epochs), "churn": churn_by_epoch(report, epochs), **mask_settling(report),
        "mask_events": [{k: e.get(k) for k in ("epoch", "at", "rate", "hard", "macs", "params")}
                        for e in report.get("mask_history") or []],
        "written_at": report.get("written_at"), "method": report.get("method"),
    }


def mean_curves(per_seed: Mapping[int, Mapping[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Per epoch, mean and std over the seeds that reached it, for each key."""
    epochs = sorted({e for fig in per_seed.values() for e in fig["epochs"]})
    out: dict[str, Any] = {"epoch": epochs}
    for key in keys:
        by_epoch = [[dict(zip(fig["epochs"], fig[key])).get(e) for fig in per_seed.values()] for e in epochs]
        figures = [stats(values) for values in by_epoch]
        out[key] = {"mean": [f["mean"] for f in figures], "std": [f["std"] for f in figures],
                    "n": [f["n"] for f in figures]}
    return out


def summarize_run(reports: Mapping[int, Mapping[str, Any] | None],
                  heldout: Mapping[int, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """One run over its seeds (`{seed: report or None}`): means, stds, n, and every seed's figures.
    `heldout` (`{seed: figures}`) adds each seed's held-out top-1 (`test_top1`)."""
    per_seed = {seed: seed_figures(r) for seed, r in reports.items() if r is not None}
    for seed, fig in per_seed.items():
        fig["test_top1"] = (heldout or {}).get(seed, {}).get("top1")
    figs = list(per_seed.values())
    return {
        "method": figs[0]["method"] if figs else None,  # one config per run: the same on every seed
        "n": len(figs), "seeds": sorted(per_seed), "missing_seeds": sorted(s for s, r in reports.items() if r is None),
        "shipped_stages": sorted({f["stage"] for f in figs}),
        "top1": stats(f["top1"] for f in figs), "soft_top1": stats(f["soft_top1"] for f in figs),
        "test_top1": stats(f["test_top1"] for f in figs),
        "macs": stats(f["pruned"].get("macs") for f in figs), "dense_macs": stats(f["dense"].get("macs") for f in figs),
        "params": stats(f["pruned"].get("params") for f in figs),
        "dense_params": stats(f["dense"].get("params") for f in figs),
        "macs_cut": stats(f["macs_cut"] for f in figs), "params_cut": stats(f["params_cut"] for f in figs),
        "curves": mean_curves(per_seed, ("val_top1", "train_loss")),
        "pruning": mean_curves(per_seed, ("rate", "macs_kept", "churn")),
        "settled_epoch": stats(f["settled_epoch"] for f in figs), "churn_total": stats(f["churn_total"] for f in figs),
        "per_seed": {str(seed): fig for seed, fig in per_seed.items()},
    }


# Student's t at 0.975 for 1 to 30 degrees of freedom (the normal's 1.96 beyond): with a handful
# of seeds the interval is far wider than mean ± std/sqrt(n) (3 seeds: 4.3 std/sqrt(n))
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def ci95_half_width(figure: Mapping[str, Any]) -> float | None:
    """Half-width of the 95% t interval of a `stats` mean (None below two values)."""
    n, std = figure["n"], figure["std"]
    if std is None or n < 2:
        return None
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return t * std / math.sqrt(n)


def _paired_delta(run: Mapping[str, Any], base: Mapping[str, Any], key: str) -> tuple[dict, float | None, list[int]]:
    """Mean over the seeds both runs have `key` for of (run - base), its 95% half-width, the seeds."""
    common = sorted((s for s in set(run["per_seed"]) & set(base["per_seed"])
                     if run["per_seed"][s].get(key) is not None and base["per_seed"][s].get(key) is not None), key=int)
    paired = stats(run["per_seed"][s][key] - base["per_seed"][s][key] for s in common)
    return paired, ci95_half_width(paired), [int(s) for s in common]


def _delta(run: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """Top-1 of `run` minus the baseline's: of the means, and paired over the seeds both have
    (with its 95% interval: a gap whose interval holds 0 is not resolved by these seeds); the
    same for held-out top-1 (`test_*`) where both were scored."""
    mean, ref = run["top1"]["mean"], base["top1"]["mean"]
    paired, half, seeds = _paired_delta(run, base, "top1")
    test, test_half, test_seeds = _paired_delta(run, base, "test_top1")
    return {"top1": mean - ref if mean is not None and ref is not None else None,
            "paired": paired, "paired_ci95": half, "paired_seeds": seeds,
            "test_paired": test, "test_paired_ci95": test_half, "test_paired_seeds": test_seeds}


def aggregate(name: str, reports: Mapping[str, Mapping[int, Mapping[str, Any] | None]],
              baseline: str | None = None,
              heldout: Mapping[str, Mapping[int, Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """The comparison of `{run: {seed: report or None}}` (runs in table order); deltas are taken
    against `baseline` (default: the first run). `heldout` (`{run: {seed: figures}}`, from
    `score_heldout`) adds held-out top-1 and its paired deltas."""
    if not reports:
        raise ValueError("nothing to aggregate: no runs")
    baseline = baseline or next(iter(reports))
    if baseline not in reports:
        raise ValueError(f"baseline {baseline!r} is not one of the runs ({', '.join(reports)})")
    runs = {run: summarize_run(seeds, (heldout or {}).get(run)) for run, seeds in reports.items()}
    for summary in runs.values():
        summary["delta_vs_baseline"] = _delta(summary, runs[baseline])
    return {"name": name, "baseline": baseline, "seeds": sorted({s for seeds in reports.values() for s in seeds}),
            "runs": runs, "heldout": _heldout_source(heldout), "created_at": time.time()}


def _heldout_source(heldout: Mapping[str, Mapping[int, Mapping[str, Any]]] | None) -> dict[str, Any] | None:
    """Which held-out set the runs were scored on (the first figure's; score_runs uses one)."""
    first = next((f for seeds in (heldout or {}).values() for f in seeds.values()), None)
    return {k: first.get(k) for k in ("source", "split", "samples", "identity")} if first else None


# -- the table and the files ------------------------------------------------------------------
def _pct(figure: Mapping[str, Any], signed: bool = False) -> str:
    if figure.get("mean") is None:
        return "-"
    text = f"{100 * figure['mean']:+.2f}" if signed else f"{100 * figure['mean']:.2f}"
    return text + (f" ± {100 * figure['std']:.2f}" if figure.get("std") is not None else "")


def _paired(delta: Mapping[str, Any], is_base: bool, prefix: str = "") -> str:
    paired, half = delta[f"{prefix}paired"], delta.get(f"{prefix}paired_ci95")
    if is_base or paired["mean"] is None:
        return "-"
    spread = f" ± {100 * half:.2f}" if half is not None else ""
    return f"{100 * paired['mean']:+.2f}{spread} ({paired['n']})"


def _settled(summary: Mapping[str, Any]) -> str:
    """Mean ± std of the epoch the soft masks settled at, and how many seeds' masks never did."""
    figure, soft = summary["settled_epoch"], summary["churn_total"]["n"]
    if not soft:
        return "-"
    text = "never" if figure["mean"] is None else (
        f"{figure['mean']:.1f}" + (f" ± {figure['std']:.1f}" if figure.get("std") is not None else ""))
    return text + (f" ({soft - figure['n']} never)" if figure["n"] and figure["n"] < soft else "")


def markdown_table(comparison: Mapping[str, Any]) -> str:
    """The comparison as a markdown table: one row per run, figures in percent."""
    base, heldout = comparison["baseline"], comparison.get("heldout")
    head = ["run", "method", "seeds", "shipped top-1 (%)", f"Δ top-1 vs {base} (pp)", "paired Δ ± 95% (pp)",
            *(["held-out top-1 (%)", "held-out paired Δ ± 95% (pp)"] if heldout else []),
            "soft-masked top-1 (%)", "masks settled (epoch)", "MACs cut (%)", "params cut (%)", "shipped stage"]
    rows = [head, ["---"] * len(head)]
    total = len(comparison["seeds"])
    for run, s in comparison["runs"].items():
        seeds = f"{s['n']}/{total}" + (f" (missing {', '.join(map(str, s['missing_seeds']))})"
                                        if s["missing_seeds"] else "")
        delta = "baseline" if run == base else _pct({"mean": s["delta_vs_baseline"]["top1"]}, signed=True)
        test = [_pct(s["test_top1"]), _paired(s["delta_vs_baseline"], run == base, "test_")] if heldout else []
        rows.append([run, s["method"] or "-", seeds, _pct(s["top1"]), delta, _paired(s["delta_vs_baseline"], run == base),
                     *test, _pct(s["soft_top1"]), _settled(s),
                     _pct({"mean": s["macs_cut"]["mean"]}), _pct({"mean": s["params_cut"]["mean"]}),
                     ", ".join(s["shipped_stages"]) or "-"])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    note = (f"\nTop-1 over {total} seed(s) {comparison['seeds']}: mean ± sample std. Δ: difference of the means, "
            f"in percentage points. Paired Δ: the mean over the seeds both runs finished of (run - {base}), "
            f"± the half-width of its 95% t interval (seeds in brackets); an interval that holds 0 does not "
            f"separate the two runs. Masks settled: the epoch of the soft event from which on no soft "
            f"event flipped {100 * SETTLED_CHURN:.0f}% or more of the mask slots.\n")
    if heldout:
        note += (f"Held-out: the shipped models scored on {heldout['samples']} images of {heldout['source']} "
                 f"(split {heldout['split']}), which no run trained on or chose what it shipped by.\n")
    return f"# Comparison {comparison['name']}\n\n" + "\n".join(lines) + "\n" + note


def write_comparison(comparison: Mapping[str, Any], out_dir: str) -> list[str]:
    """compare.json, compare.md and the plots into `out_dir` (a local path or a URI): drawn into a
    local scratch folder and copied over, compare.json last. Returns the files' names."""
    from .compare_plots import write_compare_plots

    staging = storage.scratch_dir("sp_compare_")
    try:
        (staging / "compare.md").write_text(markdown_table(comparison))
        write_compare_plots(comparison, staging)
        (staging / "compare.json").write_text(json.dumps(comparison, indent=1))
        return storage.upload_dir(staging, out_dir, last=["compare.json"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
