"""`Run`: what one Ray Train worker holds (model, engine, loaders, state, logger) and the
operations the loop and the pruning algorithms call on it (evaluate, checkpoint, replace the model).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import nn

from . import checkpoint as ckpt
from . import faults, watchdog
from .collectives import rank_world
from .config import TrainConfig
from .engine import build_engine
from .evaluation import evaluate, sync_bn_buffers
from .model_setup import build_model, weights_digest
from .tracking import NullLogger, make_logger, sync_tracking, tracking_dir


class Run:
    """One worker's view of the training run."""

    def __init__(self, cfg: TrainConfig, report_fn=None, get_checkpoint_fn=None):
        self.cfg = cfg
        self._report = report_fn
        self.in_ray = report_fn is not None  # inside a Ray Train worker (Ray's report and notices)
        self.rank, self.world = rank_world()
        self.state = ckpt.RunState(world_size=self.world, config=cfg.model_dump(mode="json"))
        self.scratch = Path(tempfile.mkdtemp(prefix=f"sp_run_r{self.rank}_"))
        self.checkpoint_files = self.scratch / "carry"  # rank 0's files that ride in every checkpoint (carry/)
        self.checkpoint_files.mkdir()
        self.logger: NullLogger = NullLogger()
        self.engine = None
        self.loader_position: dict | None = None
        self.last_eval: dict[str, float] = {}
        self.input_size = cfg.data.image_size
        self.report: dict | None = None  # report.json content once the outputs are written (rank 0)
        self.algorithm = None  # the loop's Algorithm: its state_dict() rides in every checkpoint
        # micro-batches per optimizer step and LR factor at this world size (elastic groups)
        self.accum, self.lr_scale = cfg.scaling.accumulation(cfg.data.batch_size, self.world)
        self._upload_async = cfg.checkpoint.upload == "async" and report_fn is not None
        self.policy = None  # the loop's CheckpointPolicy; told about every checkpoint written
        self._restore(get_checkpoint_fn() if get_checkpoint_fn else None)
        self.train_loader, self.val_loader = self._loaders()
        self.wandb_dir = tracking_dir(cfg) if self.rank == 0 else None  # wandb's files: in the run's storage
        if not self.state.finished:  # a re-launched finished run only reports; no new wandb session
            self.logger = make_logger(cfg.tracking, self.rank, cfg.name, self.state.config,
                                      self.state.wandb_run_id, self.wandb_dir)
        self.logger.step_fn = lambda: self.state.global_step
        self.state.wandb_run_id = self.logger.run_id or self.state.wandb_run_id

    # -- setup and restore -----------------------------------------------------------------
    def _restore(self, checkpoint) -> None:
        """Fresh model and engine, or the checkpoint's (at its recorded shape, any world size).
        Collective."""
        if checkpoint is None:
            self._set_model(build_model(self.cfg, None))
            return
        with checkpoint.as_directory() as d:
            saved = ckpt.read_state(d)
            check_same_run(saved, self.cfg, d)
            if saved.format < 2 and saved.world_size != self.world:
                raise ckpt.CheckpointError(f"checkpoint {d} predates world-size-free checkpoints: it was written by "
                                           f"{saved.world_size} workers and loads only on {saved.world_size}")
            written_by = saved.world_size
            self.state = saved
            self.state.config = self.cfg.model_dump(mode="json")
            self.state.world_size = self.world
            self._set_model(build_model(self.cfg, saved.arch_spec))  # compacted shape before loading
            ckpt.restore_engine(self.engine, d, saved)  # sync point
            legacy = ckpt.restore_rank(d, self.rank, self.world, self.cfg.seed, saved.global_step)
            self.loader_position = saved.loader or legacy
            if self.rank == 0:
                ckpt.restore_carry(d, self.checkpoint_files)
        if written_by != self.world:
            self._record_world_change(written_by)
        # what was loaded, so a reader (and the resume test) can check it is what was saved
        self.state.resumed_from.append({"epoch": saved.epoch, "step": saved.step, "time": time.time(),
                                        "world_size": self.world, "weights_sha256": weights_digest(self.model),
                                        "wandb_run_id": saved.wandb_run_id})

    def _record_world_change(self, before: int) -> None:
        change = {"epoch": self.state.epoch, "step": self.state.step, "global_step": self.state.global_step,
                  "from": before, "to": self.world, "grad_accum": self.accum, "lr_scale": self.lr_scale,
                  "time": time.time()}
        self.state.world_changes.append(change)
        if self.rank == 0:
            print(f"[softprune] resumed on {self.world} workers (checkpoint written by {before}) at epoch "
                  f"{self.state.epoch} step {self.state.step}: {self.accum} micro-batch(es) per step, "
                  f"LR x{self.lr_scale:.3g}", flush=True)

    def _set_model(self, model: nn.Module) -> None:
        self.engine = build_engine(model, self.cfg, self.world)  # collective: DeepSpeed init

    def _loaders(self):
        from data import make_train_loader, make_val_loader

        train = make_train_loader(self.cfg.data, self.rank, self.world)
        val = make_val_loader(self.cfg.data, self.rank, self.world) if self.cfg.data.val else None
        if self.loader_position is not None:
            train.load_state_dict(self.loader_position)
        return train, val

    @property
    def model(self) -> nn.Module:
        return self.engine.module

    def replace_model(self, model: nn.Module, spec: dict, state: tuple[dict, dict] | None = None) -> None:
        """Swap in a compacted model: a fresh engine (DeepSpeed cannot load across shapes), given
        `state` ((model state, optimizer state) in `engine_state.gather`'s form, e.g. the old
        engine's cut to the kept channels by orchestrator/compaction.py) so the optimizer goes on
        where it was. Collective on every rank."""
        from .compaction import start_engine

        if hasattr(self.engine, "destroy"):
            self.engine.destroy()  # frees DeepSpeed's hooks and buffers of the old shape
        self.engine = start_engine(model, self.cfg, self.world, state)  # sync point
        self.state.arch_spec = spec

    # -- evaluation and logging ------------------------------------------------------------
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Exact top-1/top-5 of `model` (default: the training model) over the whole val set."""
        if self.val_loader is None:
            return {}
        model = model if model is not None else self.model
        with watchdog.phase("evaluation"):  # evaluate() beats once per batch
            faults.inject("eval", self.rank)
            sync_bn_buffers(model)  # sync point: ranks must evaluate (and save) one model
            data = self.cfg.data
            return evaluate(model, self.val_loader, data.mean, data.std, self.cfg.scaling.channels_last)

    def evaluate_candidate(self, model: nn.Module) -> dict[str, float]:
        """Evaluate a compacted CPU model on the training device (in fp32), then bring it back."""
        device = next(self.model.parameters()).device
        try:
            return self.evaluate(model.to(device))
        finally:
            model.cpu()

    def record_stage(self, name: str, metrics: dict[str, Any]) -> None:
        """Record an evaluation stage (soft, hard, recalibrated, ...) for report.json and wandb."""
        self.state.stages[name] = dict(metrics, epoch=self.state.epoch)
        self.logger.log({f"stage/{name}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        if self.rank == 0 and metrics:
            print(f"[softprune] stage {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                         if isinstance(v, float)), flush=True)

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """Report metrics and a full checkpoint to Ray. Every rank calls it (Ray's report is a
        barrier and DeepSpeed's save is collective)."""
        with watchdog.phase("checkpoint", self.cfg.watchdog.checkpoint_timeout_s):
            self._checkpoint(metrics)

    def _checkpoint(self, metrics: dict[str, Any]) -> None:
        if self.algorithm is not None:
            self.state.algorithm = self.algorithm.state_dict()
        self.state.loader = self.train_loader.state_dict()  # the same on every rank
        # outside the scratch dir: an asynchronous upload may outlive this run's close()
        local = ckpt.save(self.engine, self.state, self.rank, self.checkpoint_files)
        if self.policy is not None:
            self.policy.reset()
        upload_async = self._upload_async and not self.state.finished  # the last one: wait for it
        try:
            if self._report is not None:
                from ray.train import Checkpoint
                from ray.train.v2.api.report_config import CheckpointUploadMode

                mode = CheckpointUploadMode.ASYNC if upload_async else CheckpointUploadMode.SYNC
                self._report(dict(metrics, epoch=self.state.epoch, step=self.state.global_step),
                             checkpoint=Checkpoint.from_directory(str(local)),
                             checkpoint_upload_mode=mode)  # sync point
            if self.rank == 0:
                sync_tracking(self.cfg, self.wandb_dir)
        finally:
            if not upload_async:  # Ray deletes an asynchronously uploaded directory itself
                shutil.rmtree(local, ignore_errors=True)

    def close(self) -> None:
        """End the run on this worker: loader processes, the wandb run, the scratch directory."""
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()
        self.logger.finish()
        if self.rank == 0:
            sync_tracking(self.cfg, self.wandb_dir)
        shutil.rmtree(self.scratch, ignore_errors=True)


def check_same_run(saved: ckpt.RunState, cfg: TrainConfig, where) -> None:
    """Refuse a checkpoint of another model or pruning method before it touches the engine."""
    before = saved.config or {}
    for dotted in ("model.name", "pruning.method"):
        section, key = dotted.split(".")
        then, now = before.get(section, {}).get(key), getattr(getattr(cfg, section), key)
        if then is not None and then != now:
            raise ckpt.CheckpointError(f"checkpoint {where} is of {dotted}={then!r}, this run has {dotted}={now!r}; "
                                       f"use another run name or storage")
