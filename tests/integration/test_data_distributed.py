"""Two real processes in a gloo group read uneven shards: disjoint samples, equal batch counts
(an all_reduce per batch would hang or fail otherwise), and a mid-epoch resume from rank 0's
state alone reproduces the uninterrupted batches on both ranks; resumed on one rank or on three
(loader worker processes on every rank), the epoch goes on with every sample read once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data import DataConfig
from data.testing import write_indexed_shards
from orchestrator.driver import free_port

ROOT = Path(__file__).resolve().parents[2]
COUNTS = {"train": [37, 5, 61, 1, 20], "val": [17, 4]}  # uneven, and a 1-sample shard

WORKER = r"""
import json, os, sys
from datetime import timedelta
import torch, torch.distributed as dist
from data import DataConfig, make_train_loader, make_val_loader

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
cfg = DataConfig.model_validate_json(sys.argv[1])
mode, out = sys.argv[2], sys.argv[3]
train = make_train_loader(cfg, rank, world)

def play(loader, stop=None):
    got = []
    for batch in loader:
        dist.all_reduce(torch.ones(1))  # a collective per batch: unequal counts would hang here
        got.append(batch[1][batch[2]].tolist() if len(batch) == 3 else batch[1].tolist())
        if len(got) == stop:  # stop right after a used batch, as a trainer checkpointing would
            break
    return got

result = {"len": len(train)}
if mode == "full":
    for epoch in (0, 1):
        train.set_epoch(epoch)
        result[f"epoch{epoch}"] = play(train)
    result["val"] = play(make_val_loader(cfg, rank, world))
elif mode == "stop":
    train.set_epoch(1)
    result["epoch1"] = play(train, stop=3)
    if rank == 0:
        json.dump(train.state_dict(), open(out + ".state", "w"))
else:
    train.load_state_dict(json.load(open(os.path.join(os.path.dirname(out), "stop.state"))))
    train.set_epoch(1)
    result["len"] = len(train)  # batches of the resumed phase
    result["epoch1"] = play(train)
    result["samples"] = [train.samples_done(), train.epoch_samples()]
json.dump(result, open(f"{out}.{rank}.json", "w"))
dist.destroy_process_group()
"""


def _run_ranks(cfg: DataConfig, mode: str, out: Path, world: int = 2) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, cfg.model_dump_json(), mode, str(out / mode)],
                              env={**env, "RANK": str(r)}, cwd=ROOT) for r in range(world)]
    codes = [p.wait(timeout=240) for p in procs]
    assert codes == [0] * world, f"rank processes exited with {codes}"
    return [json.loads((out / f"{mode}.{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_two_ranks_uneven_shards(tmp_path):
    src = write_indexed_shards(tmp_path / "shards", COUNTS).parent
    cfg = DataConfig(train=str(src), val=str(src), image_size=8, transform="cifar", batch_size=6,
                     num_workers=2, shuffle_buffer=16, seed=11)
    full = _run_ranks(cfg, "full", tmp_path)
    total = sum(COUNTS["train"])
    assert full[0]["len"] == full[1]["len"] == (total // 2) // 6
    for epoch in ("epoch0", "epoch1"):
        ids = [[i for batch in r[epoch] for i in batch] for r in full]
        assert len(full[0][epoch]) == len(full[1][epoch]) == full[0]["len"]
        assert not set(ids[0]) & set(ids[1]), "a sample was read by both ranks"
        assert len(set(ids[0] + ids[1])) == len(ids[0] + ids[1]) == 2 * full[0]["len"] * 6
    assert full[0]["epoch0"] != full[0]["epoch1"]  # reshuffled per epoch
    val_ids = sorted(i for r in full for batch in r["val"] for i in batch)
    assert val_ids == list(range(sum(COUNTS["val"])))  # every val sample exactly once

    stopped = _run_ranks(cfg, "stop", tmp_path)
    resumed = _run_ranks(cfg, "resume", tmp_path)  # both ranks resume from rank 0's state
    for rank in range(2):
        assert stopped[rank]["epoch1"] + resumed[rank]["epoch1"] == full[rank]["epoch1"]


@pytest.mark.slow
def test_two_ranks_stopped_resume_on_one_and_on_three(tmp_path):
    src = write_indexed_shards(tmp_path / "shards", COUNTS).parent
    cfg = DataConfig(train=str(src), image_size=8, transform="cifar", batch_size=6, num_workers=2,
                     shuffle_buffer=16, seed=11)
    stopped = [i for r in _run_ranks(cfg, "stop", tmp_path) for batch in r["epoch1"] for i in batch]
    assert len(stopped) == 2 * 3 * 6
    total = sum(COUNTS["train"])
    for world, batch in ((1, 6), (3, 4)):
        other = DataConfig(**{**cfg.model_dump(), "batch_size": batch})
        resumed = _run_ranks(other, "resume", tmp_path, world=world)
        ids = stopped + [i for r in resumed for b in r["epoch1"] for i in b]
        assert len(ids) == len(set(ids)), f"a sample was read twice resuming on {world} ranks"
        done, epoch_total = resumed[0]["samples"]
        assert all(r["samples"] == [done, epoch_total] for r in resumed)
        assert done == epoch_total == len(ids) and total - len(ids) < world * (batch + 1)
        assert {len(r["epoch1"]) for r in resumed} == {resumed[0]["len"]}
