"""Checkpoint save/load time and size, three formats of the same engine state, in one run:

1. legacy: DeepSpeed's native `engine.save_checkpoint` / `load_checkpoint` (each rank's ZeRO
   partition; loads only at the world size that wrote it, except at stage 0);
2. universal: that native checkpoint converted offline by DeepSpeed's `ds_to_universal`, loaded
   with `"checkpoint": {"load_universal": true}`; its save cost is the native save plus the
   conversion. The stock converter is run first, exactly as a user would; where it fails (a
   torch SGD keeps `momentum_buffer`, which the converter does not know), the conversion is
   timed again with the smallest shim that lets it through (see `_convert`), and both outcomes
   are printed;
3. softprune: orchestrator/checkpoint.py's gathered format (full fp32 model and moments on rank 0).

A ResNet (fp32, SGD with momentum) takes one optimizer step on 2 gloo ranks (CPU, spawned
processes) so momentum exists, then saves in every format. Each format is loaded into a fresh
engine at world 2 and at world 1 (a resume on fewer workers); every load is checked against the
saved state (weights, buffers and momentum, max abs difference). Times are wall seconds, the
maximum over ranks, with a barrier before each; the files are fresh in the page cache, so loads
measure deserialising and scattering, not the disk.

    python benchmarks/bench_checkpoint.py [--model resnet101 --stage 1] [--quick]

The last line printed is the ratios of the softprune format against legacy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = ("legacy", "universal", "softprune")
TAG = "ds"


# -- engines ---------------------------------------------------------------------------------
def _cfg(args, world: int):
    from orchestrator.config import load_config

    # workers [1, 2]: the same global batch at world 1 (2 micro-batches accumulated)
    return load_config({"data": {"train": "unused", "batch_size": args.batch, "image_size": args.size},
                        "model": {"name": args.model, "num_classes": args.classes},
                        "optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
                        "scaling": {"workers": [1, 2], "zero_stage": args.stage, "precision": "fp32"}})


def _engine(args, world: int, universal: bool = False):
    """A fresh engine, identical on every rank; `universal` adds DeepSpeed's load_universal."""
    import deepspeed
    import torch

    from models import create_model
    from orchestrator.deepspeed_config import deepspeed_config
    from orchestrator.engine import build_engine, build_optimizer

    cfg = _cfg(args, world)
    torch.manual_seed(0)
    model = create_model(args.model, args.classes)
    if not universal:
        return build_engine(model, cfg, world)
    config = dict(deepspeed_config(cfg, world), checkpoint={"load_universal": True})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim), config=config)
    return engine


def _one_step(engine, args, rank: int) -> None:
    import torch

    accum = engine.gradient_accumulation_steps()
    g = torch.Generator().manual_seed(rank)
    for _ in range(accum):
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
        y = torch.randint(0, args.classes, (args.batch,), generator=g)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()


# -- timing helpers --------------------------------------------------------------------------
def _max_over_ranks(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


def _timed(fn) -> float:
    """Wall seconds of `fn()` on the slowest rank, every rank starting together."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    return _max_over_ranks(time.perf_counter() - start)


class _Stopwatch:
    """Wraps a module function to add up its wall time: where a save or load spends it, through
    the real code path (orchestrator/checkpoint.py looks `engine_state.gather/load` up at call time)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.seconds = module, name, 0.0
        self.inner = getattr(module, name)

    def __enter__(self):
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return self.inner(*a, **k)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.inner)


# -- workers (spawned, one per rank) ---------------------------------------------------------
def _worker(rank: int, world: int, store: str, args, phase: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    from orchestrator.engine import init_distributed

    init_distributed()
    work = Path(args.work)
    try:
        result = _write(rank, args, work) if phase == "write" else _read(rank, world, args, work)
        if rank == 0:
            (work / f"result_{phase}_{world}.json").write_text(json.dumps(result))
    except Exception as exc:  # noqa: BLE001 - the parent reads the message
        (work / f"error_{phase}_{world}_{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        (work / f"traceback_{phase}_{world}_{rank}.txt").write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def _write(rank: int, args, work: Path) -> dict:
    """One step, then a legacy save and a softprune save of the same state."""
    import torch.distributed as dist

    from orchestrator import checkpoint as ckpt
    from orchestrator import engine_state

    start = time.perf_counter()
    engine = _engine(args, 2)
    build_s = _max_over_ranks(time.perf_counter() - start)
    _one_step(engine, args, rank)
    out: dict = {"build_s": build_s}
    out["legacy_save_s"] = _timed(lambda: engine.save_checkpoint(str(work / "legacy"), tag=TAG))
    state = ckpt.RunState(world_size=2, global_step=1, config=_cfg(args, 2).model_dump(mode="json"))
    (work / "sp_local").mkdir(exist_ok=True)
    local: list[Path] = []
    with _Stopwatch(engine_state, "gather") as gather:
        out["softprune_save_s"] = _timed(lambda: local.append(ckpt.save(engine, state, rank, None,
                                                                          root=str(work / "sp_local"))))
    out["softprune_gather_s"] = _max_over_ranks(gather.seconds)
    _merge(rank, local[0], work / "softprune")
    dist.barrier()
    return out


def _merge(rank: int, local: Path, merged: Path) -> None:
    """What Ray's merge of the ranks' directories does (renames here, untimed)."""
    import torch.distributed as dist

    if rank == 0:
        local.rename(merged)
    dist.barrier()
    if rank != 0:
        for f in local.iterdir():
            f.rename(merged / f.name)
        local.rmdir()


def _read(rank: int, world: int, args, work: Path) -> dict:
    """Each format into a fresh engine: load time, then a check against the saved state."""
    import gc

    out = {}
    for fmt in args.read_formats:
        engine = _engine(args, world, universal=fmt == "universal")
        try:
            out[fmt] = {"load_s": _load(fmt, engine, work, out, rank), **_check(engine, work, rank)}
        except Exception as exc:  # an expected refusal (legacy at another world) is a result
            if world > 1:
                raise  # one rank alone past a failed collective would leave the other waiting
            out[fmt] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
        del engine
        gc.collect()
    return out


def _load(fmt: str, engine, work: Path, out: dict, rank: int) -> float:
    from orchestrator import checkpoint as ckpt
    from orchestrator import engine_state

    if fmt == "softprune":
        with _Stopwatch(engine_state, "load") as scatter:
            seconds = _timed(lambda: ckpt.restore_engine(engine, work / "softprune",
                                                         ckpt.read_state(work / "softprune")))
        out["softprune_scatter_s"] = _max_over_ranks(scatter.seconds)
        return seconds
    directory = work / ("legacy" if fmt == "legacy" else "universal")
    loaded: list = []
    seconds = _timed(lambda: loaded.append(engine.load_checkpoint(str(directory), tag=TAG,
                                                                  load_optimizer_states=True,
                                                                  load_lr_scheduler_states=False)[0]))
    if loaded[0] is None:
        raise RuntimeError(f"DeepSpeed loaded nothing from {directory}")
    return seconds


def _check(engine, work: Path, rank: int) -> dict:
    """Max abs difference from the saved state (the softprune files hold all of it) of the loaded
    parameters, float buffers (BN running statistics), integer buffers (BN batch counters) and
    momenta; None where the engine has no momentum at all."""
    import torch

    from orchestrator import engine_state

    # DeepSpeed links a ZeRO parameter to its optimiser state at the first step; a native load
    # leaves it unlinked (gather would read None), so link it here as that step would.
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    gathered = engine_state.gather(engine, keep=rank == 0)
    if gathered is None:
        return {}
    model, optim = gathered
    ref_model = torch.load(work / "softprune" / "model.pt", weights_only=True)
    ref_optim = torch.load(work / "softprune" / "optimizer.pt", weights_only=True)
    params = {n for n, _ in engine.module.named_parameters()}
    diffs = {"params": 0.0, "buffers": 0.0, "counters": 0.0}
    for name, saved in ref_model.items():
        kind = "params" if name in params else "buffers" if saved.is_floating_point() else "counters"
        diffs[kind] = max(diffs[kind], float((model[name].double() - saved.double()).abs().max()))
    moments = optim["moments"]
    diffs["momentum"] = None if not any(moments.values()) else max(
        float((moments[n]["momentum_buffer"] - m["momentum_buffer"]).abs().max()) for n, m in ref_optim["moments"].items())
    return {"diffs": diffs}


def _spawn(world: int, args, phase: str) -> dict:
    import torch.multiprocessing as mp

    work = Path(args.work)
    store = work / f"store_{phase}_{world}_{time.time_ns()}"  # a file store is good for one group
    mp.start_processes(_worker, args=(world, str(store), args, phase), nprocs=world, join=True,
                       start_method="spawn")
    errors = sorted(work.glob(f"error_{phase}_{world}_*.txt"))
    if errors:
        raise SystemExit(f"{phase} at world {world} failed: " + "; ".join(p.read_text() for p in errors)
                         + f" (with --keep, tracebacks stay in {work})")
    return json.loads((work / f"result_{phase}_{world}.json").read_text())


# -- offline conversion to DeepSpeed's universal format --------------------------------------
def _stock_conversion(work: Path, inject: bool) -> dict:
    """DeepSpeed's converter as a user runs it; the outcome and the last line of any error."""
    out = work / "universal" / TAG
    shutil.rmtree(work / "universal", ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(work / "legacy" / TAG), "--output_folder", str(out), "--num_extract_workers", "2",
           "--num_merge_workers", "2"] + (["--inject_missing_state"] if inject else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
    return {"ok": proc.returncode == 0, "seconds": seconds, "error": None if proc.returncode == 0 else error.strip()}


def _extract_every_state(folder, ds_checkpoint, indices_3d):
    """ds_to_universal's extract_zero_shards for any torch optimiser (module level: the converter
    pickles it into its worker processes)."""
    from deepspeed.checkpoint import ds_to_universal as dtu

    pp, tp, dp = indices_3d
    sd = ds_checkpoint.get_zero_checkpoint_state(pp_index=pp, tp_index=tp, dp_index=dp)
    optim_sd = sd[dtu.OPTIMIZER_STATE_DICT]
    states = optim_sd[dtu.BASE_OPTIMIZER_STATE]["state"]
    for gid, mappings in enumerate(optim_sd[dtu.PARAM_SLICE_MAPPINGS]):
        flat = {"fp32": optim_sd[dtu.SINGLE_PARTITION_OF_FP32_GROUPS][gid]}
        flat.update({("exp_avg" if k == "momentum_buffer" else k): v for k, v in states[gid].items()})
        for name, fragment in mappings.items():
            for key, tensor in flat.items():
                dtu.dump_param_fragment(folder, tp, dp, key, tensor, name, fragment.start, fragment.numel)


def _convert(args) -> None:
    """In a subprocess: ds_to_universal's `main`, timed in-process, with the SGD shim.

    The converter reads only Adam's moments: `extract_zero_shards` indexes `exp_avg` and
    `exp_avg_sq` (KeyError for SGD's `momentum_buffer`) and `merge_tp_slices` merges only
    ("fp32", "exp_avg", "exp_avg_sq"). The loader is generic (one `<state>.pt` per file found).
    The shim: extract writes `fp32` and every per-parameter tensor the optimiser keeps, filing
    `momentum_buffer` under the `exp_avg` name the merge knows; after the merge the files are
    renamed back to `momentum_buffer.pt`, which the loader restores into SGD's state.
    """
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal as dtu

    dtu.extract_zero_shards = _extract_every_state
    dtu.cnt = 0
    out = Path(args.convert_out)
    ns = Namespace(input_folder=args.convert_in, output_folder=str(out), num_extract_workers=2,
                   num_merge_workers=2, keep_temp_folder=False, strict=True, inject_missing_state=True)
    start = time.perf_counter()
    dtu.main(ns)
    for f in (out / "zero").glob("*/exp_avg.pt"):
        f.rename(f.with_name("momentum_buffer.pt"))
    Path(args.convert_result).write_text(json.dumps({"seconds": time.perf_counter() - start}))


def _shim_conversion(work: Path) -> dict:
    shutil.rmtree(work / "universal", ignore_errors=True)
    result = work / "convert.json"
    cmd = [sys.executable, __file__, "--convert-in", str(work / "legacy" / TAG), "--convert-out",
           str(work / "universal" / TAG), "--convert-result", str(result)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-1:]
        return {"ok": False, "seconds": wall, "error": tail[0] if tail else f"exit {proc.returncode}"}
    return {"ok": True, "seconds": json.loads(result.read_text())["seconds"], "process_s": wall, "error": None}


# -- disk ------------------------------------------------------------------------------------
def _disk(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


# -- report ----------------------------------------------------------------------------------
def _cell_s(entry: dict | None) -> str:
    if entry is None:
        return "-"
    return "refused" if "error" in entry else f"{entry['load_s']:.2f}"


def _check_cell(entry: dict | None) -> str:
    """'exact', or what differs from the saved state and by how much."""
    if entry is None or "error" in entry:
        return "-"
    diffs = entry["diffs"]
    if diffs["momentum"] is None:
        return "MOMENTUM MISSING"
    off = [f"{k} {v:.1g}" for k, v in diffs.items() if v > 0]
    return "exact" if not off else "differs: " + ", ".join(off)


def _print_conversion(conv: dict) -> None:
    print("DeepSpeed ds_to_universal (stock, as a user runs it):")
    for key, label in (("stock", "as is"), ("stock_inject", "with --inject_missing_state")):
        r = conv[key]
        print(f"  {label}: {'ok' if r['ok'] else 'FAILED'} after {r['seconds']:.1f} s" + (f": {r['error']}" if r["error"] else ""))
    shim = conv["shim"]
    print("  with this benchmark's momentum shim: " + (
        f"ok, conversion {shim['seconds']:.1f} s in-process ({shim['process_s']:.1f} s with interpreter start-up)"
        if shim["ok"] else f"not possible: {shim['error']}"))


def _print_table(saves: dict, reads: dict, disk: dict) -> None:
    head = f"{'format':<10} {'save s':>7} {'load@2 s':>9} {'load@1 s':>9} {'MB':>6} {'files':>6}  loaded state at world 2 / world 1"
    print(head)
    print("-" * len(head))
    for fmt in FORMATS:
        if fmt not in disk or saves[fmt] is None:
            print(f"{fmt:<10} {'not available: no conversion':>40}")
            continue
        r2, r1 = reads.get(2, {}).get(fmt), reads.get(1, {}).get(fmt)
        size, count = disk[fmt]
        print(f"{fmt:<10} {saves[fmt]:>7.2f} {_cell_s(r2):>9} {_cell_s(r1):>9} {size / 2**20:>6.0f} {count:>6}  "
              f"{_check_cell(r2)} / {_check_cell(r1)}")


def _print_notes(write: dict, conv: dict, reads: dict, disk: dict) -> None:
    for world in (2, 1):
        for fmt in FORMATS:
            entry = reads.get(world, {}).get(fmt)
            if entry and "error" in entry:
                print(f"  {fmt} at world {world}: {entry['error']}")
    if conv["shim"]["ok"]:
        print(f"  universal save = native save {write['legacy_save_s']:.2f} s + conversion {conv['shim']['seconds']:.2f} s; "
              f"MB and files: the converted folder only (the native one it was made from, "
              f"{disk['legacy'][0] / 2**20:.0f} MB, stays until deleted)")
        if any(reads[w].get("universal", {}).get("diffs", {}).get("buffers") for w in reads):
            print("  universal: `buffers`/`counters` = BN running statistics and batch counters; load_universal skips "
                  "the module state dict and restores only parameters that own a ZeRO fragment")
    gather, total = write["softprune_gather_s"], write["softprune_save_s"]
    load = reads[2]["softprune"]["load_s"]
    print(f"  softprune save: gather {gather:.2f} s + write {total - gather:.2f} s; load at world 2: "
          f"torch.load {load - reads[2]['softprune_scatter_s']:.2f} s + scatter {reads[2]['softprune_scatter_s']:.2f} s")


def _ratios(fmt: str, saves: dict, reads: dict, disk: dict) -> str:
    parts = [f"save {saves[fmt] / saves['legacy']:.2f}x" if saves[fmt] else "save -"]
    for world in (2, 1):
        base, mine = (reads.get(world, {}).get(f, {}).get("load_s") for f in ("legacy", fmt))
        parts.append(f"load@{world} {mine / base:.2f}x" if mine and base else f"load@{world} -")
    parts.append(f"size {disk[fmt][0] / disk['legacy'][0]:.2f}x" if fmt in disk else "size -")
    return f"{fmt} against legacy (lower is better): " + ", ".join(parts)


def report(args, write: dict, conv: dict, reads: dict, disk: dict) -> None:
    saves = {"legacy": write["legacy_save_s"], "softprune": write["softprune_save_s"],
             "universal": write["legacy_save_s"] + conv["shim"]["seconds"] if conv["shim"]["ok"] else None}
    print(f"{args.model} ({args.classes} classes), fp32, SGD momentum, ZeRO stage {args.stage}; gloo on CPU, "
          f"{args.threads} torch thread(s) per rank; after 1 step at world 2 (batch {args.batch}/rank, {args.size}px); "
          f"engine build {write['build_s']:.1f} s (not counted)")
    _print_conversion(conv)
    print()
    _print_table(saves, reads, disk)
    _print_notes(write, conv, reads, disk)
    universal1, softprune1 = (reads.get(1, {}).get(f, {}).get("load_s") for f in ("universal", "softprune"))
    if universal1 and softprune1:
        print(f"  resume on 1 worker: softprune's load takes {softprune1 / universal1:.2f}x universal's")
    print()
    print(_ratios("universal", saves, reads, disk))
    print(_ratios("softprune", saves, reads, disk))


# -- main ------------------------------------------------------------------------------------
def _keep_files_in_repo() -> None:
    from orchestrator.env import set_defaults

    set_defaults({"DS_ACCELERATOR": "cpu"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet101")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--stage", type=int, default=1, choices=(0, 1, 2))
    p.add_argument("--batch", type=int, default=2, help="micro-batch per rank of the one step")
    p.add_argument("--size", type=int, default=32, help="image side of the one step")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--quick", action="store_true", help="resnet20, 10 classes: a check that everything runs")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints under .cache/bench_checkpoint")
    p.add_argument("--convert-in", help=argparse.SUPPRESS)
    p.add_argument("--convert-out", help=argparse.SUPPRESS)
    p.add_argument("--convert-result", help=argparse.SUPPRESS)
    args = p.parse_args()
    _keep_files_in_repo()
    if args.convert_in:
        _convert(args)
        return 0
    if args.quick:
        args.model, args.classes = "resnet20", 10
    work = ROOT / ".cache" / "bench_checkpoint" / f"{args.model}-s{args.stage}-{os.getpid()}"
    work.mkdir(parents=True)
    args.work = str(work)
    try:
        write = _spawn(2, args, "write")
        conv = {"stock": _stock_conversion(work, inject=False), "stock_inject": _stock_conversion(work, inject=True)}
        conv["shim"] = _shim_conversion(work) if args.stage > 0 else {"ok": False, "seconds": 0.0,
                                                                      "error": "no ZeRO partitions to convert at stage 0"}
        args.read_formats = [f for f in FORMATS if f != "universal" or conv["shim"]["ok"]]
        disk = {fmt: _disk(work / fmt) for fmt in args.read_formats}
        reads = {world: _spawn(world, args, "read") for world in (2, 1)}
        report(args, write, conv, reads, disk)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
