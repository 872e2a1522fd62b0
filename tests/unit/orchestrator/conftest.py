"""Fixtures shared by the orchestrator's unit tests."""

from __future__ import annotations

import sys

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    """A gloo process group of one, with the variables a launcher sets, for engines built in-process."""
    mp = pytest.MonkeyPatch()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        mp.setenv(key, value)
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    _forget_deepspeed_world_group()
    yield
    dist.destroy_process_group()
    mp.undo()


def _forget_deepspeed_world_group() -> None:
    """DeepSpeed keeps a clone of the first world group it saw (`groups._WORLD_GROUP`); after an
    earlier test module's group of one was destroyed, the next engine would broadcast over it."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._WORLD_GROUP = None
