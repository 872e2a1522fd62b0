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
        self.coord = Coordinator(run.model, groups, run.engine)
        self.groups = groups
        state = state or {}
        self.masks = MaskSet.from_state(state["masks"]) if state.get("masks") is not None else None
        self.history: list[dict] = list(state.get("history", []))
        self.dense_macs = (run.state.dense_counts or {}).get("macs")
        if self.masks is not None:
            self.masks.check(groups)  # a checkpoint's masks must fit this model's groups

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.to_state() if self.masks is not None else None, "history": self.history}

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

    def mask_event(self, run: Run, choose, hard: bool, rate: float | None) -> None:
        """One coordinator event (collective on every rank) plus its statistics."""
        masks, stats = self.coord.event(choose, hard=hard, zero_moments=self.p.zero_moments or hard,
                                        previous=self.masks)
        self.masks = masks
        cost = _masked_cost(run, self.groups, masks)
        self.history.append({
            "epoch": run.state.epoch, "rate": rate, "hard": hard, "hash": stats["hash"],
            "rank_hashes": stats["rank_hashes"], "churn": stats["churn"], "seconds": stats["seconds"],
            "regrowth": stats["regrowth"], **cost})
        per_layer = {f"prune/kept/{k}": v for k, v in stats["kept_fraction"].items()}
        per_layer.update({f"prune/churn_by_group/{k}": v for k, v in stats["churn_per_group"].items()})
        per_layer.update({f"prune/regrowth_by_layer/{k}": v for k, v in stats["regrowth"].items()})
        grown = list(stats["regrowth"].values())
        run.logger.log({"epoch": run.state.epoch, "prune/rate": rate or 0.0, "prune/churn": stats["churn"] or 0.0,
                        "prune/regrowth": sum(grown) / len(grown) if grown else 0.0,
                        "prune/coordinator_seconds": stats["seconds"], "prune/macs": cost["macs"],
                        "prune/params": cost["params"], **per_layer})


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
        self._restored: Mapping[str, Any] = {}

    def extra_epochs(self) -> int:
        return self.cfg.pruning.finetune_epochs

    def state_dict(self) -> dict[str, Any]:
        masker = self.masker.state_dict() if self.masker is not None else dict(self._restored)
        return {**masker, "frozen": self.frozen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._restored, self.frozen = dict(state), bool(state.get("frozen", False))

    def progress(self) -> dict[str, float | None]:
        return self.masker.progress() if self.masker is not None else super().progress()

    def on_train_start(self, run: Run) -> None:
        _count_dense(run)
        self.masker = Masker(self.cfg, run, self._restored)  # resumed: the checkpoint's masks
        if self.frozen:
            self.freezer = GradientFreezer(run.model, self.masker.groups, self.masker.masks)

    def on_epoch_start(self, run: Run) -> None:
        if run.state.epoch == self.frozen_from and not self.frozen:
            self.finalize_masks(run)

    def on_epoch_end(self, run: Run) -> None:
        from pruning import is_prune_epoch

        epoch, m = run.state.epoch, self.masker
        if self.frozen:  # re-apply the same hard masks: keeps the frozen zeros exact
            m.mask_event(run, m.keep_current(), hard=True, rate=None)
        elif is_prune_epoch(self.cfg.pruning, epoch) or epoch + 1 == self.frozen_from:
            m.mask_event(run, m.chooser(self.rate(epoch), epoch), hard=False, rate=self.rate(epoch))

    def on_finish(self, run: Run) -> None:
        if not self.frozen:
            self.finalize_masks(run)
        elif run.state.epoch > self.frozen_from:
            run.record_stage("finetuned", run.last_eval)
        self.compact_and_write(run)

    def finalize_masks(self, run: Run) -> None:
        """Soft -> frozen: keep the faithful compaction of the soft model, hard mask, recalibrate
        BN, hold the masks. Every stage is evaluated. Collective."""
        m, cfg = self.masker, self.cfg
        if m.masks is None:  # frozen before any soft event (freeze epoch 0): choose masks now
            rate = self.rate(max(run.state.epoch - 1, 0))
            m.mask_event(run, m.chooser(rate, run.state.epoch), hard=False, rate=rate)
        run.record_stage("soft", run.last_eval or run.evaluate())
        self._faithful_candidate(run)
        m.mask_event(run, m.keep_current(), hard=True, rate=None)
        run.record_stage("hard", run.evaluate())
        run.train_loader.set_epoch(run.state.epoch)
        used = recalibrate_bn(run.model, run.train_loader, cfg.data.mean, cfg.data.std,
                              cfg.pruning.recalibrate_batches)
        run.record_stage("recalibrated", dict(run.evaluate(), batches=used))
        run.last_eval = run.state.stages["recalibrated"]
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
            save_compact(run.checkpoint_files / "faithful", model, spec, {"stage": "compacted_faithful", **metrics})

    def compact_and_write(self, run: Run) -> None:
        """Hard-compact the finalized model, evaluate it, pick the mode, write the outputs."""
        from pruning import compact, load_compact

        m = self.masker
        model, spec = compact(_cpu_copy(run.model), m.groups, m.masks, mode="hard", input_size=run.input_size)
        run.record_stage("compacted_hard", run.evaluate_candidate(model))
        mode, stages = self.cfg.pruning.compact_mode, run.state.stages
        if mode == "best":
            faithful = stages.get("compacted_faithful", {}).get("top1", -1.0)
            mode = "faithful" if faithful > stages["compacted_hard"].get("top1", -1.0) else "hard"
        if mode == "faithful" and run.rank == 0:  # rank-dependent: only rank 0 writes the outputs
            model, spec, _ = load_compact(run.checkpoint_files / "faithful")
        write_outputs(run, model, spec, chosen=mode, extra={"mask_history": m.history})


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

    def on_epoch_start(self, run: Run) -> None:
        from pruning import compact, make_schedule

        p, state = self.cfg.pruning, run.state
        if self.compacted or state.epoch != p.prune_epoch:
            return
        m = Masker(self.cfg, run)
        rate = make_schedule(p, self.cfg.epochs)(state.epoch)
        m.mask_event(run, m.chooser(rate, state.epoch), hard=True, rate=rate)
        self.history, self.last_progress = m.history, m.progress()
        run.record_stage("pruned_masked", run.evaluate())
        model, spec = compact(_cpu_copy(run.model), m.groups, m.masks, mode="hard", input_size=run.input_size)
        run.replace_model(model, spec)  # collective: a new DeepSpeed engine at the smaller shape
        self.compacted = True
        run.record_stage("compacted_before_retrain", run.evaluate())

    def on_finish(self, run: Run) -> None:
        run.record_stage("compacted_hard" if self.compacted else "final", run.last_eval)
        write_outputs(run, run.model, _spec(run.model), chosen="hard" if self.compacted else "dense",
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
