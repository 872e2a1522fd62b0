"""The per-worker training loop that Ray Train runs on every rank.

It reads top to bottom: set up (or restore) the run, then per epoch: events, train steps,
events, evaluate, checkpoint; then the finish event. Pruning enters only through the algorithm's
events; the loop never knows which method is running.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from . import env, faults, watchdog
from .algorithms import make_algorithm
from .checkpoint_policy import CheckpointPolicy
from .config import TrainConfig
from .engine import init_distributed, lr_at, set_lr
from .evaluation import to_input
from .progress import Progress
from .worker import Run


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point for `TorchTrainer`: `loop_config["config"]` is the resolved TrainConfig."""
    import ray.train

    cfg = TrainConfig.model_validate(loop_config["config"])
    setup_worker(cfg)
    w = cfg.watchdog
    if w.timeout_s:
        watchdog.start(w.timeout_s, int(os.environ.get("RANK", 0)), w.grace_s)
    run = None
    try:
        with watchdog.phase("set-up and restore", w.checkpoint_timeout_s):
            run = Run(cfg, report_fn=ray.train.report, get_checkpoint_fn=ray.train.get_checkpoint)
        train(run)
    finally:
        watchdog.stop()  # before teardown: a slow close is no hang worth killing the worker for
        if run is not None:
            run.close()


def setup_worker(cfg: TrainConfig) -> None:
    """Threads, the distributed backend (adopting Ray's gloo/nccl group), seeds, quiet logs."""
    if not env.verbose(cfg.tracking.verbose):
        quiet_report_logging()
    env.make_dirs()  # the driver's paths may not exist on this node
    # Own wandb service per worker: an inherited one (a driver that used wandb) outlives a killed
    # rank 0 and keeps its run "in use" when the restarted group resumes it.
    os.environ.pop("WANDB_SERVICE", None)
    torch.set_num_threads(cfg.scaling.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker)))
    init_distributed()
    torch.manual_seed(cfg.seed)  # same init on every rank; DeepSpeed also broadcasts rank 0's weights


def quiet_report_logging() -> None:
    """Ray Train logs every report of every rank at INFO ("Reporting training result N: ..."),
    under a logger named after its file, which RunConfig's logging level does not reach."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its logging stays as it is
        return
    context.logger.setLevel(logging.WARNING)


def train(run: Run) -> None:
    """The loop. Every rank runs the same sequence of collectives."""
    cfg, state = run.cfg, run.state
    if state.finished:
        return
    algo = run.algorithm = make_algorithm(cfg)
    run.policy = CheckpointPolicy(cfg.checkpoint, run.rank, preemption_fn(run))
    algo.load_state_dict(state.algorithm)  # resumed: the checkpoint's; fresh: {}
    epochs = cfg.epochs + algo.extra_epochs()
    progress = Progress(epochs, state.epoch, run.rank == 0, cfg.tracking.print_every_s)
    event(algo.on_train_start, run)
    while state.epoch < epochs:
        event(algo.on_epoch_start, run)
        epoch_metrics = train_epoch(run, algo, progress)
        event(algo.on_epoch_end, run)
        epoch_metrics.update(algo.epoch_stats(run))  # e.g. the kept filters' norms
        run.last_eval = run.evaluate()  # sync point (all-reduce of the counts)
        state.history.append(dict(epoch=state.epoch, **epoch_metrics, **{f"val_{k}": v for k, v in run.last_eval.items()}))
        run.logger.log({"epoch": state.epoch, **{f"epoch/{k}": v for k, v in epoch_metrics.items()},
                        **{f"val/{k}": v for k, v in run.last_eval.items()}})
        progress.epoch(state.epoch, epoch_metrics, run.last_eval, algo.progress())
        state.epoch, state.step = state.epoch + 1, 0
        run.checkpoint({**epoch_metrics, **{f"val_{k}": v for k, v in run.last_eval.items()}})  # sync point
        if cfg.stop_after_epoch is not None and state.epoch > cfg.stop_after_epoch:
            return  # a planned stop; the same command resumes at the next epoch
    event(algo.on_finish, run)
    state.finished = True
    run.checkpoint({"finished": 1})  # sync point; marks the run done for a re-launch


def preemption_fn(run: Run):
    """Ray Train's preemption notice (a barrier on every rank), inside a Ray Train worker only."""
    if not run.in_ray:
        return None
    import ray.train

    return ray.train.get_preemption_info


def event(handler, run: Run) -> None:
    """One algorithm event, watched with the long deadline: events may evaluate, compact and
    write outputs."""
    with watchdog.phase(f"algorithm event {handler.__name__}", run.cfg.watchdog.checkpoint_timeout_s):
        handler(run)


def train_epoch(run: Run, algo, progress: Progress) -> dict[str, float]:
    """One pass over this rank's training shards (resuming mid-epoch after a restart, at any world
    size). Each optimizer step takes `run.accum` micro-batches (elastic groups keep the global batch)."""
    state = run.state
    loader = run.train_loader
    loader.set_epoch(state.epoch)
    # optimizer steps of this pass (equal on every rank); a resumed pass starts at a step boundary
    first, total = loader.next_start // run.accum, len(loader) // run.accum
    steps = total - first
    run.engine.train()
    watchdog.beat("train step")  # the first batch waits for the loader workers
    start, seen, done, micro = time.perf_counter(), 0, 0, 0
    loss_sum = torch.zeros((), dtype=torch.float64)  # summed where the loss lives: no per-step host sync
    for images, labels in loader:  # resumes from the restored position within the epoch
        loss = micro_step(run, images, labels, loader, micro % run.accum)
        micro, seen = micro + 1, seen + images.shape[0]
        if micro % run.accum:
            continue  # DeepSpeed accumulates; the optimizer steps at the boundary
        state.step, state.global_step, done = state.step + 1, state.global_step + 1, done + 1
        loss_sum = loss_sum.to(loss.device) + loss.detach().double()
        after_step(run, algo, progress, loss, first + done, total)
        if done >= steps:
            break  # a last partial accumulation would step with fewer samples: left for the next epoch
    elapsed = time.perf_counter() - start
    return {"train_loss": float(loss_sum) / max(done, 1), "epoch_seconds": elapsed,
            "img_per_s": seen * run.world / max(elapsed, 1e-9), "step_seconds": elapsed / max(done, 1),
            "lr": run.engine.optimizer.param_groups[0]["lr"]}


def micro_step(run: Run, images, labels, loader, index: int) -> torch.Tensor:
    """Forward and backward of micro-batch `index` of a step; the optimizer steps at the boundary.
    The LR is the schedule's at the step's first sample, from the global samples consumed."""
    cfg, engine = run.cfg, run.engine  # an event may have swapped the engine (compaction)
    before = loader.samples_done() - run.world * cfg.data.batch_size * (index + 1)
    epoch = run.state.epoch + before / max(loader.epoch_samples(), 1)
    set_lr(engine, run.lr_scale * lr_at(epoch, cfg))
    inputs = to_input(images, cfg.data.mean, cfg.data.std, engine.module, cfg.scaling.channels_last)
    logits = engine(inputs)
    loss = run.algorithm.loss(run, inputs, logits, labels.to(logits.device))
    engine.backward(loss)  # sync point: gradient all-reduce / reduce-scatter (at the boundary)
    engine.step()
    return loss


def after_step(run: Run, algo, progress: Progress, loss: torch.Tensor, done: int, steps: int) -> None:
    """Everything that follows an optimizer step: faults, watchdog, events, logs, checkpoints.
    `done` of the `steps` optimizer steps of this epoch's current layout are behind us."""
    cfg, state = run.cfg, run.state
    faults.inject("train", run.rank, state.global_step)
    watchdog.beat()
    algo.on_step_end(run)
    lr = run.engine.optimizer.param_groups[0]["lr"]
    if state.global_step % cfg.tracking.log_every == 0:  # float(): a host sync, only when logging
        run.logger.log({"train/loss": float(loss.detach()), "train/lr": lr,
                        "epoch": state.epoch + done / max(steps, 1)}, step=state.global_step)
    if progress.due():  # rank 0 only, at most once a minute by default
        progress.step(state.epoch, done, steps, float(loss.detach()), lr)
    reason = run.policy.due(state.global_step, done, steps) if run.policy is not None else None
    if reason is not None:  # sync point: the policy answers the same on every rank
        run.checkpoint({"train_loss": float(loss.detach()), "checkpoint_reason": reason})
