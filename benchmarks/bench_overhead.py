"""Overhead of the orchestration, measured in one run:

1. steps/s of the Ray Train + DeepSpeed 2-worker loop against a bare torchrun DDP loop with the
   same model, batch, threads and in-memory batches (so only the framework differs); target >= 0.97.
   The gap is split in two by a third loop, the same DeepSpeed engine under torchrun without Ray:
   DDP -> DeepSpeed is DeepSpeed's share, DeepSpeed under torchrun -> under Ray is Ray's (its
   worker process, and its dashboard/metrics daemons, shown by runs without them; the headline is
   the local Ray softprune starts, metrics collection off, beside Ray's defaults). On a shared
   2-core machine one window per loop could not resolve a few percent (the same code measured
   0.84 and 1.01 x DDP on two days), so each loop runs in --rounds interleaved rounds, each
   figure against the DDP runs right before and after it, and the median and range are printed;
2. the pruning coordinator's time per event (per-filter norms from the ZeRO fragments in one
   all-reduce, score on rank 0, broadcast, local apply to module + ZeRO master + moments, digest
   check) for ResNet-101 with 2 ranks at ZeRO-2, as a fraction of one training step of the same
   engine. benchmarks/bench_coordinator.py compares it with the previous gather path and counts
   the bytes each puts on the wire.

    python benchmarks/bench_overhead.py [--rounds 3 --model resnet20 --size 32 --batch 32 --steps 150]

The last line printed is the steps/s ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _batches(size: int, batch: int, classes: int, rank: int, n: int = 4):
    import torch

    g = torch.Generator().manual_seed(rank)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _time_steps(step, batches, steps: int, warmup: int) -> float:
    """steps/s of `step(x, y)` after `warmup` steps; every rank steps in lockstep (DDP / ZeRO)."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    start = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return steps / (time.perf_counter() - start)


# -- baseline: bare DDP under torchrun ---------------------------------------------------------
def ddp_worker(args) -> None:
    import torch
    import torch.distributed as dist

    from models import create_model

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(create_model(args.model, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()  # sync point: gradient all-reduce
        opt.step()

    rate = _time_steps(step, _batches(args.size, args.batch, 10, rank), args.steps, args.warmup)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"steps_per_s": rate}))
    dist.destroy_process_group()


def ds_worker(args) -> None:
    """The Ray run's DeepSpeed engine and step, under torchrun: no Ray process around it."""
    import torch

    from models import create_model
    from orchestrator.config import load_config
    from orchestrator.engine import build_engine, init_distributed

    torch.set_num_threads(args.threads)
    init_distributed()
    rank = torch.distributed.get_rank()
    cfg = load_config({"data": {"train": "unused", "batch_size": args.batch},
                       "model": {"name": args.model, "num_classes": 10},
                       "optim": {"lr": 0.01}, "scaling": {"workers": 2, "zero_stage": args.stage}})
    torch.manual_seed(0)
    engine = build_engine(create_model(args.model, 10), cfg, 2)

    def step(x, y):
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()

    rate = _time_steps(step, _batches(args.size, args.batch, 10, rank), args.steps, args.warmup)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"steps_per_s": rate}))
    torch.distributed.destroy_process_group()


def run_ddp(args, mode: str = "--ddp-worker") -> float:
    out = Path(tempfile.mkdtemp()) / "ddp.json"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
           __file__, mode, "--out", str(out), "--model", args.model, "--size", str(args.size),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    return json.loads(out.read_text())["steps_per_s"]


# -- Ray Train + DeepSpeed -------------------------------------------------------------------
def ray_worker(loop_config: dict) -> None:
    import torch

    from models import create_model
    from orchestrator.config import load_config
    from orchestrator.coordinator import Coordinator
    from orchestrator.engine import build_engine, init_distributed
    from pruning import build_groups, score, select

    a = loop_config
    torch.set_num_threads(a["threads"])
    init_distributed()
    rank = torch.distributed.get_rank()

    def engine_for(model_name: str, stage: int, batch: int):
        cfg = load_config({"data": {"train": "unused", "batch_size": batch},
                           "model": {"name": model_name, "num_classes": 10},
                           "optim": {"lr": 0.01}, "scaling": {"workers": 2, "zero_stage": stage}})
        torch.manual_seed(0)
        return build_engine(create_model(model_name, 10), cfg, 2)

    def stepper(engine):
        def step(x, y):
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))  # sync point
            engine.step()
        return step

    engine = engine_for(a["model"], a["stage"], a["batch"])
    rate = _time_steps(stepper(engine), _batches(a["size"], a["batch"], 10, rank), a["steps"], a["warmup"])
    if not a["coord"]:
        if rank == 0:
            Path(a["out"]).write_text(json.dumps({"steps_per_s": rate}))
        return

    # coordinator cost on ResNet-101 at ZeRO-2
    big = engine_for("resnet101", 2, a["coord_batch"])
    batches = _batches(a["coord_size"], a["coord_batch"], 10, rank, n=2)
    step_rate = _time_steps(stepper(big), batches, a["coord_steps"], 1)
    groups = build_groups(big.module, policy="sfp")
    coord = Coordinator(big.module, groups, big)
    choose = lambda t: select(groups, score(groups, t, "l2"), 0.3)  # rank 0 only
    times = []
    for _ in range(a["events"]):
        times.append(coord.event(choose, hard=False, zero_moments=True)[1]["seconds"])
    if rank == 0:  # Ray V2 keeps metrics only with checkpoints: hand the numbers back through a file
        Path(a["out"]).write_text(json.dumps({"steps_per_s": rate, "r101_step_s": 1.0 / step_rate,
                                              "coord_event_s": sorted(times)[len(times) // 2]}))


# the local Ray softprune starts (orchestrator.driver.ensure_ray): dashboard on, metrics collection off
SOFTPRUNE_LOCAL = "Ray Train + DeepSpeed, softprune's local Ray (metrics off)"


def run_ray(args, dashboard: bool = True, metrics: bool = True, coord: bool = False) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.driver import default_ray_temp_dir
    from orchestrator.env import worker_env

    if not metrics:  # no metrics recording and export (what orchestrator.driver.ensure_ray sets)
        os.environ["RAY_enable_metrics_collection"] = "0"
    ray.init(address="local", num_cpus=2, _temp_dir=default_ray_temp_dir("_b"), log_to_driver=False,
             include_dashboard=dashboard)
    config = {"model": args.model, "size": args.size, "batch": args.batch, "steps": args.steps,
              "warmup": args.warmup, "threads": args.threads, "stage": args.stage, "coord_size": args.coord_size,
              "coord_batch": args.coord_batch, "coord_steps": 3, "events": 3, "coord": coord,
              "out": str(Path(tempfile.mkdtemp()) / "ray.json")}
    trainer = TorchTrainer(ray_worker, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"bench-{int(time.time())}",
                                                storage_path=tempfile.mkdtemp(prefix="bench_"),
                                                worker_runtime_env={"env_vars": worker_env()}))
    trainer.fit()
    ray.shutdown()
    os.environ.pop("RAY_enable_metrics_collection", None)
    return json.loads(Path(config["out"]).read_text())


def _keep_files_in_repo() -> None:
    """Temp dirs, JIT builds and Ray's files go to the checkout's .cache, not $HOME or /tmp."""
    from orchestrator.env import set_defaults

    set_defaults({"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    # ~25 s per loop: Ray's daemons are still busy for the first seconds after start-up, and a
    # 5 s window measured their start-up rather than the loop (0.76 vs 0.97 here)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (both loops)")
    p.add_argument("--stage", type=int, default=0, help="ZeRO stage of the throughput comparison")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median and range reported)")
    p.add_argument("--coord-size", type=int, default=64, help="ResNet-101 input side for the step time")
    p.add_argument("--coord-batch", type=int, default=8)
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ds-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    _keep_files_in_repo()
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    if args.ds_worker:
        ds_worker(args)
        return 0
    first_default: dict = {}  # the first default Ray run also times the coordinator

    def ray_default() -> float:
        out = run_ray(args, coord=not first_default)
        first_default.setdefault("run", out)
        return out["steps_per_s"]

    loops = {  # name -> steps/s of one run; bare DDP runs before each and after the last
        "DeepSpeed (torchrun, no Ray)": lambda: run_ddp(args, "--ds-worker"),
        "Ray Train + DeepSpeed, Ray's defaults": ray_default,
        "Ray Train + DeepSpeed, no dashboard, no metrics": lambda: run_ray(args, False, False)["steps_per_s"],
        SOFTPRUNE_LOCAL: lambda: run_ray(args, metrics=False)["steps_per_s"],
    }
    ratios, rates, ddp_all = rounds_of(args, loops)
    coord = first_default["run"]
    print(f"{args.model} @ {args.size}px, batch {args.batch}/rank, 2 ranks x {args.threads} thread(s), "
          f"ZeRO-{args.stage}, {args.steps} timed steps, {args.rounds} round(s), load average at the end "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"bare DDP (torchrun): {statistics.median(ddp_all):.3f} steps/s median of {len(ddp_all)} runs "
          f"[{min(ddp_all):.3f}-{max(ddp_all):.3f}]")
    for name in loops:
        r = ratios[name]
        print(f"{name + ':':<58} {statistics.median(rates[name]):.3f} steps/s = {statistics.median(r):.3f} x DDP "
              f"[{min(r):.3f}-{max(r):.3f} over rounds]")
    frac = coord["coord_event_s"] / coord["r101_step_s"]
    print(f"coordinator, ResNet-101 ZeRO-2, 2 ranks: {coord['coord_event_s'] * 1e3:.1f} ms per event = "
          f"{frac:.3f} x one training step ({coord['r101_step_s'] * 1e3:.1f} ms at "
          f"{args.coord_size}px, batch {args.coord_batch}/rank)")
    ours = ratios[SOFTPRUNE_LOCAL]
    print(f"steps/s ratio (Ray+DeepSpeed / DDP, softprune's local Ray, median over rounds): {statistics.median(ours):.3f}")
    return 0


def rounds_of(args, loops: dict) -> tuple[dict, dict, list]:
    """Each round runs every loop once, in an order rotated by one per round, with a bare DDP run
    before each loop and after the last; a loop's figure in a round is its steps/s over the mean
    of the two DDP runs around it, so a drift in the machine's load falls on both."""
    names = list(loops)
    ratios = {n: [] for n in names}
    rates = {n: [] for n in names}
    ddp_all = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        before = run_ddp(args)
        ddp_all.append(before)
        for name in order:
            rate = loops[name]()
            after = run_ddp(args)
            ddp_all.append(after)
            rates[name].append(rate)
            ratios[name].append(rate / ((before + after) / 2))
            before = after
    return ratios, rates, ddp_all


if __name__ == "__main__":
    sys.exit(main())
