"""Pruning methods as event handlers: the only place that maps a method onto the training loop.

Events (called by trainer.train on every rank, in the same order):
  on_train_start  after the run is built or restored
  on_epoch_start  before an epoch's steps
  on_step_end     after every optimizer step
  on_epoch_end    after an epoch's steps, before evaluation and the checkpoint
  on_finish       after the last epoch: finalize, compact, write the outputs

`NoPruning` (method none), `SoftPruning` (sfp, asfp: soft masks at epoch ends, then finalize) and
`HardPruning` (pfec: one hard prune, compaction mid-run, retraining of the smaller model).
Selection (coordinator + pruning.select) is kept apart from action (apply, compact).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from . import faults
from .config import TrainConfig
from .coordinator import Coordinator, GradientFreezer
from .evaluation import recalibrate_bn
from .outputs import write_outputs

if TYPE_CHECKING:
    from .worker import Run


class Algorithm(Protocol):
    """What the training loop calls. An algorithm owns its state: the run's checkpoint stores
    `state_dict()` as an opaque dict and hands it back through `load_state_dict()` (before
    `on_train_start`) when the run resumes."""

    def extra_epochs(self) -> int: ...  # epochs it adds after `epochs` (frozen-mask fine-tuning)
    def on_train_start(self, run: Run) -> None: ...
    def on_epoch_start(self, run: Run) -> None: ...
    def on_step_end(self, run: Run) -> None: ...
    def on_epoch_end(self, run: Run) -> None: ...
    def on_finish(self, run: Run) -> None: ...
    def progress(self) -> dict[str, float | None]: ...  # for the progress line: rate, macs_kept
    def epoch_stats(self, run: Run) -> dict[str, float]: ...  # extra per-epoch figures (history, wandb)
    def loss(self, run: Run, inputs, logits, labels): ...  # the training loss of a micro-batch
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class NoPruning:
    """Dense training: the events only evaluate and write the final model."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def extra_epochs(self) -> int:
        return 0

    def on_train_start(self, run: Run) -> None:
        _count_dense(run)

    def on_epoch_start(self, run: Run) -> None:
        pass

    def on_step_end(self, run: Run) -> None:
        pass

    def on_epoch_end(self, run: Run) -> None:
        pass

    def on_finish(self, run: Run) -> None:
        run.record_stage("final", run.last_eval)
        write_outputs(run, run.model, _spec(run.model), chosen="dense")

    def progress(self) -> dict[str, float | None]:
        return {"rate": None, "macs_kept": None}

    def epoch_stats(self, run: Run) -> dict[str, float]:
        return _filter_norms(run)

    def loss(self, run: Run, inputs, logits, labels):
        """Cross-entropy, or the teacher's distillation loss once `distilling()` says so."""
        import torch.nn.functional as F

        p = self.cfg.pruning
        if p.teacher is None or not self.distilling():
            return F.cross_entropy(logits.float(), labels)
        if getattr(self, "_teacher", None) is None:  # every rank reaches this at the same micro-step
            from .distill import load_teacher

            self._teacher = load_teacher(p.teacher, run)  # collective for teacher=self
        return self._teacher.loss(inputs, logits, labels, p.distill_alpha, p.distill_temperature)

    def distilling(self) -> bool:
        """Whether the teacher's loss applies now (frozen masks, PFEC retraining)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class Masker:
    """Selection + action for one set of channel groups: chooses masks on rank 0 through the
    coordinator, and keeps the current masks and every event's statistics (its state)."""

    def __init__(self, cfg: TrainConfig, run: Run, state: Mapping[str, Any] | None = None):
        from pruning import MaskSet, groups_from_config, make_chooser

        self.p = cfg.pruning
        groups = groups_from_config(run.model, cfg.pruning)
        self._choose = make_chooser(groups, cfg.pruning)
        self.coord = Coordinator(run.model, groups, run.engine, criterion=cfg.pruning.criterion)
        self.groups = groups
        state = state or {}
        self.masks = MaskSet.from_state(state["masks"]) if state.get("masks") is not None else None
        self.history: list[dict] = list(state.get("history", []))
        self.dense_macs = (run.state.dense_counts or {}).get("macs")
        if self.masks is not None:
            self.masks.check(groups)  # a checkpoint's masks must fit this model's groups
        self.norm_targets: dict[str, float] | None = state.get("norm_targets")
        if self.p.norm_control == "init" and self.norm_targets is None:
            from pruning.renorm import mean_nonzero

            # at the start of training; one all-reduce of per-filter norms under ZeRO, no gather
            # (collective: every rank builds its Masker here)
            self.norm_targets = mean_nonzero(self.coord.filter_norms(("l2",))["l2"])

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.to_state() if self.masks is not None else None, "history": self.history,
                "norm_targets": self.norm_targets}

    def progress(self) -> dict[str, float | None]:
        """The latest rate and the fraction of the dense MACs the masks keep; None before any event."""
        rates = [e["rate"] for e in self.history if e.get("rate") is not None]
        macs = self.history[-1].get("macs") if self.history else None
        return {"rate": rates[-1] if rates else None,
                "macs_kept": macs / self.dense_macs if macs and self.dense_macs else None}

    def chooser(self, rate: float, epoch: int):
        def choose(tensors):  # runs on rank 0 only
            faults.inject("select", 0)
            return self._choose(tensors, rate, epoch)
        return choose

    def keep_current(self):
        return lambda tensors: self.masks

    def mask_event(self, run: Run, choose, hard: bool, rate: float | None, at: float | None = None) -> None:
        """One coordinator event (collective on every rank) plus its statistics. `at`: the
        fractional epoch of a step-counted event (None: the end of `run.state.epoch`)."""
        if self.masks is None and self.p.teacher == "self":
            from .distill import save_self

            save_self(run)  # the weights before the first mask: the run's own teacher
        masks, stats = self.coord.event(choose, hard=hard, zero_moments=self.p.zero_moments or hard,
                                        previous=self.masks, norm_targets=None if hard else self.norm_targets)
        self.masks = masks
        cost = _masked_cost(run, self.groups, masks)
        self.history.append({
            "epoch": run.state.epoch, "at": at if at is not None else run.state.epoch + 1.0,
            "global_step": run.state.global_step, "rate": rate, "hard": hard, "hash": stats["hash"],
            "rank_hashes": stats["rank_hashes"], "churn": stats["churn"], "seconds": stats["seconds"],
            "regrowth": stats["regrowth"], "norm_scale": stats["norm_scale"], **cost})
        per_layer = {f"prune/kept/{k}": v for k, v in stats["kept_fraction"].items()}
        per_layer.update({f"prune/churn_by_group/{k}": v for k, v in stats["churn_per_group"].items()})
        per_layer.update({f"prune/regrowth_by_layer/{k}": v for k, v in stats["regrowth"].items()})
        grown = list(stats["regrowth"].values())
        run.logger.log({"epoch": run.state.epoch, "prune/rate": rate or 0.0, "prune/churn": stats["churn"] or 0.0,
                        "prune/regrowth": sum(grown) / len(grown) if grown else 0.0,
                        "prune/coordinator_seconds": stats["seconds"], "prune/macs": cost["macs"],
                        "prune/params": cost["params"], **per_layer,
                        **({"prune/norm_scale": stats["norm_scale"]} if stats["norm_scale"] is not None else {})})


class SoftPruning(NoPruning):
    """SFP / ASFP: soft masks at epoch ends at the schedule's rate; from the freeze epoch (or at
    the end) finalize: hard mask, BN recalibration, frozen-mask fine-tuning, compaction."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        from pruning import make_schedule

        self.rate = make_schedule(cfg.pruning, cfg.epochs)
        p = cfg.pruning
        self.frozen_from = min(p.freeze_epoch if p.freeze_epoch is not None else cfg.epochs, cfg.epochs)
        self.masker: Masker | None = None
        self.freezer: GradientFreezer | None = None
        self.frozen = False  # masks are hard and held (finalized, or the freeze epoch reached)
        self.compacted = False  # frozen and training the compacted model (pruning.compact_at_freeze)
        self._restored: Mapping[str, Any] = {}

    def extra_epochs(self) -> int:
        return self.cfg.pruning.finetune_epochs

    def state_dict(self) -> dict[str, Any]:
        masker = self.masker.state_dict() if self.masker is not None else dict(self._restored)
        state = {**masker, "frozen": self.frozen, "compacted": self.compacted}
        if self.compacted:  # a resumed compact run has no masker: its progress line comes from here
            state["progress"] = self.progress()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._restored, self.frozen = dict(state), bool(state.get("frozen", False))
        self.compacted = bool(state.get("compacted", False))

    def progress(self) -> dict[str, float | None]:
        if self.masker is not None:
            return self.masker.progress()
        return dict(self._restored.get("progress") or super().progress())

    def epoch_stats(self, run: Run) -> dict[str, float]:
        m = self.masker
        compacted = getattr(self, "compacted", False)  # a compact model has no masked filters left
        return _filter_norms(run, m.groups, m.masks) if m is not None and not compacted else _filter_norms(run)

    def distilling(self) -> bool:
        return self.frozen

    def on_train_start(self, run: Run) -> None:
        _count_dense(run)
        if not self.frozen:
            _warn_few_steps(run, self.cfg)
        if self.compacted:  # resumed after the compaction: the masks were of the dense model
            return
        self.masker = Masker(self.cfg, run, self._restored)  # resumed: the checkpoint's masks
        if self.frozen:
            self.freezer = GradientFreezer(run.model, self.masker.groups, self.masker.masks)

    def on_epoch_start(self, run: Run) -> None:
        if run.state.epoch == self.frozen_from and not self.frozen:
            self.finalize_masks(run)

    def on_step_end(self, run: Run) -> None:
        """`pruning.every_steps`: a soft event every N optimizer steps, at the schedule's rate of
        the fractional epoch (global_step is the same on every rank, so all ranks take part)."""
        every, state = self.cfg.pruning.every_steps, run.state
        if (every is None or self.frozen or not self.cfg.pruning.start_epoch <= state.epoch < self.frozen_from
                or state.global_step % every):
            return
        loader = run.train_loader
        at = state.epoch + loader.samples_done() / max(loader.epoch_samples(), 1)
        m = self.masker
        m.mask_event(run, m.chooser(self.rate(at), state.epoch), hard=False, rate=self.rate(at), at=at)

    def on_epoch_end(self, run: Run) -> None:
        from pruning import is_prune_epoch

        if self.compacted:  # the compact model has no masks left to hold
            return
        epoch, m = run.state.epoch, self.masker
        by_epoch = self.cfg.pruning.every_steps is None and is_prune_epoch(self.cfg.pruning, epoch)
        if self.frozen:  # re-apply the same hard masks: keeps the frozen zeros exact
            m.mask_event(run, m.keep_current(), hard=True, rate=None)
        elif by_epoch or epoch + 1 == self.frozen_from:  # and always the last event before the freeze
            m.mask_event(run, m.chooser(self.rate(epoch), epoch), hard=False, rate=self.rate(epoch))

    def on_finish(self, run: Run) -> None:
        if not self.frozen:
            self.finalize_masks(run, then_train=False)
        elif run.state.epoch > self.frozen_from:
            run.record_stage("finetuned", run.last_eval)
        self.compact_and_write(run)

    def finalize_masks(self, run: Run, then_train: bool = True) -> None:
        """Soft -> frozen: keep the faithful compaction of the soft model, hard mask, recalibrate
        BN, hold the masks: with `pruning.compact_at_freeze` (and training to follow) by going on
        with the hard-compacted model, its optimizer state cut to the kept channels; else with
        gradient hooks on the full-size model. Every stage is evaluated. Collective."""
        m, cfg = self.masker, self.cfg
        if m.masks is None:  # frozen before any soft event (freeze epoch 0): choose masks now
            rate = self.rate(max(run.state.epoch - 1, 0))
            m.mask_event(run, m.chooser(rate, run.state.epoch), hard=False, rate=rate)
        run.record_stage("soft", run.last_eval or run.evaluate())
        self._faithful_candidate(run)
        m.mask_event(run, m.keep_current(), hard=True, rate=None)
        run.record_stage("hard", run.evaluate())
        stage = "hard"
        if cfg.pruning.recalibrate_batches:  # the config, not `used`: every rank takes the same branch
            run.train_loader.set_epoch(run.state.epoch)
            used = recalibrate_bn(run.model, run.train_loader, cfg.data.mean, cfg.data.std,
                                  cfg.pruning.recalibrate_batches, cfg.scaling.channels_last)
            stage = "recalibrated"
            run.record_stage(stage, dict(run.evaluate(), batches=used))
        run.last_eval = run.state.stages[stage]
        if then_train and cfg.pruning.compact_at_freeze:
            from .compaction import compact_run

            compact_run(run, m.groups, m.masks)  # sync point: a new engine
            self.compacted = True
        else:
            self.freezer = GradientFreezer(run.model, m.groups, m.masks)
        self.frozen = True

    def _faithful_candidate(self, run: Run) -> None:
        """Compact the soft-masked model in faithful mode, evaluate it, and keep it in the run's
        carry directory (it rides in every checkpoint) for the final choice."""
        from pruning import compact, save_compact

        model, spec = compact(_cpu_copy(run.model), self.masker.groups, self.masker.masks, mode="faithful",
                              input_size=run.input_size)
        metrics = run.evaluate_candidate(model)
        run.record_stage("compacted_faithful", metrics)
        if run.rank == 0:  # rank-dependent: one writer
            from .model_setup import run_spec

            save_compact(run.checkpoint_files / "faithful", model, run_spec(run.cfg, spec),
                         {"stage": "compacted_faithful", **metrics})

    def compact_and_write(self, run: Run) -> None:
        """Hard-compact the finalized model (compacted at the freeze: the model itself), evaluate
        it, pick the mode, write the outputs."""
        from pruning import compact, load_compact

        if self.compacted:
            model, spec = _cpu_copy(run.model), run.state.arch_spec
            run.record_stage("compacted_hard", run.last_eval or run.evaluate())
        else:
            m = self.masker
            model, spec = compact(_cpu_copy(run.model), m.groups, m.masks, mode="hard", input_size=run.input_size)
            run.record_stage("compacted_hard", run.evaluate_candidate(model))
        mode, stages = self.cfg.pruning.compact_mode, run.state.stages
        if mode == "best":
            faithful = stages.get("compacted_faithful", {}).get("top1", -1.0)
            mode = "faithful" if faithful > stages["compacted_hard"].get("top1", -1.0) else "hard"
        if mode == "faithful" and run.rank == 0:  # rank-dependent: only rank 0 writes the outputs
            model, spec, _ = load_compact(run.checkpoint_files / "faithful")
        write_outputs(run, model, spec, chosen=mode, extra={"mask_history": self.state_dict().get("history", [])})


class HardPruning(NoPruning):
    """PFEC: at the start of `prune_epoch` one hard prune at the schedule's rate, compaction, and a
    fresh engine for the smaller model; the remaining epochs retrain it."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.compacted = False
        self.history: list[dict] = []  # the prune event's statistics
        self.last_progress: dict[str, float | None] = super().progress()

    def state_dict(self) -> dict[str, Any]:
        return {"compacted": self.compacted, "history": self.history, "progress": self.last_progress}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.compacted = bool(state.get("compacted", False))
        self.history = list(state.get("history", []))
        self.last_progress = dict(state.get("progress") or super().progress())

    def progress(self) -> dict[str, float | None]:
        return self.last_progress

    def distilling(self) -> bool:
        return self.compacted

    def on_epoch_start(self, run: Run) -> None:
        from pruning import make_schedule

        from .compaction import compact_run

        p, state = self.cfg.pruning, run.state
        if self.compacted or state.epoch != p.prune_epoch:
            return
        m = Masker(self.cfg, run)
        rate = make_schedule(p, self.cfg.epochs)(state.epoch)
        m.mask_event(run, m.chooser(rate, state.epoch), hard=True, rate=rate)
        self.history, self.last_progress = m.history, m.progress()
        run.record_stage("pruned_masked", run.evaluate())
        compact_run(run, m.groups, m.masks)  # sync point: a new engine, the optimizer state cut to fit
        self.compacted = True
        run.record_stage("compacted_before_retrain", run.evaluate())

    def on_finish(self, run: Run) -> None:
        run.record_stage("compacted_hard" if self.compacted else "final", run.last_eval)
        spec = run.state.arch_spec if self.compacted else _spec(run.model)  # a compact user model has no meta
        write_outputs(run, run.model, spec, chosen="hard" if self.compacted else "dense",
                      extra={"mask_history": self.history})


def total_epochs(cfg: TrainConfig) -> int:
    """Training epochs plus what the configured algorithm adds (frozen-mask fine-tuning)."""
    return cfg.epochs + make_algorithm(cfg).extra_epochs()


def make_algorithm(cfg: TrainConfig) -> Algorithm:
    """The event handler for the configured method."""
    method = cfg.pruning.method
    if method in ("sfp", "asfp"):
        return SoftPruning(cfg)
    if method == "pfec":
        return HardPruning(cfg)
    return NoPruning(cfg)


# Fewer optimizer steps than this between soft events and the pruned filters' old momentum and
# weight norms dominate what regrows; the papers had 391 (CIFAR-10) to ~5,000 (ImageNet).
MIN_STEPS_BETWEEN_EVENTS = 200


def _warn_few_steps(run: Run, cfg: TrainConfig) -> None:
    """One line on rank 0 when soft mask events come fewer than ~200 optimizer steps apart."""
    import math

    p = cfg.pruning
    per_epoch = max(len(run.train_loader) // max(run.accum, 1), 1)
    between = p.every_steps if p.every_steps is not None else p.every * per_epoch
    if run.rank != 0 or between >= MIN_STEPS_BETWEEN_EVENTS:
        return
    unit = f"pruning.every_steps={p.every_steps}" if p.every_steps else f"pruning.every={p.every} epoch(s) of {per_epoch} steps"
    print(f"[softprune] warning: {between} optimizer steps between mask events ({unit}); the SFP/ASFP papers "
          f"had 391 to ~5,000. Set pruning.every_steps={MIN_STEPS_BETWEEN_EVENTS} (or pruning.every="
          f"{math.ceil(MIN_STEPS_BETWEEN_EVENTS / per_epoch)}) for their regime.", flush=True)


def _filter_norms(run: Run, groups=None, masks=None) -> dict[str, float]:
    """Per conv: the kept filters' mean norm and effective LR, logged to wandb; returns the
    model-wide means for the epoch's history (see pruning/norms.py)."""
    from torch import nn

    from pruning.norms import filter_norm_stats, summarize

    model = run.model
    meta = getattr(model, "softprune_meta", None)
    convs = list(meta.bn) if meta is not None else [n for n, mod in model.named_modules()
                                                     if isinstance(mod, nn.Conv2d)]
    modules = dict(model.named_modules())
    weights = {c: modules[c].weight for c in convs if c in modules}
    lr = run.engine.optimizer.param_groups[0]["lr"]
    stats = filter_norm_stats(weights, lr, groups, masks)
    logged = {f"norms/{c}": s["norm"] for c, s in stats.items()}
    logged.update({f"eff_lr/{c}": s["eff_lr"] for c, s in stats.items()})
    total = summarize(stats)
    run.logger.log({"epoch": run.state.epoch, **logged, **{f"norms/mean_{k}": v for k, v in total.items()}})
    return {f"filter_{k}": v for k, v in total.items()}


def _spec(model) -> dict:
    from models import arch_spec

    return arch_spec(model)


def _cpu_copy(model):
    """A float32 CPU copy with the same weights (compaction must not touch the engine's module)."""
    import copy

    return copy.deepcopy(model).float().cpu().eval()


def _count_dense(run: Run) -> None:
    if run.state.dense_counts is None and run.state.arch_spec is None:  # a compacted model is no baseline
        from pruning import count_flops

        counts = count_flops(_cpu_copy(run.model), run.input_size)
        run.state.dense_counts = {"params": int(counts.params), "macs": int(counts.macs),
                                  "channels": _spec(run.model).get("channels", {})}


def _masked_cost(run: Run, groups, masks) -> dict[str, Any]:
    from pruning import masked_cost

    counts = masked_cost(run.model, groups, masks, run.input_size)
    return {"params": int(counts.params), "macs": int(counts.macs)}
