"""Checkpoints: DeepSpeed's checkpoint plus softprune's own state, reported to Ray as one directory.

Layout of one checkpoint directory (every rank writes its part into its own local directory and
Ray merges them in storage):
```
deepspeed/            engine.save_checkpoint (model + ZeRO partitions), tag "ds"
rank_<r>.pt           per-rank RNG states and loader position
carry/                small files that must travel with the run (rank 0), e.g. compaction candidates
softprune_state.json  rank 0: epoch, step, the algorithm's state (masks, ...), stages, wandb id, config,
                      arch spec
```
A checkpoint is complete or absent: Ray registers it only after every rank's upload finished, and
`restore` checks that every part is there before touching the engine.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "softprune_state.json"
DS_DIR = "deepspeed"
DS_TAG = "ds"
CARRY_DIR = "carry"


@dataclass
class RunState:
    """softprune's part of a checkpoint; JSON-able."""

    epoch: int = 0  # next epoch to run (or the one in progress if step > 0)
    step: int = 0  # optimizer steps done within `epoch`
    global_step: int = 0
    world_size: int = 1
    algorithm: dict = field(default_factory=dict)  # the algorithm's own state_dict(), opaque here
    arch_spec: dict | None = None  # shape to rebuild before loading, once the model was compacted
    stages: dict[str, dict] = field(default_factory=dict)  # stage name -> eval metrics
    dense_counts: dict | None = None  # params/macs of the dense model
    wandb_run_id: str | None = None
    resumed_from: list[dict] = field(default_factory=list)
    finished: bool = False
    config: dict | None = None  # resolved TrainConfig
    history: list[dict] = field(default_factory=list)  # per-epoch summary metrics

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        data = json.loads(text)
        if "algorithm" not in data:  # written before algorithms owned their state
            data["algorithm"] = {"masks": data.get("masks"), "history": data.get("mask_history", []),
                                 "frozen": data.get("frozen", False), "compacted": data.get("compacted", False)}
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def rng_state() -> dict[str, Any]:
    """Every generator a rank draws from, CUDA's (one state per visible device) included."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) != torch.cuda.device_count():  # another node shape: restore what matches
            saved = saved[: torch.cuda.device_count()]
        for index, value in enumerate(saved):
            torch.cuda.set_rng_state(value, index)


def save(engine, state: RunState, rank: int, loader_state: dict | None, carry: Path | None,
         root: str | None = None) -> Path:
    """Write this rank's part of a checkpoint into a fresh local directory and return it.

    Collective: `engine.save_checkpoint` synchronises the ranks.
    """
    local = Path(tempfile.mkdtemp(prefix="sp_ckpt_", dir=root))
    engine.save_checkpoint(str(local / DS_DIR), tag=DS_TAG)  # sync point inside DeepSpeed
    torch.save({"rng": rng_state(), "loader": loader_state}, local / f"rank_{rank}.pt")
    if rank == 0:  # rank-dependent: one copy of the run-wide state
        if carry is not None and carry.is_dir() and any(carry.iterdir()):
            shutil.copytree(carry, local / CARRY_DIR)
        tmp = local / (STATE_FILE + ".tmp")
        tmp.write_text(state.to_json())
        os.replace(tmp, local / STATE_FILE)  # written last: its presence marks rank 0's part complete
    return local


def read_state(directory: str | Path) -> RunState:
    """softprune's state of a checkpoint directory, after checking the checkpoint is whole."""
    d = Path(directory)
    if not (d / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {d} has no {STATE_FILE}: incomplete")
    state = RunState.from_json((d / STATE_FILE).read_text())
    missing = [f"rank_{r}.pt" for r in range(state.world_size) if not (d / f"rank_{r}.pt").is_file()]
    if not (d / DS_DIR / DS_TAG).is_dir():
        missing.append(f"{DS_DIR}/{DS_TAG}")
    if missing:
        raise FileNotFoundError(f"checkpoint {d} is incomplete: missing {', '.join(missing)}")
    return state


def restore_engine(engine, directory: str | Path) -> None:
    """Load model + optimizer state into an engine of the right shape. Collective."""
    path, _ = engine.load_checkpoint(str(Path(directory) / DS_DIR), tag=DS_TAG,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")


def restore_rank(directory: str | Path, rank: int) -> dict | None:
    """Restore this rank's RNG states; return its loader position."""
    blob = torch.load(Path(directory) / f"rank_{rank}.pt", weights_only=False)
    set_rng_state(blob["rng"])
    return blob["loader"]


def restore_carry(directory: str | Path, carry: Path) -> None:
    src = Path(directory) / CARRY_DIR
    if src.is_dir():
        shutil.copytree(src, carry, dirs_exist_ok=True)
