"""`Run`: what one Ray Train worker holds (model, engine, loaders, state, logger) and the
operations the loop and the pruning algorithms call on it (evaluate, checkpoint, replace the model).
"""

from __future__ import annotations

import os
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
from .tracking import NullLogger, make_logger


class Run:
    """One worker's view of the training run."""

    def __init__(self, cfg: TrainConfig, report_fn=None, get_checkpoint_fn=None):
        self.cfg = cfg
        self._report = report_fn
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
        self._restore(get_checkpoint_fn() if get_checkpoint_fn else None)
        self.train_loader, self.val_loader = self._loaders()
        if not self.state.finished:  # a re-launched finished run only reports; no new wandb session
            self.logger = make_logger(cfg.tracking, self.rank, cfg.name, self.state.config,
                                      self.state.wandb_run_id, os.environ.get("WANDB_DIR"))
        self.logger.step_fn = lambda: self.state.global_step
        self.state.wandb_run_id = self.logger.run_id or self.state.wandb_run_id

    # -- setup and restore -----------------------------------------------------------------
    def _restore(self, checkpoint) -> None:
        """Fresh model and engine, or the checkpoint's (at its recorded shape). Collective."""
        if checkpoint is None:
            self._set_model(build_model(self.cfg, None))
            return
        with checkpoint.as_directory() as d:
            saved = ckpt.read_state(d)
            if saved.world_size != self.world:
                raise ValueError(f"checkpoint was written by {saved.world_size} workers, this run has "
                                 f"{self.world}; ZeRO checkpoints need the same world size")
            self.state = saved
            self.state.config = self.cfg.model_dump(mode="json")
            self._set_model(build_model(self.cfg, saved.arch_spec))  # compacted shape before loading
            ckpt.restore_engine(self.engine, d)  # sync point
            self.loader_position = ckpt.restore_rank(d, self.rank)
            if self.rank == 0:
                ckpt.restore_carry(d, self.checkpoint_files)
        # what was loaded, so a reader (and the resume test) can check it is what was saved
        self.state.resumed_from.append({"epoch": saved.epoch, "step": saved.step, "time": time.time(),
                                        "weights_sha256": weights_digest(self.model),
                                        "wandb_run_id": saved.wandb_run_id})

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

    def replace_model(self, model: nn.Module, spec: dict) -> None:
        """Swap in a compacted model: a fresh engine (DeepSpeed cannot load across shapes).
        Collective on every rank."""
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()  # frees DeepSpeed's hooks and buffers of the old shape
        self._set_model(model)
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
            return evaluate(model, self.val_loader, self.cfg.data.mean, self.cfg.data.std)

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
        local = ckpt.save(self.engine, self.state, self.rank, self.train_loader.state_dict(), self.checkpoint_files,
                          root=str(self.scratch))
        try:
            if self._report is not None:
                from ray.train import Checkpoint

                self._report(dict(metrics, epoch=self.state.epoch, step=self.state.global_step),
                             checkpoint=Checkpoint.from_directory(str(local)))  # sync point
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def close(self) -> None:
        """End the run on this worker: loader processes, the wandb run, the scratch directory."""
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()
        self.logger.finish()
        shutil.rmtree(self.scratch, ignore_errors=True)
