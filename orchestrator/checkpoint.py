"""Checkpoints: the run's whole training state in a form any world size can load, reported to
Ray as one directory.

Layout of one checkpoint directory (every rank writes its part into its own local directory and
Ray merges them in storage):
```
model.pt              rank 0: full fp32 model state (parameters from the fp32 masters, buffers)
optimizer.pt          rank 0: full optimiser moments per parameter name, step counters, loss scale
rank_<r>.pt           every rank: its RNG states (used again only at the same world size)
carry/                small files that must travel with the run (rank 0), e.g. compaction candidates
softprune_state.json  rank 0, written last: epoch, step, the loader's position in global samples,
                      the algorithm's state (masks, ...), stages, wandb id, config, arch spec, and
                      the byte size of model.pt and optimizer.pt
```
Nothing in it depends on the number of ranks that wrote it (engine_state.py gathers ZeRO
partitions into full tensors), so a run stopped on N workers resumes on M. Checkpoints written
before this format (a DeepSpeed `deepspeed/ds` directory and per-rank loader positions) still
load, at their own world size only.

A checkpoint is complete or absent: Ray registers it only after every rank's upload finished;
`read_state` also checks every part is there at its recorded size (a copy cut short by a killed
upload is refused), before anything touches the engine.
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
MODEL_FILE = "model.pt"
OPTIM_FILE = "optimizer.pt"
DS_DIR = "deepspeed"  # the format before model.pt/optimizer.pt
DS_TAG = "ds"
CARRY_DIR = "carry"
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, another model, unwritable); one line."""


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
    loader: dict | None = None  # the train loader's position, identical on every rank
    world_changes: list[dict] = field(default_factory=list)  # every resume at another world size
    files: dict[str, int] = field(default_factory=dict)  # rank 0's parts and their byte sizes
    format: int = 1

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


def save(engine, state: RunState, rank: int, carry: Path | None, root: str | None = None) -> Path:
    """Write this rank's part of a checkpoint into a fresh local directory and return it.

    Collective: the gathering of ZeRO partitions. A failed write (full disk) raises
    CheckpointError after removing the partial directory; nothing reported earlier is touched.
    """
    from . import engine_state

    local = Path(tempfile.mkdtemp(prefix="sp_ckpt_", dir=root))
    try:
        gathered = engine_state.gather(engine, keep=rank == 0)  # sync point
        torch.save({"rng": rng_state(), "world_size": state.world_size}, local / f"rank_{rank}.pt")
        if rank == 0:  # rank-dependent: one copy of the run-wide state
            _write_rank0(local, state, gathered, carry, rank)
    except OSError as exc:
        shutil.rmtree(local, ignore_errors=True)
        raise CheckpointError(f"could not write a checkpoint into {local.parent}: {exc.strerror or exc}") from None
    return local


def _write_rank0(local: Path, state: RunState, gathered, carry: Path | None, rank: int) -> None:
    from . import faults

    model, optimizer = gathered
    torch.save(model, local / MODEL_FILE)
    faults.inject("checkpoint", rank, state.global_step)  # drills: a kill halfway through
    torch.save(optimizer, local / OPTIM_FILE)
    if carry is not None and carry.is_dir() and any(carry.iterdir()):
        shutil.copytree(carry, local / CARRY_DIR)
    state.format = FORMAT
    state.files = {name: (local / name).stat().st_size for name in (MODEL_FILE, OPTIM_FILE)}
    tmp = local / (STATE_FILE + ".tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, local / STATE_FILE)  # written last: its presence marks rank 0's part complete


def read_state(directory: str | Path) -> RunState:
    """softprune's state of a checkpoint directory, after checking the checkpoint is whole."""
    d = Path(directory)
    if not (d / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {d} has no {STATE_FILE}: incomplete")
    try:
        state = RunState.from_json((d / STATE_FILE).read_text())
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {d}: {STATE_FILE} is unreadable ({exc})") from None
    problems = [f"rank_{r}.pt missing" for r in range(state.world_size) if not (d / f"rank_{r}.pt").is_file()]
    if state.format >= 2:
        for name, size in state.files.items():
            have = (d / name).stat().st_size if (d / name).is_file() else None
            if have != size:
                problems.append(f"{name} {'missing' if have is None else f'has {have} of {size} bytes'}")
    elif not (d / DS_DIR / DS_TAG).is_dir():
        problems.append(f"{DS_DIR}/{DS_TAG} missing")
    if problems:
        raise CheckpointError(f"checkpoint {d} is incomplete: {', '.join(problems)}")
    return state


def restore_engine(engine, directory: str | Path, state: RunState) -> None:
    """Load model + optimizer state into an engine of the right shape, at any world size
    (a legacy checkpoint: at its own). Collective."""
    from . import engine_state

    d = Path(directory)
    if state.format < 2:
        path, _ = engine.load_checkpoint(str(d / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {d}")
        link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO 1/2: moments reachable before the first step (a gather, an event)
            link()
        return
    model = torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True)
    optimizer = torch.load(d / OPTIM_FILE, map_location="cpu", weights_only=True)
    try:
        engine_state.load(engine, model, optimizer)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {d}: {exc}") from None


def restore_rank(directory: str | Path, rank: int, world: int, seed: int, step: int) -> dict | None:
    """Restore this rank's RNG states (the saved ones at the same world size, else generators
    seeded from (seed, step, rank)); return a legacy checkpoint's per-rank loader position."""
    path = Path(directory) / f"rank_{rank}.pt"
    blob = torch.load(path, weights_only=False) if path.is_file() else None
    if blob is not None and blob.get("world_size", world) == world:
        set_rng_state(blob["rng"])
    else:
        reseed(seed, step, rank)
    return blob.get("loader") if blob is not None else None


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh, distinct generators for a rank that has no saved state of its own."""
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(mixed)
    np.random.seed(mixed)
    random.seed(mixed)


def model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's full fp32 model state dict (module keys), read on CPU without an engine."""
    d = Path(directory)
    if (d / MODEL_FILE).is_file():
        return torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True)
    blob = torch.load(d / DS_DIR / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return blob["module"]


def restore_carry(directory: str | Path, carry: Path) -> None:
    src = Path(directory) / CARRY_DIR
    if src.is_dir():
        shutil.copytree(src, carry, dirs_exist_ok=True)
