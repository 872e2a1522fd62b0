"""Training step speed with `scaling.channels_last` against NCHW batches, per precision, in one run.

Each configuration is a real DeepSpeed engine (a process group of one, ZeRO --zero-stage) around
the same model, fed uint8 batches through `orchestrator.evaluation.to_input` as the trainer
feeds them: normalise, cast, NHWC or not, then forward, cross-entropy, backward, step. The
configurations run in interleaved rounds (one window of --steps steps each per round), so a
change in the machine's load falls on all of them; each round's figure is NCHW time over
channels_last time at the same precision. On a CUDA machine it runs on the GPU (bf16 there is
the layout's main case: tensor cores convolve NHWC).

    python benchmarks/bench_layout.py [--model resnet50 --size 112 --batch 8 --rounds 5 --steps 2]
    python benchmarks/bench_layout.py --size 224 --batch 256 --steps 20     # on a GPU

The last line printed is the bf16 (else the last precision's) channels_last speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (fp16 on a GPU)")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="training steps per timed window")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    return p.parse_args()


def _config(a, precision: str, channels_last: bool, gpu: bool):
    from orchestrator.config import load_config

    return load_config({"data": {"train": "unused", "batch_size": a.batch, "image_size": a.size},
                        "model": {"name": a.model, "num_classes": 1000},
                        "optim": {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
                        "scaling": {"workers": 1, "zero_stage": a.zero_stage, "precision": precision,
                                    "gpus_per_worker": 1 if gpu else 0, "channels_last": channels_last}})


def _trainer_steps(a, precision: str, channels_last: bool, gpu: bool):
    """`steps(images)`: --steps training steps of a fresh engine, as trainer.micro_step runs them."""
    import torch
    import torch.nn.functional as F

    from models import create_model
    from orchestrator.engine import build_engine
    from orchestrator.evaluation import to_input

    cfg = _config(a, precision, channels_last, gpu)
    torch.manual_seed(0)
    engine = build_engine(create_model(a.model, 1000), cfg, 1)
    labels = torch.randint(0, 1000, (a.batch,), generator=torch.Generator().manual_seed(1))
    labels = labels.to(next(engine.module.parameters()).device)

    def steps(images: torch.Tensor) -> None:
        for _ in range(a.steps):
            x = to_input(images, cfg.data.mean, cfg.data.std, engine.module, cfg.scaling.channels_last)
            engine.backward(F.cross_entropy(engine(x).float(), labels))
            engine.step()
        if gpu:
            torch.cuda.synchronize()

    return steps


def main() -> int:
    a = parse()
    import torch

    from orchestrator.driver import free_port
    from orchestrator.engine import init_distributed
    from orchestrator.env import set_defaults
    from pruning.latency import interleaved_seconds

    set_defaults()  # temp dirs and DeepSpeed's JIT builds under the checkout's .cache
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    init_distributed()
    gpu = torch.cuda.is_available()
    precisions = a.precisions.split(",")
    runs = {(p, layout): _trainer_steps(a, p, layout == "channels_last", gpu)
            for p in precisions for layout in ("NCHW", "channels_last")}
    images = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{a.model} {a.size}px, batch {a.batch}, ZeRO-{a.zero_stage}, {where}; "
          f"{a.rounds} rounds of {a.steps} steps", flush=True)
    times = interleaved_seconds({f"{p} {layout}": run for (p, layout), run in runs.items()}, images, 1, a.rounds)
    print(f"{'precision':<10}{'layout':<15}{'ms/step':>9}{'img/s':>9}{'NCHW/this':>11}  range over rounds")
    headline = None
    for p in precisions:
        base = times[f"{p} NCHW"]
        for layout in ("NCHW", "channels_last"):
            t = times[f"{p} {layout}"]
            ratios = [b / x for b, x in zip(base, t)]
            ms = statistics.median(t) / a.steps * 1e3
            print(f"{p:<10}{layout:<15}{ms:9.1f}{a.batch / ms * 1e3:9.1f}{statistics.median(ratios):11.3f}"
                  f"  [{min(ratios):.3f}-{max(ratios):.3f}]", flush=True)
            if layout == "channels_last" and (headline is None or p == "bf16"):
                headline = (p, statistics.median(ratios))
    print(f"channels_last speed-up, {headline[0]}: {headline[1]:.3f}x NCHW")
    return 0


if __name__ == "__main__":
    sys.exit(main())
