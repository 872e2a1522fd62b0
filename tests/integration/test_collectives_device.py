"""Every collective softprune issues lands on the device its backend needs.

NCCL rejects CPU tensors ("no backend for device cpu"); this machine has no GPU, so the test
checks the two things that make the code device-correct under any backend, in 2 real gloo
processes running the real code paths (evaluation, BN sync and recalibration, a whole pruning
event on a DeepSpeed engine, the outputs barrier):
- every torch.distributed call made from this project's code comes from `orchestrator.collectives`
  (the one place that moves tensors to the backend's device); calls from inside DeepSpeed are
  DeepSpeed's business and allowed;
- every tensor handed to a collective is on `device_for_backend(backend)`, computed by the rule
  that the unit test checks for nccl, gloo and mixed backends.
Yesterday's code (evaluation all-reducing a CPU tensor itself, the coordinator broadcasting CPU
bytes) fails the first check. A real NCCL run is in tests/integration/test_gpu_bf16_zero2.py.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from orchestrator.driver import free_port
from tests.integration.test_orchestrator_zero_masks import _engine, _steps

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list",
               "all_gather_into_tensor", "reduce_scatter_tensor", "reduce", "gather", "scatter", "barrier",
               "all_to_all_single")


def _our_caller() -> str | None:
    """The first frame outside torch that called a collective, if it is this project's code."""
    for frame in traceback.extract_stack()[:-2][::-1]:
        path = Path(frame.filename).resolve()
        if "torch" in path.parts and "site-packages" in path.parts:
            continue
        inside = ROOT in path.parents and ".venv" not in path.parts and "tests" not in path.parts
        return f"{path.relative_to(ROOT)}:{frame.lineno}" if inside else None
    return None


def _strict(dist, violations: list[str]) -> None:
    from orchestrator.collectives import device_for_backend

    def wrap(name, real):
        def checked(*args, **kwargs):
            where = _our_caller()
            if where is not None and not where.startswith("orchestrator/collectives.py"):
                violations.append(f"{name} called from {where}, not through orchestrator.collectives")
            need = device_for_backend(str(dist.get_backend()), None)
            for arg in list(args) + list(kwargs.values()):
                for t in (arg if isinstance(arg, (list, tuple)) else [arg]):
                    if isinstance(t, torch.Tensor) and t.device != need:
                        violations.append(f"{name} got a tensor on {t.device}, backend needs {need}")
            return real(*args, **kwargs)
        return checked

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    violations: list[str] = []
    _strict(dist, violations)
    from orchestrator.collectives import barrier
    from orchestrator.coordinator import Coordinator
    from orchestrator.engine import init_distributed
    from orchestrator.evaluation import evaluate, recalibrate_bn, sync_bn_buffers
    from pruning import build_groups, score, select

    init_distributed()
    engine = _engine(1, "fp32", lr=0.1)
    _steps(engine, 1, rank)
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8, generator=gen),
                torch.randint(0, 4, (4,), generator=gen), torch.ones(4, dtype=torch.bool)) for _ in range(2)]
    metrics = evaluate(engine.module, batches, (0.5,) * 3, (0.25,) * 3)
    sync_bn_buffers(engine.module)
    recalibrate_bn(engine.module, batches, (0.5,) * 3, (0.25,) * 3, limit=2)
    groups = build_groups(engine.module, policy="sfp")
    coord = Coordinator(engine.module, groups, engine)
    coord.event(lambda t: select(groups, score(groups, t, "l2"), 0.3), hard=False, zero_moments=True)
    barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"violations": violations, "samples": metrics["samples"]}))
    sys.stdout.flush()
    os._exit(0)  # see test_orchestrator_zero_masks: results are on disk, skip the teardown


@pytest.mark.timeout(300)
def test_every_collective_goes_through_the_device_helper(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["samples"] == 16  # the evaluation really summed both ranks' counts
        assert res["violations"] == [], f"rank {r}: " + "; ".join(sorted(set(res["violations"])))
